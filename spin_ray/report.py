"""Evaluation reports people look at: metrics.json, markdown tables, plots, image grids.

Every function takes plain data (the records of :mod:`spin_ray.evaluation`, dicts, lists
of PIL images) and a local output directory, and returns the path it wrote. Plots use
matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no global backend
switch), so they work in headless Ray workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from spin_ray.evaluation import Summary, WinRate

METRICS_JSON = "metrics.json"
REPORT_MARKDOWN = "report.md"
METRICS_PLOT = "metrics.png"
IMAGE_GRID = "image_grid.png"
PLOT_DPI = 100
FONT_SIZE = 14


def _write_text_atomically(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def _metric_names(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Column order: the first row's metrics in their given order; every row must have them."""
    if not rows:
        raise ValueError("report: no models given; expected model -> metric -> value")
    names = list(next(iter(rows.values())))
    for model, row in rows.items():
        if list(row) != names:
            raise ValueError(f"report: model {model!r} has metrics {list(row)}; expected {names} like the first model")
    return names


# ----------------------------------------------------------------------------- json + markdown


def write_metrics_json(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics.json``: ``{"summaries": {model: {metric: {"mean", "median"}}},
    "baseline": ..., "win_rates": {model: {metric: {"win_rate", "tie_share", "num_prompts"}}},
    "metadata": {...}}``."""
    payload: dict[str, Any] = {
        "summaries": {model: {metric: asdict(s) for metric, s in row.items()} for model, row in summaries.items()},
        "baseline": baseline,
        "win_rates": {
            model: {metric: asdict(rate) for metric, rate in row.items()} for model, row in (win_rates or {}).items()
        },
        "metadata": dict(metadata or {}),
    }
    return _write_text_atomically(Path(out_dir) / METRICS_JSON, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_tables_markdown(summaries: Mapping[str, Mapping[str, Summary]]) -> str:
    """Table 1 of the paper: a Mean and a Median table, rows = models, columns = metrics
    (their Average column included), four decimals."""
    metrics = _metric_names(summaries)
    sections = []
    for statistic in ("mean", "median"):
        rows = [[model] + [f"{getattr(row[m], statistic):.4f}" for m in metrics] for model, row in summaries.items()]
        sections.append(f"## {statistic.capitalize()}\n\n" + _markdown_table(["model", *metrics], rows))
    return "\n\n".join(sections)


def win_rate_tables_markdown(win_rates: Mapping[str, Mapping[str, WinRate]], baseline: str) -> str:
    """Win rates (ties count half) and tie shares against ``baseline``, in percent, one decimal."""
    metrics = _metric_names(win_rates)
    sections = []
    for field, title in (("win_rate", "Win rate"), ("tie_share", "Ties")):
        rows = [
            [model] + [f"{100 * getattr(row[m], field):.1f}" for m in metrics] for model, row in win_rates.items()
        ]
        note = " (%, ties count half)" if field == "win_rate" else " (%)"
        sections.append(f"## {title} against {baseline}{note}\n\n" + _markdown_table(["model", *metrics], rows))
    return "\n\n".join(sections)


def write_markdown_report(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    title: str = "Evaluation",
) -> Path:
    """Write ``report.md`` with the summary tables and, given a baseline, the win-rate tables."""
    parts = [f"# {title}", summary_tables_markdown(summaries)]
    if win_rates:
        if baseline is None:
            raise ValueError("write_markdown_report: win_rates given without the baseline's name")
        parts.append(win_rate_tables_markdown(win_rates, baseline))
    return _write_text_atomically(Path(out_dir) / REPORT_MARKDOWN, "\n\n".join(parts) + "\n")


# ----------------------------------------------------------------------------- plots


def plot_metrics(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    statistic: str = "mean",
    panel_size: tuple[float, float] = (3.0, 3.5),
) -> Path:
    """Bar plot ``metrics.png``: one panel per metric (their scales differ by 100x), one bar per model.

    The image is ``panel_size`` inches per metric at 100 dpi (300 x 350 px per panel by default).
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"plot_metrics: statistic {statistic!r}; expected 'mean' or 'median'")
    metrics = _metric_names(summaries)
    models = list(summaries)
    figure = Figure(figsize=(panel_size[0] * len(metrics), panel_size[1]), dpi=PLOT_DPI, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        values = [getattr(summaries[model][metric], statistic) for model in models]
        bars = axis.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
        axis.bar_label(bars, fmt="%.4f", fontsize=7)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{metric} ({statistic})", fontsize=9)
        # Differences between models are small relative to the scores: do not start at 0.
        low, high = min(values), max(values)
        margin = (high - low) * 0.5 or abs(high) * 0.05 or 1.0
        axis.set_ylim(low - margin, high + margin)
    path = Path(out_dir) / METRICS_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_over_iterations(
    out_dir: str | Path,
    values_by_series: Mapping[str, Sequence[float]],
    metric: str,
    size: tuple[float, float] = (5.0, 3.5),
) -> Path:
    """Line plot ``{metric}_over_iterations.png`` of one metric across self-play iterations.

    Args:
        values_by_series: series name (e.g. ``spin``, ``sft``) -> value at iteration 0, 1, ...
            (iteration 0 is theta_0, the base model).
        metric: the metric's name, used in the title and the file name.
        size: inches at 100 dpi (500 x 350 px by default).
    """
    if not values_by_series:
        raise ValueError(f"plot_over_iterations: no series given for {metric!r}")
    figure = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    axis = figure.subplots()
    for name, values in values_by_series.items():
        axis.plot(range(len(values)), list(values), marker="o", label=name)
    longest = max(len(values) for values in values_by_series.values())
    axis.set_xticks(range(longest))
    axis.set_xlabel("self-play iteration")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} across iterations")
    axis.legend(fontsize=8)
    path = Path(out_dir) / f"{metric}_over_iterations.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ----------------------------------------------------------------------------- image grid


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_image_grid(
    out_dir: str | Path,
    images_by_model: Mapping[str, Sequence[Image.Image]],
    prompts: Sequence[str],
    cell_size: int = 256,
    label_width: int = 160,
    header_height: int = 40,
    filename: str = IMAGE_GRID,
) -> Path:
    """Save a grid: one row per model (labelled on the left), one column per prompt (the
    prompt above it); image j of every row was generated for prompt j with the same seed.

    Each image is scaled to fit a ``cell_size`` square (padded, not cropped). The PNG is
    ``label_width + len(prompts) * cell_size`` wide and ``header_height + len(models) * cell_size`` high.
    """
    if not images_by_model or not prompts:
        raise ValueError("save_image_grid: expected at least one model and one prompt")
    for model, images in images_by_model.items():
        if len(images) != len(prompts):
            raise ValueError(f"save_image_grid: model {model!r} has {len(images)} images for {len(prompts)} prompts")
    grid = Image.new(
        "RGB", (label_width + len(prompts) * cell_size, header_height + len(images_by_model) * cell_size), "white"
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for column, prompt in enumerate(prompts):
        x = label_width + column * cell_size
        text = _fit_text(draw, prompt, font, cell_size - 8)
        draw.text((x + 4, (header_height - FONT_SIZE) // 2), text, fill="black", font=font)
    for row, (model, images) in enumerate(images_by_model.items()):
        y = header_height + row * cell_size
        text = _fit_text(draw, model, font, label_width - 8)
        draw.text((4, y + (cell_size - FONT_SIZE) // 2), text, fill="black", font=font)
        for column, image in enumerate(images):
            cell = ImageOps.pad(image.convert("RGB"), (cell_size, cell_size), color="white")
            grid.paste(cell, (label_width + column * cell_size, y))
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_report(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
    baseline: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, report.md and metrics.png; returns name -> path."""
    return {
        "metrics_json": write_metrics_json(out_dir, summaries, win_rates, baseline, metadata),
        "markdown": write_markdown_report(out_dir, summaries, win_rates, baseline),
        "metrics_plot": plot_metrics(out_dir, summaries),
    }
