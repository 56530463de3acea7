"""Evaluation of finished models: ``python jobs/evaluate.py --config FILE [key=value ...]``.

Compares the models of ``eval.models`` (name -> diffusers directory, hub id, or run-dir
URL) on the prompt sets of ``eval.prompts`` with the scorers of ``eval.scorers``; the
report goes to ``<run_dir>/report/`` (see configs/eval_paper.yaml for the paper's protocol,
configs/eval_toy.yaml for a CPU-sized one). Works unchanged under
``ray job submit --working-dir . -- python jobs/evaluate.py ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spin_ray.cli import run_job  # noqa: E402
from spin_ray.eval import run_evaluation  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(run_evaluation, description=__doc__))
