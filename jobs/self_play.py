"""Self-play fine-tuning: ``python jobs/self_play.py [--config FILE] [key=value ...]``.

Without ``--config`` it runs configs/default.yaml: the embedded toy world on the CPU.
Works unchanged under ``ray job submit --working-dir . -- python jobs/self_play.py ...``.
Rerunning a run directory whose finished stages were made with another config stops and names
the changed keys; ``--restart-from <stage>`` redoes that stage and those after it,
``--accept-config-change`` keeps them (docs/RELIABILITY.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spin_ray.cli import run_job  # noqa: E402
from spin_ray.self_play import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(run, description=__doc__, rerun_flags=True))
