"""The report's text files: metrics.json (every number, for programs) and report.md (for people).

Every function takes plain data (the records of :mod:`spin_ray.eval.metrics`, dicts) and a
local output directory, and returns the path it wrote. report.md ties the report's files
together: its tables, then links to the figures (:mod:`spin_ray.eval.plots`,
:mod:`spin_ray.eval.image_grid`) with their captions.

With a single scorer the Average column repeats that scorer, so report.md, metrics.png and
the plots leave it out (:func:`spin_ray.eval.metrics.drop_redundant_average`); metrics.json
keeps every column for programs that read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spin_ray.eval.metrics import BOOTSTRAP_RESAMPLES, Summary, WinRate, drop_redundant_average, metric_names
from spin_ray.eval.plots import METRICS_PLOT, plot_metrics

METRICS_JSON = "metrics.json"
REPORT_MARKDOWN = "report.md"
METRICS_PLOT_CAPTION = "every model's mean per metric (bars from 0, 95% intervals)"
TOY_REWARD_NOTE = (
    "**What the `toy` score means.** The toy reward (`spin_ray/toy/reward.py`) is a fixed, analytic judge: "
    "no learned weights, never trained, and no part of training. From the pixels alone it checks each "
    "attribute the prompt names: the background colour, the shape's colour, the shape, and (when the prompt "
    "names them) its size and its position. Each check is a soft probability in [0, 1]; the score is their "
    "geometric mean, so it lies between 0 and 1. **1 means the image matches every attribute of the prompt**; "
    "one clearly wrong attribute pulls the score towards 0. Real renderings of the prompts (the first row of "
    "the image grid) typically score above 0.9."
)


def _write_text_atomically(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


# ----------------------------------------------------------------------------- json + markdown


def write_metrics_json(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics.json``: ``{"summaries": {model: {metric: {"mean", "median", "std", "n",
    "ci_low", "ci_high"}}}, "baseline": ..., "win_rates": {model: {metric: {"win_rate",
    "tie_share", "num_prompts"}}}, "metadata": {...}}``. Every column is kept (the Average
    too); a Summary's fields that are None (no interval computed) are left out."""
    payload: dict[str, Any] = {
        "summaries": {model: {metric: _summary_dict(s) for metric, s in row.items()}
                      for model, row in summaries.items()},
        "baseline": baseline,
        "win_rates": {
            model: {metric: asdict(rate) for metric, rate in row.items()} for model, row in (win_rates or {}).items()
        },
        "metadata": dict(metadata or {}),
    }
    return _write_text_atomically(Path(out_dir) / METRICS_JSON, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _summary_dict(summary: Summary) -> dict[str, Any]:
    return {key: value for key, value in asdict(summary).items() if value is not None}


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_tables_markdown(summaries: Mapping[str, Mapping[str, Summary]]) -> str:
    """Table 1 of the paper: a Mean and a Median table, rows = models, columns = metrics
    (their Average column included), four decimals."""
    metrics = metric_names(summaries)
    sections = []
    for statistic in ("mean", "median"):
        rows = [[model] + [f"{getattr(row[m], statistic):.4f}" for m in metrics] for model, row in summaries.items()]
        sections.append(f"## {statistic.capitalize()}\n\n" + _markdown_table(["model", *metrics], rows))
    return "\n\n".join(sections)


def win_rate_tables_markdown(win_rates: Mapping[str, Mapping[str, WinRate]], baseline: str) -> str:
    """Win rates (ties count half) and tie shares against ``baseline``, in percent, one decimal."""
    metrics = metric_names(win_rates)
    sections = []
    for field, title in (("win_rate", "Win rate"), ("tie_share", "Ties")):
        rows = [
            [model] + [f"{100 * getattr(row[m], field):.1f}" for m in metrics] for model, row in win_rates.items()
        ]
        note = " (%, ties count half)" if field == "win_rate" else " (%)"
        sections.append(f"## {title} against {baseline}{note}\n\n" + _markdown_table(["model", *metrics], rows))
    return "\n\n".join(sections)


def _interval_cell(summary: Summary) -> str:
    if summary.ci_low is None or summary.ci_high is None:
        return f"{summary.mean:.4f}"
    return f"{summary.mean:.4f} [{summary.ci_low:.4f}, {summary.ci_high:.4f}]"


def interval_table_markdown(summaries: Mapping[str, Mapping[str, Summary]]) -> str:
    """Rows = models; per metric the mean with its 95% bootstrap interval and the std over
    prompts; then n, the number of prompts the statistics are over."""
    metrics = metric_names(summaries)
    header = ["model"] + [f"{m} {label}" for m in metrics for label in ("mean [95% interval]", "std")] + ["n"]
    rows = []
    for model, row in summaries.items():
        cells = [model]
        for metric in metrics:
            summary = row[metric]
            cells += [_interval_cell(summary), "-" if summary.std is None else f"{summary.std:.4f}"]
        first = row[metrics[0]]
        rows.append([*cells, "-" if first.n is None else str(first.n)])
    return ("## Mean with 95% interval (bootstrap over prompts)\n\n" + _markdown_table(header, rows))


def setup_markdown(metadata: Mapping[str, Any], baseline: str | None) -> str:
    """One paragraph: what the numbers are over (P prompts x N images, best-of-N)."""
    prompts, images = metadata.get("num_prompts"), metadata.get("num_images_per_prompt")
    if prompts is None or images is None:
        return ""
    judge = "its score" if len(metadata.get("scorers") or []) == 1 else "the average over the scorers"
    text = (f"**n = {prompts} prompts x {images} images per prompt** (same seeds for every model). Per prompt, "
            f"each model's best of its {images} images (best-of-{images}, by {judge}) is scored, so every "
            f"statistic below is over n = {prompts} values. The 95% interval of a mean is a percentile bootstrap "
            f"over prompts ({BOOTSTRAP_RESAMPLES} resamples); std is the spread of the per-prompt scores.")
    if metadata.get("prompt_set"):
        text += f" Prompt set: `{metadata['prompt_set']}`."
    if baseline:
        text += f" Win rates are against `{baseline}`."
    return text


def figures_markdown(figures: Mapping[str, str]) -> str:
    """``## Figures``: file name (relative to report.md) -> caption, each as an inline image."""
    items = [f"**{name}**: {caption}.\n\n![{name}]({name})" for name, caption in figures.items()]
    return "## Figures\n\n" + "\n\n".join(items)


def write_markdown_report(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    title: str = "Evaluation",
    metadata: Mapping[str, Any] | None = None,
    figures: Mapping[str, str] | None = None,
) -> Path:
    """Write ``report.md``: what the toy score means (when a metric is ``toy``), n and the
    best-of-N protocol (from ``metadata``), the means with 95% intervals, links to the
    ``figures`` (file name -> caption), the Mean/Median tables and, given a baseline, the
    win-rate tables. Columns are the given ones (see :func:`write_report` for dropping a
    redundant Average)."""
    metrics = metric_names(summaries)
    parts = [f"# {title}"]
    if "toy" in metrics:
        parts.append(TOY_REWARD_NOTE)
    setup = setup_markdown(metadata or {}, baseline if win_rates else None)
    parts += [setup] if setup else []
    parts.append(interval_table_markdown(summaries))
    if figures:
        parts.append(figures_markdown(figures))
    parts.append(summary_tables_markdown(summaries))
    if win_rates:
        if baseline is None:
            raise ValueError("write_markdown_report: win_rates given without the baseline's name")
        parts.append(win_rate_tables_markdown(win_rates, baseline))
    return _write_text_atomically(Path(out_dir) / REPORT_MARKDOWN, "\n\n".join(parts) + "\n")


def write_report(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    figures: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write metrics.json (every column), metrics.png and report.md (without the Average
    column when there is one scorer); returns name -> path.

    ``figures``: other files already in ``out_dir`` that report.md links to, file name ->
    caption, in display order; metrics.png is added after them unless listed.
    """
    shown = drop_redundant_average(summaries)
    shown_rates = drop_redundant_average(win_rates) if win_rates else win_rates
    paths = {
        "metrics_json": write_metrics_json(out_dir, summaries, win_rates, baseline, metadata),
        "metrics_plot": plot_metrics(out_dir, shown),
    }
    linked = dict(figures or {})
    linked.setdefault(METRICS_PLOT, METRICS_PLOT_CAPTION)
    paths["markdown"] = write_markdown_report(out_dir, shown, shown_rates, baseline, metadata=metadata,
                                              figures=linked)
    return paths
