"""The evaluation report: scored rows in, ``<run_dir>/report/[<set>/]`` out.

:mod:`spin_ray.eval_run` generates and scores the images (one row per image, see its
pipeline); this module turns those rows into what a reader looks at: the scorer -> (P, N)
score arrays (:func:`gather_scores`), best-of-N summaries and win rates against the
baseline (arithmetic in :mod:`spin_ray.evaluation`), and the report files of
:mod:`spin_ray.report` -- metrics.json, report.md, metrics.png, the image grid (a
``real (data)`` row of toy-world renderings first for toy prompts), one plot per metric
across self-play iterations and the training curves of the stages trained in the run dir.

It is kept apart from the pipeline so that the report can be rebuilt and tested from stored
scores without Ray, torch or a model: nothing here imports them.
"""

from __future__ import annotations

import io
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

# matplotlib (spin_ray.report) and the toy world are imported where they are used.
from spin_ray import evaluation
from spin_ray.evaluation import Summary
from spin_ray.rundir import RunDir, iteration_number

if TYPE_CHECKING:
    import pyarrow as pa

    from spin_ray.config import EvalConfig
    from spin_ray.report_plots import Series

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
"""PNG bytes; kept only for the image grid's images (empty elsewhere) once scored."""
GRID_PROMPTS = 8
"""Columns (prompts) of the image grid: the first few prompts, image 0 of each."""
SPIN_SERIES = "spin"
SFT_SERIES = "sft"
SPIN_LABEL = "SPIN (iteration 0 = base)"
SFT_LABEL = "SFT baseline (same samples)"
SFT_OFFSET = 0.15
"""x offset of the SFT marker from the last iteration, so neither error bar hides the other."""
REFERENCE_ROW = "real (data)"
"""Label of the image grid's first row, the toy world's renderings of the prompts."""

_ITERATION = re.compile(r"^(?:.*_)?iter_(\d+)$")
_SFT = re.compile(r"^(?:.*_)?sft$")

SummaryTable = dict[str, dict[str, Summary]]
"""model -> metric -> Summary."""


def gather_scores(
    columns: Mapping[str, Sequence[Any]], scorers: Sequence[str], num_prompts: int, num_images: int
) -> dict[str, np.ndarray]:
    """Scored rows (any order) -> scorer -> (P, N) float32, entry [p, i] from the row with
    ``prompt_index`` p and ``image_index`` i; every (p, i) must occur exactly once."""
    missing_columns = [c for c in ("prompt_index", "image_index", *scorers) if c not in columns]
    if missing_columns:
        raise ValueError(f"scored rows lack the columns {missing_columns}; they have {sorted(columns)}")
    prompt_index = np.asarray(columns["prompt_index"], dtype=np.int64)
    image_index = np.asarray(columns["image_index"], dtype=np.int64)
    if ((prompt_index < 0) | (prompt_index >= num_prompts) | (image_index < 0) | (image_index >= num_images)).any():
        raise ValueError(f"scored rows: an index is outside {num_prompts} prompts x {num_images} images")
    counts = np.zeros((num_prompts, num_images), dtype=np.int64)
    np.add.at(counts, (prompt_index, image_index), 1)
    if (counts != 1).any():
        bad = [(int(p), int(i)) for p, i in np.argwhere(counts != 1)[:5]]
        raise ValueError(f"scored rows: (prompt_index, image_index) pairs {bad} are missing or repeated; "
                         "expected every pair exactly once")
    result = {}
    for name in scorers:
        array = np.empty((num_prompts, num_images), dtype=np.float32)
        array[prompt_index, image_index] = np.asarray(columns[name], dtype=np.float32)
        result[name] = array
    return result


def grid_images(columns: Mapping[str, Sequence[Any]], num_prompts: int) -> list[Image.Image]:
    """Image 0 of prompts 0..num_prompts-1, decoded from the rows' PNG bytes, in prompt order."""
    by_prompt = {
        int(p): raw for p, i, raw in zip(columns["prompt_index"], columns["image_index"], columns[IMAGE_COLUMN],
                                         strict=True)
        if int(i) == 0 and int(p) < num_prompts
    }
    missing = [p for p in range(num_prompts) if not by_prompt.get(p)]
    if missing:
        raise ValueError(f"scored rows: no stored image 0 for prompts {missing}")
    return [Image.open(io.BytesIO(bytes(by_prompt[p]))).convert("RGB") for p in range(num_prompts)]


def self_play_order(model_names: Sequence[str]) -> tuple[list[str], str | None] | None:
    """The self-play models in iteration order and the SFT baseline's name, or None.

    ``base`` is iteration 0 and ``iter_<k>`` (or ``<anything>_iter_<k>``) iteration k; the
    iterations must run 1..K without gaps and ``base`` must be there, else None (nothing to
    plot across iterations). The SFT baseline is a model named ``sft`` or ``<anything>_sft``.
    """
    iterations: dict[int, str] = {}
    for name in model_names:
        match = _ITERATION.match(name)
        if match:
            k = int(match.group(1))
            if k in iterations:
                return None
            iterations[k] = name
    if not iterations or "base" not in model_names or sorted(iterations) != list(range(1, len(iterations) + 1)):
        return None
    sft = next((name for name in model_names if _SFT.match(name)), None)
    return ["base", *(iterations[k] for k in sorted(iterations))], sft


def iteration_series(summaries: Mapping[str, Mapping[str, Summary]], statistic: str = "mean"
                     ) -> dict[str, dict[str, Series]]:
    """metric -> series name -> :class:`spin_ray.report_plots.Series`, the input of
    :func:`spin_ray.report.plot_over_iterations`.

    Series ``spin``: base at x = 0 and iter_k at x = k, a line. Series ``sft`` (when there is
    an SFT model): ONE marker without a line at x = K + :data:`SFT_OFFSET` (SFT is a single
    model trained on the same real samples, not a trend across iterations). For the mean,
    both carry the 95% bootstrap interval as error bars. The Average column is left out
    when there is one scorer (it would repeat it). Empty when the models are not self-play
    iterations (see :func:`self_play_order`).
    """
    order = self_play_order(list(summaries))
    if order is None:
        return {}
    spin, sft = order
    shown = evaluation.drop_redundant_average(summaries)
    series: dict[str, dict[str, Series]] = {}
    for metric in evaluation.metric_names(shown):
        values = {SPIN_SERIES: _series([shown[name][metric] for name in spin], list(range(len(spin))), statistic,
                                       SPIN_LABEL)}
        if sft is not None:
            values[SFT_SERIES] = _series([shown[sft][metric]], [len(spin) - 1 + SFT_OFFSET], statistic, SFT_LABEL,
                                         connect=False, marker="D")
        series[metric] = values
    return series


def _series(cells: Sequence[Summary], x: list[float], statistic: str, label: str, connect: bool = True,
            marker: str = "o") -> Series:
    """One plot series from Summaries: ``statistic`` as y; the 95% interval for the mean."""
    from spin_ray.report_plots import Series

    with_interval = statistic == "mean" and all(c.ci_low is not None and c.ci_high is not None for c in cells)
    return Series(x=x, y=[getattr(c, statistic) for c in cells],
                  low=[c.ci_low for c in cells] if with_interval else None,
                  high=[c.ci_high for c in cells] if with_interval else None,
                  label=label, connect=connect, marker=marker)


def reference_images(prompts: Sequence[str], resolution: int, eval_seed: int) -> list[Image.Image] | None:
    """The image grid's first row, real data: prompt p rendered by the toy world
    (:func:`spin_ray.toy.world.render`) at ``resolution`` with the seed of the models'
    image 0 of prompt p, so one fixed seed per column. None unless every prompt is a
    toy-grammar prompt (e.g. ``eval.prompts: toy``): other prompt sets have no renderer."""
    from spin_ray.eval_run import image_seed  # the pipeline's seeds; eval_run imports this module
    from spin_ray.toy.world import parse_prompt, render

    try:
        parsed = [parse_prompt(prompt) for prompt in prompts]
    except ValueError:
        return None
    return [render(toy, resolution=resolution, seed=image_seed(eval_seed, p, 0)) for p, toy in enumerate(parsed)]


def training_stage(model: str) -> str | None:
    """The run-dir stage that trained a self-play model: ``sft`` -> ``baseline_sft``,
    ``iter_<k>`` (or ``<anything>_iter_<k>``) -> ``iter_<k>``; None for other models."""
    match = _ITERATION.match(model)
    if match:
        return f"iter_{int(match.group(1))}"
    return "baseline_sft" if model == "sft" else None


def training_histories(rundir: RunDir, models: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Stage label (``sft``, ``iter_1``, ...) -> the logged training steps (``history`` of
    ``<stage>/metrics.json``, written by :func:`spin_ray.stages.run_stage`) of the models
    trained in this run dir; SFT first, then the iterations in order. Stages without a
    readable, non-empty history are left out (an evaluation-only run dir has none)."""
    stages = {stage for stage in map(training_stage, models) if stage is not None}
    histories: dict[str, list[dict[str, Any]]] = {}
    for stage in sorted(stages, key=lambda name: iteration_number(name) or 0):  # baseline_sft first
        rel = f"{stage}/metrics.json"
        try:
            history = rundir.read_json(rel).get("history") if rundir.exists(rel) else None
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: no training curves for %s (%s)", rundir.path(rel), stage, err)
            continue
        if isinstance(history, list) and history:
            histories["sft" if stage == "baseline_sft" else stage] = history
    return histories


def choose_baseline(configured: str, model_names: Sequence[str]) -> str:
    """``eval.baseline`` when it is one of the models, else the first model."""
    return configured if configured in model_names else model_names[0]


def write_report_figures(out_dir: str, rundir: RunDir, prompts: Sequence[str], columns: Mapping[str, Any],
                         summaries: SummaryTable, eval_seed: int, resolution: int) -> dict[str, str]:
    """Write the report's figures into ``out_dir``; returns file name -> caption, in the
    order report.md shows them.

    image_grid.png (a ``real (data)`` row first for toy prompts), one
    ``<metric>_over_iterations.png`` per metric for self-play models, metrics.png's place,
    and training_curves.png when the run dir holds training histories of these models.
    """
    from spin_ray import report

    count = min(GRID_PROMPTS, len(prompts))
    rows = {model: grid_images(model_columns, count) for model, model_columns in columns.items()}
    reference = reference_images(prompts[:count], resolution, eval_seed)
    if reference is not None:
        rows = {REFERENCE_ROW: reference, **rows}
    grid = report.save_image_grid(out_dir, rows, list(prompts[:count]))
    first_row = "; the first row is real data, the toy world's renderings of the prompts" if reference else ""
    figures = {grid.name: f"image 0 of the first {count} prompts, one row per model, same seed per column{first_row}"}
    for metric, series in iteration_series(summaries).items():
        path = report.plot_over_iterations(out_dir, series, metric)
        figures[path.name] = (f"{metric} across self-play iterations (base = 0, iter_k = k; the SFT baseline as "
                              "its own point; mean with 95% interval)")
    figures[report.METRICS_PLOT] = "every model's mean per metric (bars from 0, 95% intervals)"
    curves = report.plot_training_curves(out_dir, training_histories(rundir, list(columns)))
    if curves is not None:
        figures[curves.name] = "loss, implicit accuracy and reward margin over training steps, one line per stage"
    return figures


def write_prompt_set_report(eval_cfg: EvalConfig, rundir: RunDir, report_rel: str, prompt_set: str,
                            prompts: Sequence[str], tables: Mapping[str, pa.Table], models: Mapping[str, str],
                            resolution: int) -> SummaryTable:
    """Best-of-N, summaries and win rates from the scored rows; write the report files to
    ``report_rel`` (built locally, then copied into the run dir). Returns model -> metric -> Summary."""
    columns = {model: table.to_pydict() for model, table in tables.items()}
    scores = {model: gather_scores(columns[model], eval_cfg.scorers, len(prompts), eval_cfg.num_images_per_prompt)
              for model in tables}
    evaluations = evaluation.evaluate_models(scores, normalise=eval_cfg.normalise_average)
    summaries = {model: result.summary for model, result in evaluations.items()}
    baseline = choose_baseline(eval_cfg.baseline, list(tables))
    win_rates = evaluation.win_rates_against(evaluations, baseline)
    metadata = {
        "prompt_set": prompt_set, "num_prompts": len(prompts),
        "num_images_per_prompt": eval_cfg.num_images_per_prompt, "num_inference_steps": eval_cfg.num_inference_steps,
        "guidance_scale": eval_cfg.guidance_scale, "seed": eval_cfg.seed, "resolution": resolution,
        "scorers": list(eval_cfg.scorers), "normalise_average": eval_cfg.normalise_average,
        "models": dict(models),
        "best_indices": {model: result.best_indices.tolist() for model, result in evaluations.items()},
    }
    from spin_ray import report

    with tempfile.TemporaryDirectory() as tmp:
        figures = write_report_figures(tmp, rundir, prompts, columns, summaries, eval_cfg.seed, resolution)
        report.write_report(tmp, summaries, win_rates or None, baseline, metadata, figures)
        for file in sorted(Path(tmp).iterdir()):
            rundir.upload_file(file, f"{report_rel}/{file.name}")
    print(f"[eval] report for {prompt_set} ({len(prompts)} prompts x {eval_cfg.num_images_per_prompt} images): "
          f"{rundir.path(report_rel, report.REPORT_MARKDOWN)}", flush=True)
    return summaries
