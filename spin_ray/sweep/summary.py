"""What a sweep iteration leaves for people: the table of its trials, the beta plot, the winner's record.

Per iteration k, in the sweep's iteration folder (:meth:`~spin_ray.run_layout.RunLayout.sweep_iteration`):
``trials.md`` (every trial with its hyperparameters, score and status), ``beta_vs_metric.png``
(held-out score against beta, the winner starred) and ``winner.json`` (the published trial,
the best one and every trial's record).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spin_ray.rundir import RunDir
from spin_ray.sweep.trials import TrialRow, row_json


def trials_markdown(rows: Sequence[TrialRow], winner: TrialRow, metric: str, iteration: int,
                    published: TrialRow | None = None) -> str:
    """The per-iteration table: one row per trial with its hyperparameters, score and status.

    ``published`` (pbt: the final winner's lineage) is marked when it is not the best trial.
    """
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    header = ["trial", *keys, "beta", metric, "status"]
    lines = [f"# Iteration {iteration}: {len(rows)} trials, ranked by held-out {metric}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = "failed: " + (row.error or "no score") if not row.ok else ""
        if row.trial_id == winner.trial_id:
            status = "**winner**"
        if published is not None and row.trial_id == published.trial_id and published.trial_id != winner.trial_id:
            status = (status + " published").strip()
        cells = [row.trial_id, *(fmt(row.params.get(key)) for key in keys), fmt(row.beta),
                 fmt(row.score) if row.score is not None else "-", status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = published or winner
    lines += ["", f"Winner: trial {winner.trial_id}, {metric} = {fmt(winner.score)}.",
              f"Published as {RunDir.model(iteration)}: trial {chosen.trial_id} ({chosen.model})."]
    return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """A value of a table cell or a message: floats with 6 significant digits, None as ``-``."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={fmt(value)}" for key, value in params.items())


def plot_beta_vs_metric(rows: Sequence[TrialRow], winner: TrialRow, metric: str, iteration: int,
                        out_path: str | Path) -> Path:
    """Scatter plot of each scored trial's ``metric`` against its beta; the winner is starred."""
    from matplotlib.figure import Figure

    scored = [row for row in rows if row.ok and row.beta is not None]
    figure = Figure(figsize=(5.0, 3.5), dpi=100, layout="constrained")
    axis = figure.subplots()
    axis.scatter([row.beta for row in scored], [row.score for row in scored], label="trials")
    if winner.beta is not None:
        axis.scatter([winner.beta], [winner.score], marker="*", s=200, color="tab:red", label="winner")
    betas = [row.beta for row in scored if row.beta > 0]
    if betas and max(betas) / min(betas) >= 10:
        axis.set_xscale("log")
    axis.set_xlabel("beta")
    axis.set_ylabel(f"held-out {metric}")
    axis.set_title(f"iteration {iteration}: {metric} vs beta")
    axis.legend(fontsize=8)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_iteration_report(rundir: RunDir, k: int, rows: Sequence[TrialRow], best: TrialRow,
                           published: TrialRow, metric: str) -> None:
    """Iteration k's table, plot and winner record; ``published`` is the trial whose model
    becomes theta_k (pbt: the final winner's lineage, which need not be ``best``)."""
    with tempfile.TemporaryDirectory() as tmp:
        table = trials_markdown(rows, best, metric, k, published=published)
        plot = plot_beta_vs_metric(rows, best, metric, k, Path(tmp) / "plot.png")
        rundir.write_text_atomic(rundir.sweep_trials_table(k), table)
        rundir.upload_file(plot, rundir.sweep_beta_plot(k))
    rundir.write_json_atomic(rundir.sweep_winner(k), {
        **row_json(published), "iteration": k, "metric": metric, "published": rundir.model(k),
        "best_trial": best.trial_id, "best_score": best.score,
        "trials": [row_json(row) for row in rows],
    })
