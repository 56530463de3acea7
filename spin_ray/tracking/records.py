"""What the trackers receive, as plain data: no tracker library is imported here.

The training metrics come from a stage's recorded history (``<stage>/metrics.json``'s
``history``, one dict per report of :func:`spin_ray.train_loop.run_steps`: ``step``, ``lr``,
``loss``, ``implicit_acc``, ``reward_real``, ``reward_syn``, ``margin``, ``samples_per_s``,
``nonfinite_total``, ...) or, while the stage runs, from rank 0's progress file
(:func:`spin_ray.progress.write_progress`). The evaluation's from each report's metrics.json
(:func:`spin_ray.eval.report_files.write_metrics_json`).
"""

from __future__ import annotations

import math
import subprocess  # nosec B404  (one fixed git command, no shell: git_commit)
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TRAIN_PREFIX = "train"
EVAL_PREFIX = "eval"
GENERATION_PREFIX = "generation"
NOT_METRICS = frozenset({"step", "time", "first_batch_time"})
"""History fields that are not curves: the step is the x axis, the times are clock readings."""


def step_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """One report of the training history -> ``{"train/<metric>": value}``: every finite number
    but the step and the clock readings (booleans and strings are not metrics)."""
    scalars = {}
    for key, value in report.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            scalars[f"{TRAIN_PREFIX}/{key}"] = float(value)
    return scalars


def stage_summary(record: Mapping[str, Any]) -> dict[str, float]:
    """A finished stage's metrics.json -> its one-off numbers (``stage/seconds``, ``stage/n_samples``,
    ``generation/opponents``: the samples the stage's opponents were generated for, 0 without)."""
    summary = {f"stage/{key}": float(record[key]) for key in ("seconds", "n_samples", "steps", "beta", "peak_lr")
               if isinstance(record.get(key), int | float) and not isinstance(record.get(key), bool)}
    if record.get("loss_type") not in ("sft", "dpo"):
        summary[f"{GENERATION_PREFIX}/opponents"] = float(record.get("n_samples", 0))
    return summary


def eval_scalars(report: Mapping[str, Any], prompt_set: str | None) -> dict[str, float]:
    """A report's metrics.json -> ``eval/[<set>/]<model>/<metric>/<statistic>`` for every
    summary statistic and ``.../win_rate`` and ``.../tie_share`` for every win rate."""
    base = f"{EVAL_PREFIX}/{prompt_set}" if prompt_set else EVAL_PREFIX
    scalars: dict[str, float] = {}
    for section, fields in (("summaries", None), ("win_rates", ("win_rate", "tie_share"))):
        for model, row in (report.get(section) or {}).items():
            for metric, values in row.items():
                for name, value in values.items():
                    wanted = fields is None or name in fields
                    if wanted and isinstance(value, int | float) and math.isfinite(value):
                        suffix = f"vs_{report.get('baseline')}/{name}" if fields else name
                        scalars[f"{base}/{model}/{metric}/{suffix}"] = float(value)
    return scalars


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested config dict -> (dotted key, value as text) pairs, lists as their YAML-ish text."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, "null" if value is None else str(value)


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the code that runs (the package's git checkout), or None outside one."""
    where = where or Path(__file__).resolve().parent
    try:
        # a fixed argument list, no shell; git from PATH as the user runs it
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,  # nosec B603 B607
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None
