"""Which figures a prompt set's report gets, and the data each is drawn from.

- ``image_grid.png`` (:mod:`spin_ray.eval.image_grid`): image 0 of the first prompts from every
  model, after a ``real (data)`` row of toy-world renderings for toy prompts;
- ``<metric>_over_iterations.png`` when the models are self-play iterations (``base``,
  ``iter_1`` .. ``iter_K``, an optional SFT baseline; :func:`self_play_order`);
- ``metrics.png``'s place among them (written with metrics.json by
  :func:`spin_ray.eval.report_files.write_report`);
- ``training_curves.png`` when the run dir holds the training histories of these models;
- ``selection_curves.png`` when their stages scored checkpoints during training
  (``train.eval_every``, :mod:`spin_ray.checkpoint_selection`): the Fig. 7 curves.

The stage that trained a model is the run layout's (:meth:`~spin_ray.run_layout.RunLayout.stage_of_model`).
matplotlib (:mod:`spin_ray.eval.plots`) and the toy world are imported where they are used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from spin_ray.eval import metrics
from spin_ray.eval.image_grid import save_image_grid
from spin_ray.eval.metrics import Summary
from spin_ray.eval.rows import GRID_PROMPTS, grid_images, image_seed
from spin_ray.run_layout import RunLayout, iteration_number
from spin_ray.rundir import RunDir

if TYPE_CHECKING:
    from spin_ray.eval.plots import Curve, Series

log = logging.getLogger(__name__)

SPIN_SERIES = "spin"
SFT_SERIES = "sft"
SPIN_LABEL = "SPIN (iteration 0 = base)"
SFT_LABEL = "SFT baseline (same samples)"
SFT_OFFSET = 0.15
"""x offset of the SFT marker from the last iteration, so neither error bar hides the other."""
DPO_SERIES = "dpo"
DPO_LABEL = "Diffusion-DPO baseline (winner/loser pairs)"
DPO_OFFSET = 0.3
"""x offset of the Diffusion-DPO marker from the last iteration (beside the SFT one)."""
REFERENCE_ROW = "real (data)"
"""Label of the image grid's first row, the toy world's renderings of the prompts."""

_SFT = re.compile(r"^(?:.*_)?sft$")
_DPO = re.compile(r"^(?:.*_)?dpo$")


def self_play_order(model_names: Sequence[str]) -> tuple[list[str], str | None] | None:
    """The self-play models in iteration order and the SFT baseline's name, or None.

    ``base`` is iteration 0 and ``iter_<k>`` (or ``<anything>_iter_<k>``) iteration k; the
    iterations must run 1..K without gaps and ``base`` must be there, else None (nothing to
    plot across iterations). The SFT baseline is a model named ``sft`` or ``<anything>_sft``.
    """
    iterations: dict[int, str] = {}
    for name in model_names:
        k = RunLayout.iteration_of_model(name)
        if k is not None:
            if k in iterations:
                return None
            iterations[k] = name
    base = RunLayout.BASE
    if not iterations or base not in model_names or sorted(iterations) != list(range(1, len(iterations) + 1)):
        return None
    sft = next((name for name in model_names if _SFT.match(name)), None)
    return [base, *(iterations[k] for k in sorted(iterations))], sft


def iteration_series(summaries: Mapping[str, Mapping[str, Summary]], statistic: str = "mean"
                     ) -> dict[str, dict[str, Series]]:
    """metric -> series name -> :class:`spin_ray.eval.plots.Series`, the input of
    :func:`spin_ray.eval.plots.plot_over_iterations`.

    Series ``spin``: base at x = 0 and iter_k at x = k, a line. Series ``sft`` (when there is
    an SFT model; likewise ``dpo`` for a model named ``dpo`` at x = K + :data:`DPO_OFFSET`):
    ONE marker without a line at x = K + :data:`SFT_OFFSET` (SFT is a single
    model trained on the same real samples, not a trend across iterations). For the mean,
    both carry the 95% bootstrap interval as error bars. The Average column is left out
    when there is one scorer (it would repeat it). Empty when the models are not self-play
    iterations (see :func:`self_play_order`).
    """
    order = self_play_order(list(summaries))
    if order is None:
        return {}
    spin, sft = order
    dpo = next((name for name in summaries if _DPO.match(name)), None)
    shown = metrics.drop_redundant_average(summaries)
    series: dict[str, dict[str, Series]] = {}
    for metric in metrics.metric_names(shown):
        values = {SPIN_SERIES: _series([shown[name][metric] for name in spin], list(range(len(spin))), statistic,
                                       SPIN_LABEL)}
        if sft is not None:
            values[SFT_SERIES] = _series([shown[sft][metric]], [len(spin) - 1 + SFT_OFFSET], statistic, SFT_LABEL,
                                         connect=False, marker="D")
        if dpo is not None:  # the Diffusion-DPO baseline, one marker beside SFT's
            values[DPO_SERIES] = _series([shown[dpo][metric]], [len(spin) - 1 + DPO_OFFSET], statistic, DPO_LABEL,
                                         connect=False, marker="s")
        series[metric] = values
    return series


def _series(cells: Sequence[Summary], x: list[float], statistic: str, label: str, connect: bool = True,
            marker: str = "o") -> Series:
    """One plot series from Summaries: ``statistic`` as y; the 95% interval for the mean."""
    from spin_ray.eval.plots import Series

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
    from spin_ray.toy.world import parse_prompt, render

    try:
        parsed = [parse_prompt(prompt) for prompt in prompts]
    except ValueError:
        return None
    return [render(toy, resolution=resolution, seed=image_seed(eval_seed, p, 0)) for p, toy in enumerate(parsed)]


def training_histories(rundir: RunDir, models: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Stage label (``sft``, ``iter_1``, ...) -> the logged training steps (``history`` of the
    stage's metrics.json, written by :func:`spin_ray.stages.run_stage`) of the models
    trained in this run dir; SFT first, then the iterations in order. Stages without a
    readable, non-empty history are left out (an evaluation-only run dir has none)."""
    histories: dict[str, list[dict[str, Any]]] = {}
    for stage in _trained_stages(rundir, models):  # the baselines first (SFT, then DPO), then the iterations
        rel = rundir.stage_metrics(stage)
        try:
            history = rundir.read_json(rel).get("history") if rundir.exists(rel) else None
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: no training curves for %s (%s)", rundir.path(rel), stage, err)
            continue
        if isinstance(history, list) and history:
            histories[rundir.model_name(stage)] = history
    return histories


def _trained_stages(rundir: RunDir, models: Sequence[str]) -> list[str]:
    """The stages of this run dir that trained ``models``: the baselines (SFT, then DPO), then
    the iterations in order."""
    stages = {stage for stage in map(rundir.stage_of_model, models) if stage is not None}
    return sorted(stages, key=lambda name: (iteration_number(name) or 0, name != RunLayout.baseline("sft")))


def _read_record(rundir: RunDir, rel: str) -> dict[str, Any] | None:
    try:
        record = rundir.read_json(rel) if rundir.exists(rel) else None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s)", rundir.path(rel), err)
        return None
    return record if isinstance(record, dict) else None


def iteration_offset_steps(rundir: RunDir, k: int) -> int:
    """Where iteration ``k`` starts on the report's step axis: the steps of iterations 1..k-1
    (each stage's metrics.json ``steps``; one without it counts 0)."""
    total = 0
    for j in range(1, k):
        record = _read_record(rundir, rundir.stage_metrics(rundir.iteration(j))) or {}
        total += int(record.get("steps") or 0)
    return total


def selection_curves(rundir: RunDir, models: Sequence[str]) -> tuple[dict[str, Curve], str, str]:
    """Stage label -> :class:`~spin_ray.eval.plots.Curve` of the stages that scored checkpoints
    (their ``selection_curve.json``), with the metric and the prompt set they were scored on;
    baselines start at step 0, iteration k at :func:`iteration_offset_steps`."""
    from spin_ray.eval.plots import Curve

    curves: dict[str, Curve] = {}
    metric, prompt_set, scorers = metrics.AVERAGE, "selection prompts", []
    for stage in _trained_stages(rundir, models):
        record = _read_record(rundir, rundir.stage_selection_curve(stage))
        if not record or not record.get("points"):
            continue
        metric, prompt_set = record.get("metric", metric), record.get("prompt_set", prompt_set)
        scorers = record.get("scorers") or scorers
        k = iteration_number(stage)
        offset = iteration_offset_steps(rundir, k) if k else 0
        points = [p for p in record["points"] if isinstance(p.get(metric), int | float)]
        published = record.get("published_step")
        curves[rundir.model_name(stage)] = Curve(
            steps=[offset + p["step"] for p in points], values=[float(p[metric]) for p in points],
            published=offset + published if isinstance(published, int) else None, offset=offset)
    if metric == metrics.AVERAGE and len(scorers) == 1:
        metric = scorers[0]  # with one scorer the average is that scorer
    return curves, metric, prompt_set


def write_report_figures(out_dir: str, rundir: RunDir, prompts: Sequence[str], columns: Mapping[str, Any],
                         summaries: Mapping[str, Mapping[str, Summary]], eval_seed: int,
                         resolution: int) -> dict[str, str]:
    """Write the report's figures into ``out_dir``; returns file name -> caption, in the
    order report.md shows them (see the module docstring; metrics.png's caption holds its place)."""
    from spin_ray.eval import plots
    from spin_ray.eval.report_files import METRICS_PLOT_CAPTION

    count = min(GRID_PROMPTS, len(prompts))
    rows = {model: grid_images(model_columns, count) for model, model_columns in columns.items()}
    reference = reference_images(prompts[:count], resolution, eval_seed)
    if reference is not None:
        rows = {REFERENCE_ROW: reference, **rows}
    grid = save_image_grid(out_dir, rows, list(prompts[:count]))
    first_row = "; the first row is real data, the toy world's renderings of the prompts" if reference else ""
    figures = {grid.name: f"image 0 of the first {count} prompts, one row per model, same seed per column{first_row}"}
    for metric, series in iteration_series(summaries).items():
        path = plots.plot_over_iterations(out_dir, series, metric)
        figures[path.name] = (f"{metric} across self-play iterations (base = 0, iter_k = k; the SFT and DPO "
                              "baselines as their own points; mean with 95% interval)")
    figures[plots.METRICS_PLOT] = METRICS_PLOT_CAPTION
    curves = plots.plot_training_curves(out_dir, training_histories(rundir, list(columns)))
    if curves is not None:
        figures[curves.name] = "loss, implicit accuracy and reward margin over training steps, one line per stage"
    selection, metric, prompt_set = selection_curves(rundir, list(columns))
    path = plots.plot_selection_curves(out_dir, selection, metric, prompt_set)
    if path is not None:
        figures[path.name] = (f"{metric} on the selection prompts ({prompt_set}) of the checkpoints scored during "
                              "training (train.eval_every), one line per stage, the published checkpoint starred "
                              "(as the paper's Fig. 7)")
    return figures
