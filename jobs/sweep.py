"""Ray Tune sweeps over self-play hyperparameters: ``python jobs/sweep.py --config FILE [--resume] [key=value ...]``.

FILE is a normal config plus a ``sweep:`` section (configs/sweep_beta.yaml: per-iteration
search over beta; configs/sweep_pbt.yaml: population-based self-play). Overrides may set
sweep keys too: ``sweep.max_concurrent_trials=4 'sweep.space.train.lr={loguniform: [1e-6, 1e-4]}'``.
Rerunning the same command with --resume continues the sweep (it trusts the run
directory: Ray Tune unpickles its saved state). See docs/SWEEPS.md and docs/SECURITY.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spin_ray.sweep import run_sweep_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_sweep_job())
