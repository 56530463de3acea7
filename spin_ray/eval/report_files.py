"""The report's text files: metrics.json (every number, for programs) and report.md (for people).

Every function takes plain data (the records of :mod:`spin_ray.eval.metrics`, dicts) and a
local output directory, and returns the path it wrote. report.md ties the report's files
together: the paper's Tables 1-3 (mean, median, winning rate against the base; rows base,
SFT, Diffusion-DPO, SPIN-Diffusion iterations 1..K; columns HPS, Aesthetic, ImageReward,
PickScore, Average, as SPIN-Diffusion, Yuan et al. 2024, lays them out), links to the
figures (:mod:`spin_ray.eval.plots`, :mod:`spin_ray.eval.image_grid`) with their captions,
then a detail section (means with 95% intervals, std, n, ties).

With a single scorer the Average column repeats that scorer, so report.md, metrics.png and
the plots leave it out (:func:`spin_ray.eval.metrics.drop_redundant_average`); metrics.json
keeps every column for programs that read it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spin_ray.eval.metrics import (
    AVERAGE,
    BOOTSTRAP_RESAMPLES,
    Summary,
    WinRate,
    drop_redundant_average,
    metric_names,
)
from spin_ray.eval.plots import METRICS_PLOT, plot_metrics
from spin_ray.run_layout import RunLayout

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
    "tie_share", "num_prompts"}}}, "paper_tables": {"rows", "labels", "columns"}, "metadata":
    {...}}``. Every column is kept (the Average too); a Summary's fields that are None (no
    interval computed) are left out. ``paper_tables`` says how report.md lays out the paper's
    Tables 1-3: the models in row order, each row's label, the metrics in column order."""
    rows = paper_rows(list(summaries), baseline)
    payload: dict[str, Any] = {
        "summaries": {model: {metric: _summary_dict(s) for metric, s in row.items()}
                      for model, row in summaries.items()},
        "baseline": baseline,
        "win_rates": {
            model: {metric: asdict(rate) for metric, rate in row.items()} for model, row in (win_rates or {}).items()
        },
        "paper_tables": {"rows": [model for model, _ in rows], "labels": dict(rows),
                         "columns": paper_columns(metric_names(summaries))},
        "metadata": dict(metadata or {}),
    }
    return _write_text_atomically(Path(out_dir) / METRICS_JSON, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _summary_dict(summary: Summary) -> dict[str, Any]:
    return {key: value for key, value in asdict(summary).items() if value is not None}


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the paper's tables

PAPER_SCORER_ORDER = ("hpsv2", "aesthetic", "imagereward", "pickscore")
"""The paper's column order (SPIN-Diffusion, Yuan et al. 2024, Tables 1-3): HPS, Aesthetic,
ImageReward, PickScore, then Average. Other scorers (``toy``) follow in the given order,
before the Average."""
PAPER_HEADERS = {"hpsv2": "HPS", "aesthetic": "Aesthetic", "imagereward": "ImageReward", "pickscore": "PickScore",
                 AVERAGE: "Average"}
"""Column headers as the paper writes them; any other metric keeps its own name."""
_SFT_MODEL = re.compile(r"^(?:.*_)?sft$")
_DPO_MODEL = re.compile(r"^(?:.*_)?dpo$")
TABLE_MEAN = "Table 1: mean scores"
TABLE_MEDIAN = "Table 2: median scores"
TABLE_WIN_RATE = "Table 3: winning rate against {baseline} (%)"
DETAIL_INTERVALS = "Detail: mean with 95% interval (bootstrap over prompts)"
DETAIL_TIES = "Detail: ties against {baseline} (%)"


def paper_columns(metrics: Sequence[str]) -> list[str]:
    """The metrics in the paper's column order: HPS, Aesthetic, ImageReward, PickScore (those
    present), then any other metric in the given order, then the Average when present."""
    known = [m for m in PAPER_SCORER_ORDER if m in metrics]
    others = [m for m in metrics if m not in PAPER_SCORER_ORDER and m != AVERAGE]
    return known + others + ([AVERAGE] if AVERAGE in metrics else [])


def paper_rows(models: Sequence[str], baseline: str | None = None) -> list[tuple[str, str]]:
    """(model, row label) in the paper's row order: the base model (``base``, else the win
    rates' baseline), SFT (``sft`` or ``<x>_sft``), Diffusion-DPO (``dpo`` or ``<x>_dpo``),
    SPIN-Diffusion iterations 1..K (``iter_<k>`` or ``<x>_iter_<k>``, each prefix's
    iterations together, in k order), then every other model in the given order."""
    base = RunLayout.BASE if RunLayout.BASE in models else baseline if baseline in models else None
    rows: list[tuple[str, str]] = [(base, "Base")] if base is not None else []
    rest = [m for m in models if m != base]
    rows += [(m, "SFT") for m in rest if _SFT_MODEL.match(m)]
    rows += [(m, "Diffusion-DPO") for m in rest if _DPO_MODEL.match(m)]
    iterations = [m for m in rest if RunLayout.iteration_of_model(m) is not None]
    prefixes = list(dict.fromkeys(m[: m.rindex("iter_")] for m in iterations))
    iterations.sort(key=lambda m: (prefixes.index(m[: m.rindex("iter_")]), RunLayout.iteration_of_model(m)))
    rows += [(m, f"SPIN-Diffusion-Iter{RunLayout.iteration_of_model(m)}") for m in iterations]
    placed = {model for model, _ in rows}
    rows += [(m, m) for m in models if m not in placed]
    return [(model, label if label == model else f"{label} (`{model}`)") for model, label in rows]


def _paper_table(title: str, caption: str, rows: Sequence[tuple[str, str]], columns: Sequence[str],
                 cell: Callable[[str, str], str]) -> str:
    """``## title``, the caption, then a table: one row per (model, label), ``cell(model, metric)`` per column."""
    header = ["Model", *(PAPER_HEADERS.get(m, m) for m in columns)]
    body = [[label, *(cell(model, metric) for metric in columns)] for model, label in rows]
    return f"## {title}\n\n{caption}\n\n" + _markdown_table(header, body)


def paper_tables_markdown(summaries: Mapping[str, Mapping[str, Summary]],
                          win_rates: Mapping[str, Mapping[str, WinRate]] | None = None,
                          baseline: str | None = None) -> str:
    """The paper's Tables 1-3 (SPIN-Diffusion, Yuan et al. 2024): mean, median and winning
    rate against the baseline, rows in :func:`paper_rows`' order, columns in
    :func:`paper_columns`' (the Average last). Means and medians with four decimals, win
    rates in percent with one decimal; the baseline's own row in Table 3 is ``-``. No
    intervals here: they are in the detail section (:func:`interval_table_markdown`)."""
    columns = paper_columns(metric_names(summaries))
    rows = paper_rows(list(summaries), baseline)
    sections = []
    for statistic, title in (("mean", TABLE_MEAN), ("median", TABLE_MEDIAN)):
        caption = f"The {statistic} over prompts of each scorer's score of the model's best-of-N image per prompt."
        if AVERAGE in columns:
            caption += f" The Average column is the plain mean of the scorers' {statistic}s."
        sections.append(_paper_table(title, caption, rows, columns,
                                     lambda model, metric, s=statistic: f"{getattr(summaries[model][metric], s):.4f}"))
    if win_rates:
        if baseline is None:
            raise ValueError("paper_tables_markdown: win_rates given without the baseline's name")
        caption = (f"The share of prompts (%) on which the model's best-of-N image scores higher than "
                   f"`{baseline}`'s for the same prompt; a tie counts as half a win, so 50 means no difference."
                   + (" The Average column compares the per-prompt average over the scorers."
                      if AVERAGE in columns else ""))

        def win_cell(model: str, metric: str) -> str:
            return f"{100 * win_rates[model][metric].win_rate:.1f}" if model in win_rates else "-"

        sections.append(_paper_table(TABLE_WIN_RATE.format(baseline=baseline), caption, rows, columns, win_cell))
    return "\n\n".join(sections)


def ties_table_markdown(win_rates: Mapping[str, Mapping[str, WinRate]], baseline: str) -> str:
    """Detail: the share of prompts (%) on which each model ties with ``baseline``, one decimal."""
    columns = paper_columns(metric_names(win_rates))
    rows = [(model, label) for model, label in paper_rows([baseline, *win_rates], baseline) if model in win_rates]
    body = [[label, *(f"{100 * win_rates[model][m].tie_share:.1f}" for m in columns)] for model, label in rows]
    return (f"## {DETAIL_TIES.format(baseline=baseline)}\n\n"
            + _markdown_table(["Model", *(PAPER_HEADERS.get(m, m) for m in columns)], body))


def _interval_cell(summary: Summary) -> str:
    if summary.ci_low is None or summary.ci_high is None:
        return f"{summary.mean:.4f}"
    return f"{summary.mean:.4f} [{summary.ci_low:.4f}, {summary.ci_high:.4f}]"


def interval_table_markdown(summaries: Mapping[str, Mapping[str, Summary]]) -> str:
    """Detail: rows = models (by name, in the paper tables' order); per metric the mean with
    its 95% bootstrap interval and the std over prompts; then n, the number of prompts the
    statistics are over."""
    metrics = paper_columns(metric_names(summaries))
    header = ["model"] + [f"{m} {label}" for m in metrics for label in ("mean [95% interval]", "std")] + ["n"]
    rows = []
    for model, _ in paper_rows(list(summaries)):
        row = summaries[model]
        cells = [model]
        for metric in metrics:
            summary = row[metric]
            cells += [_interval_cell(summary), "-" if summary.std is None else f"{summary.std:.4f}"]
        first = row[metrics[0]]
        rows.append([*cells, "-" if first.n is None else str(first.n)])
    return f"## {DETAIL_INTERVALS}\n\n" + _markdown_table(header, rows)


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
    best-of-N protocol (from ``metadata``), the paper's Tables 1-3 (mean, median and, given a
    baseline, winning rate; :func:`paper_tables_markdown`), links to the ``figures`` (file
    name -> caption), then the detail section: means with 95% intervals, std and n, and the
    ties. Metrics are the given ones (see :func:`write_report` for dropping a redundant
    Average), in the paper's column order."""
    metrics = metric_names(summaries)
    if win_rates and baseline is None:
        raise ValueError("write_markdown_report: win_rates given without the baseline's name")
    parts = [f"# {title}"]
    if "toy" in metrics:
        parts.append(TOY_REWARD_NOTE)
    setup = setup_markdown(metadata or {}, baseline if win_rates else None)
    parts += [setup] if setup else []
    parts.append(paper_tables_markdown(summaries, win_rates, baseline))
    if figures:
        parts.append(figures_markdown(figures))
    parts.append(interval_table_markdown(summaries))
    if win_rates and baseline is not None:
        parts.append(ties_table_markdown(win_rates, baseline))
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
