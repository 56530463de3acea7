"""The report's matplotlib figures: ``metrics.png``, ``<metric>_over_iterations.png``,
``training_curves.png`` and ``selection_curves.png``.

Every function takes plain data (Summary tables, :class:`Series`, training histories) and a
local output directory and returns the path it wrote. Plots use matplotlib's Agg canvas
through ``matplotlib.figure.Figure`` (no pyplot, no global backend switch), so they work in
headless Ray workers. Value axes do not exaggerate differences: scores in [0, 1] get a 0..1
axis, anything else an axis that includes 0 (bars always start at 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spin_ray.eval.metrics import Summary, metric_names

METRICS_PLOT = "metrics.png"
TRAINING_CURVES = "training_curves.png"
PLOT_DPI = 100
TRAINING_PANELS = (("loss", "loss (SPIN: logistic; SFT: MSE)"), ("implicit_acc", "implicit accuracy"),
                   ("margin", "reward margin"))
"""(history key, panel title) of training_curves.png; keys of :mod:`spin_ray.loss`'s metrics."""


@dataclass(frozen=True)
class Series:
    """One series of an over-iterations plot: points at x = self-play iteration.

    ``low``/``high`` are the 95% interval's ends, one per point (None: no error bars).
    ``connect=False`` draws markers only: a reference point, not a trend.
    """

    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    label: str = ""
    connect: bool = True
    marker: str = "o"

    def __post_init__(self) -> None:
        lengths = {len(self.x), len(self.y)} | {len(v) for v in (self.low, self.high) if v is not None}
        if len(lengths) != 1 or (self.low is None) != (self.high is None):
            raise ValueError(f"Series {self.label!r}: x, y, low and high need one value per point "
                             "(low and high both or neither)")


def _save(figure: Figure, out_dir: str | Path, filename: str) -> Path:
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def value_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits that show differences at their true size: (0, 1) when every value is in
    [0, 1] (a probability-like score), else a range that includes 0 with 5% headroom."""
    finite = [float(v) for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if low >= 0 and high <= 1:
        return 0.0, 1.0
    low, high = min(low, 0.0), max(high, 0.0)
    pad = 0.05 * (high - low)
    return (low - pad if low < 0 else 0.0), (high + pad if high > 0 else 0.0)


def _error_bars(summaries: Sequence[Summary]) -> list[list[float]] | None:
    """[[below...], [above...]] of each Summary's 95% interval around its mean (0 where it
    has none), or None when no Summary has an interval."""
    if all(s.ci_low is None or s.ci_high is None for s in summaries):
        return None
    below = [0.0 if s.ci_low is None else max(s.mean - s.ci_low, 0.0) for s in summaries]
    above = [0.0 if s.ci_high is None else max(s.ci_high - s.mean, 0.0) for s in summaries]
    return [below, above]


def plot_metrics(
    out_dir: str | Path,
    summaries: Mapping[str, Mapping[str, Summary]],
    statistic: str = "mean",
    panel_size: tuple[float, float] = (3.0, 3.5),
) -> Path:
    """Bar plot ``metrics.png``: one panel per metric (their scales differ by 100x), one bar
    per model, bars from 0; for the mean, the 95% bootstrap interval as error bars.

    The image is ``panel_size`` inches per metric at 100 dpi (300 x 350 px per panel by default).
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"plot_metrics: statistic {statistic!r}; expected 'mean' or 'median'")
    metrics = metric_names(summaries)
    models = list(summaries)
    figure = Figure(figsize=(panel_size[0] * len(metrics), panel_size[1]), dpi=PLOT_DPI, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        cells = [summaries[model][metric] for model in models]
        values = [getattr(cell, statistic) for cell in cells]
        errors = _error_bars(cells) if statistic == "mean" else None
        axis.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))],
                 yerr=errors, capsize=3, ecolor="black", error_kw={"linewidth": 1})
        tops = [v + (errors[1][i] if errors else 0.0) for i, v in enumerate(values)]
        for i, (value, top) in enumerate(zip(values, tops, strict=True)):
            axis.annotate(f"{value:.4f}", (i, max(top, 0.0)), xytext=(0, 2), textcoords="offset points",
                          ha="center", va="bottom", fontsize=7)
        axis.set_ylim(*value_limits([0.0, *values, *tops]))
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        interval = ", 95% interval" if errors else ""
        axis.set_title(f"{metric} ({statistic}{interval})", fontsize=9)
    return _save(figure, out_dir, METRICS_PLOT)


def _as_series(name: str, values: Series | Sequence[float]) -> Series:
    """A plain list of values is a connected series at iterations 0, 1, ..."""
    if isinstance(values, Series):
        return values if values.label else replace(values, label=name)
    return Series(x=list(range(len(values))), y=list(values), label=name)


def plot_over_iterations(
    out_dir: str | Path,
    values_by_series: Mapping[str, Series | Sequence[float]],
    metric: str,
    size: tuple[float, float] = (5.0, 3.5),
) -> Path:
    """Plot ``{metric}_over_iterations.png``: one metric across self-play iterations.

    Args:
        values_by_series: series name -> :class:`Series` (x = iteration, 0 = theta_0, the
            base model; optional 95% interval error bars; markers only when not
            ``connect``), or a plain list of values at iterations 0, 1, ...
        metric: the metric's name, used in the title, the y label and the file name.
        size: inches at 100 dpi (500 x 350 px by default).
    """
    if not values_by_series:
        raise ValueError(f"plot_over_iterations: no series given for {metric!r}")
    figure = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    axis = figure.subplots()
    all_series = [_as_series(name, values) for name, values in values_by_series.items()]
    everything: list[float] = []
    for index, series in enumerate(all_series):
        errors = None
        if series.low is not None and series.high is not None:
            errors = [[max(y - lo, 0.0) for y, lo in zip(series.y, series.low, strict=True)],
                      [max(hi - y, 0.0) for y, hi in zip(series.y, series.high, strict=True)]]
            everything += [*series.low, *series.high]
        axis.errorbar(list(series.x), list(series.y), yerr=errors, marker=series.marker, capsize=3,
                      linestyle="-" if series.connect else "none", color=f"C{index}", label=series.label,
                      markersize=6 if series.connect else 9)
        everything += list(series.y)
    iterations = range(int(max(max(series.x) for series in all_series)) + 1)
    axis.set_xticks(list(iterations), ["0\n(base)" if k == 0 else str(k) for k in iterations])
    axis.set_ylim(*value_limits(everything))
    axis.set_xlabel("self-play iteration")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} across iterations (mean, 95% interval)", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, out_dir, f"{metric}_over_iterations.png")


def _curve(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in a training history; rows without a finite value are skipped."""
    steps, values = [], []
    for index, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(float(row.get("step", index + 1)))
            values.append(float(value))
    return steps, values


def _draw_training_panel(axis: Axes, histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str,
                         title: str) -> bool:
    """One panel of training_curves.png, one line per stage; False when no stage logged ``key``."""
    drawn = False
    for index, (stage, history) in enumerate(histories.items()):
        steps, values = _curve(history, key)
        if steps:
            axis.plot(steps, values, color=f"C{index}", label=stage, linewidth=1.2)
            drawn = True
    if key == "implicit_acc":
        axis.set_ylim(-0.02, 1.02)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    elif key == "margin":
        axis.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    if not drawn:
        axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="grey")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("training step")
    if drawn:
        axis.legend(fontsize=7)
    return drawn


def plot_training_curves(
    out_dir: str | Path,
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    panel_size: tuple[float, float] = (4.0, 3.2),
) -> Path | None:
    """``training_curves.png``: loss, implicit accuracy and reward margin over training steps,
    one panel each, one line per stage (as in SPIN-Diffusion's Fig. 7).

    Args:
        histories: stage label (``sft``, ``iter_1``, ...) -> its logged steps, the
            ``history`` of ``<stage>/metrics.json`` (dicts with ``step`` and loss metrics;
            the SFT stage logs ``loss`` only, its other panels have no line for it).
        panel_size: inches per panel at 100 dpi (400 x 320 px each by default).

    Returns:
        the path, or None (nothing written) when no stage logged any of the three metrics.
    """
    if not any(_curve(history, key)[0] for history in histories.values() for key, _ in TRAINING_PANELS):
        return None
    figure = Figure(figsize=(panel_size[0] * len(TRAINING_PANELS), panel_size[1]), dpi=PLOT_DPI,
                    layout="constrained")
    axes = figure.subplots(1, len(TRAINING_PANELS), squeeze=False)[0]
    for axis, (key, title) in zip(axes, TRAINING_PANELS, strict=True):
        _draw_training_panel(axis, histories, key, title)
    return _save(figure, out_dir, TRAINING_CURVES)


SELECTION_CURVES = "selection_curves.png"


@dataclass(frozen=True)
class Curve:
    """One stage's scores on the selection prompts over training (``selection_curve.json``),
    ``steps`` already shifted by the stage's ``offset`` (iterations continue the step axis)."""

    steps: Sequence[float]
    values: Sequence[float]
    published: float | None = None
    """The step (shifted) whose checkpoint the stage published; None: not among ``steps``."""
    offset: float = 0.0


def plot_selection_curves(out_dir: str | Path, curves: Mapping[str, Curve], metric: str, prompt_set: str,
                          size: tuple[float, float] = (6.0, 3.8)) -> Path | None:
    """``selection_curves.png``: ``metric`` on the selection prompts against the training step,
    one line per stage (SPIN-Diffusion's Fig. 7); the published checkpoint of each stage is a
    star, the start of each later iteration a dotted vertical line. None (nothing written)
    when no stage has a point."""
    drawn = {label: curve for label, curve in curves.items() if curve.steps}
    if not drawn:
        return None
    figure = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    axis = figure.subplots()
    everything: list[float] = []
    for index, (label, curve) in enumerate(drawn.items()):
        axis.plot(list(curve.steps), list(curve.values), marker="o", markersize=4, color=f"C{index}", label=label,
                  linewidth=1.2)
        if curve.offset > 0:
            axis.axvline(curve.offset, color=f"C{index}", linestyle=":", linewidth=1)
        if curve.published is not None and curve.published in curve.steps:
            value = curve.values[list(curve.steps).index(curve.published)]
            axis.plot([curve.published], [value], marker="*", markersize=13, color=f"C{index}", linestyle="none")
        everything += list(curve.values)
    axis.set_ylim(*value_limits(everything))
    axis.set_xlabel("training step (each iteration continues where the one before it ended)")
    axis.set_ylabel(f"{metric} ({prompt_set})")
    axis.set_title(f"{metric} on the selection prompts during training (star: the published checkpoint)",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, out_dir, SELECTION_CURVES)
