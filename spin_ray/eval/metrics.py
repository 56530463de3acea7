"""The evaluation protocol's arithmetic (SPIN-Diffusion, Yuan et al. 2024, Sec. 5, Table 1).

Each model generates N images per prompt (same seeds for every model); every scorer scores
every image, giving ``scores[model][scorer]`` of shape (P prompts, N images). Then:

- best-of-N: per prompt, the image with the highest average over the scorers;
- the table: each scorer's mean and median over the chosen images, plus an Average column,
  the plain mean of the scorers' statistics (the paper's: for SD-1.5,
  (0.2699 + 5.7691 + 0.8159 + 21.1983) / 4 = 7.0133);
- win rates against a baseline model, per scorer and on the per-prompt average;
- how sure the means are: std, n and a percentile-bootstrap 95% interval over prompts.

Pure numpy: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

AVERAGE = "average"
"""Name of the Average column (the plain mean over scorers)."""
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

T = TypeVar("T")


@dataclass(frozen=True)
class Summary:
    """One metric's statistics over prompts.

    The fields after ``median`` default to None (a Summary built from mean and median
    alone, e.g. read back from an older metrics.json); :func:`summarise` fills them.
    """

    mean: float
    median: float
    std: float | None = None
    """Sample standard deviation (ddof=1; 0 for one value) of the per-prompt scores."""
    n: int | None = None
    """Number of values (prompts) the statistics are over."""
    ci_low: float | None = None
    """Lower end of the 95% percentile-bootstrap interval of the mean (resampling prompts)."""
    ci_high: float | None = None
    """Upper end of that interval."""


@dataclass(frozen=True)
class MeanInterval:
    """A mean with its spread and a bootstrap interval; see :func:`bootstrap_mean_interval`."""

    mean: float
    low: float
    high: float
    std: float
    n: int


@dataclass(frozen=True)
class WinRate:
    """How often a model's image beats the baseline's image for the same prompt."""

    win_rate: float
    """Share of prompts where the model scores higher; a tie counts as half a win."""
    tie_share: float
    """Share of prompts where both score exactly the same."""
    num_prompts: int


@dataclass(frozen=True)
class ModelEvaluation:
    """A model's best-of-N choice and its table row."""

    best_indices: np.ndarray
    """(P,) int64: index of the chosen image per prompt."""
    best_scores: dict[str, np.ndarray]
    """scorer -> (P,) scores of the chosen images."""
    summary: dict[str, Summary]
    """scorer (and ``average``) -> mean, median, std, n and 95% interval over prompts."""


def bootstrap_mean_interval(
    values: np.ndarray,
    num_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> MeanInterval:
    """Mean of ``values`` with a percentile-bootstrap interval, resampling values (prompts)
    with replacement.

    The prompts are the unit of sampling: a model's best-of-N scores differ from prompt to
    prompt far more than between reruns, so the interval says how much the mean would move
    on another prompt set of the same size. Deterministic in ``seed``; for a given seed and
    number of values every call draws the same resamples, so the intervals of two models
    (or two metrics) on the same prompts are paired.

    Args:
        values: (P,) one score per prompt (any shape is flattened); at least one value.
        num_resamples: bootstrap resamples (1000 gives the 2.5/97.5 percentiles to ~0.1 std).
        confidence: the interval's coverage, in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        mean, interval [low, high] (widened to contain the mean, so error bars are never
        negative), sample std (ddof=1; 0 for one value) and n.
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"bootstrap_mean_interval: expected at least one finite value, got {array.size} values")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"bootstrap_mean_interval: confidence {confidence} must be in (0, 1) and "
                         f"num_resamples {num_resamples} at least 1")
    mean = float(array.mean())
    indices = np.random.default_rng(seed).integers(0, array.size, size=(num_resamples, array.size))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(array[indices].mean(axis=1), [tail, 100 - tail])
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return MeanInterval(mean, min(float(low), mean), max(float(high), mean), std, int(array.size))


def _summary(values: np.ndarray, mean: float | None = None, median: float | None = None) -> Summary:
    """Summary of (P,) values; ``mean``/``median`` override the plain statistics (Average column)."""
    interval = bootstrap_mean_interval(values)
    return Summary(
        mean=interval.mean if mean is None else mean,
        median=float(np.median(values)) if median is None else median,
        std=interval.std, n=interval.n, ci_low=interval.low, ci_high=interval.high,
    )


def metric_names(table: Mapping[str, Mapping[str, object]]) -> list[str]:
    """The metrics of a model -> metric -> value table, in the first model's order; every
    model must have the same metrics in the same order."""
    if not table:
        raise ValueError("report: no models given; expected model -> metric -> value")
    names = list(next(iter(table.values())))
    for model, row in table.items():
        if list(row) != names:
            raise ValueError(f"report: model {model!r} has metrics {list(row)}; expected {names} like the first model")
    return names


def drop_redundant_average(table: Mapping[str, Mapping[str, T]]) -> dict[str, dict[str, T]]:
    """model -> metric -> value without the Average column when there is only one scorer
    (then it repeats that scorer's numbers); unchanged (copied) otherwise."""
    metrics = metric_names(table)
    if len(metrics) == 2 and AVERAGE in metrics:
        return {model: {m: v for m, v in row.items() if m != AVERAGE} for model, row in table.items()}
    return {model: dict(row) for model, row in table.items()}


def _check_scores(scores_by_scorer: Mapping[str, np.ndarray], ndim: int | None, what: str) -> dict[str, np.ndarray]:
    """Validate that every scorer's array has the same shape (with ``ndim`` dims unless None) and is finite."""
    if not scores_by_scorer:
        raise ValueError(f"{what}: no scorers given; expected a mapping scorer -> scores")
    if AVERAGE in scores_by_scorer:
        raise ValueError(f"{what}: a scorer may not be named {AVERAGE!r} (the Average column's name)")
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in scores_by_scorer.items()}
    shapes = {name: array.shape for name, array in arrays.items()}
    first = next(iter(shapes.values()))
    for name, shape in shapes.items():
        if ndim is not None and len(shape) != ndim:
            raise ValueError(f"{what}: scores of {name!r} have shape {shape}; expected {ndim} dims")
        if shape != first:
            raise ValueError(f"{what}: scorers disagree on the shape: {shapes}")
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"{what}: scores of {name!r} contain NaN or inf")
    return arrays


def average_scores(scores_by_scorer: Mapping[str, np.ndarray], normalise: bool = False) -> np.ndarray:
    """Per-image average over scorers.

    Args:
        scores_by_scorer: scorer -> scores of any shape, the same for every scorer (e.g. (P, N)).
        normalise: z-score each scorer over all its entries first, so that PickScore (~21)
            does not outweigh HPS (~0.27); a scorer with zero spread contributes zeros.
            Off by default: the paper averages the raw scores.

    Returns:
        the average, same shape as the inputs.
    """
    arrays = list(_check_scores(scores_by_scorer, None, "average").values())
    if normalise:
        arrays = [_z_score(array) for array in arrays]
    return np.mean(np.stack(arrays), axis=0)


def _z_score(array: np.ndarray) -> np.ndarray:
    spread = array.std()
    return (array - array.mean()) / spread if spread > 0 else np.zeros_like(array)


def best_of_n(scores_by_scorer: Mapping[str, np.ndarray], normalise: bool = False) -> np.ndarray:
    """Choose, per prompt, the image with the highest average score.

    Args:
        scores_by_scorer: scorer -> (P, N) scores.
        normalise: average z-scores instead of raw scores (see :func:`average_scores`).

    Returns:
        (P,) int64 indices into N; on a tie the first such image wins.
    """
    _check_scores(scores_by_scorer, 2, "best_of_n")
    return np.argmax(average_scores(scores_by_scorer, normalise), axis=1).astype(np.int64)


def select(scores_by_scorer: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """scorer -> (P, N) and (P,) indices -> scorer -> (P,) scores of the chosen images."""
    arrays = _check_scores(scores_by_scorer, 2, "select")
    num_prompts = next(iter(arrays.values())).shape[0]
    indices = np.asarray(indices)
    if indices.shape != (num_prompts,):
        raise ValueError(f"select: indices have shape {indices.shape}; expected ({num_prompts},), one per prompt")
    rows = np.arange(num_prompts)
    return {name: array[rows, indices] for name, array in arrays.items()}


def summarise(scores_by_scorer: Mapping[str, np.ndarray]) -> dict[str, Summary]:
    """Each scorer's statistics over all its entries, plus the Average column.

    Args:
        scorer -> scores, typically (P,) for the best-of-N images (any shape is flattened).

    Returns:
        scorer -> Summary (mean, median, std, n, bootstrap 95% interval of the mean), and
        ``average`` -> Summary whose mean is the plain mean of the scorers' means and whose
        median is the plain mean of their medians (the paper's Average column averages each
        statistic across the metrics); its std and interval are those of the per-entry plain
        average over scorers, whose mean is that same mean.
    """
    arrays = _check_scores(scores_by_scorer, None, "summarise")
    summary = {name: _summary(array.reshape(-1)) for name, array in arrays.items()}
    summary[AVERAGE] = _summary(
        np.mean(np.stack([array.reshape(-1) for array in arrays.values()]), axis=0),
        mean=float(np.mean([s.mean for s in summary.values()])),
        median=float(np.mean([s.median for s in summary.values()])),
    )
    return summary


def win_rate(model_scores: np.ndarray, baseline_scores: np.ndarray) -> float:
    """Share of prompts where the model's image scores higher than the baseline's.

    A tie (exactly equal scores) counts as half a win, so two identical models get 0.5.

    Args:
        model_scores: (P,) one score per prompt.
        baseline_scores: (P,) the baseline's score for the same prompts.
    """
    model, baseline = _paired(model_scores, baseline_scores)
    return float(np.mean((model > baseline) + 0.5 * (model == baseline)))


def tie_share(model_scores: np.ndarray, baseline_scores: np.ndarray) -> float:
    """Share of prompts where both images score exactly the same; (P,) and (P,) -> float."""
    model, baseline = _paired(model_scores, baseline_scores)
    return float(np.mean(model == baseline))


def _paired(model_scores: np.ndarray, baseline_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, baseline = np.asarray(model_scores), np.asarray(baseline_scores)
    if model.ndim != 1 or model.shape != baseline.shape or model.size == 0:
        raise ValueError(
            f"win rate: model scores {model.shape} and baseline scores {baseline.shape}; "
            "expected two non-empty (P,) arrays over the same prompts"
        )
    return model, baseline


def win_rates(
    model_by_scorer: Mapping[str, np.ndarray], baseline_by_scorer: Mapping[str, np.ndarray]
) -> dict[str, WinRate]:
    """Win rate per scorer and on the per-prompt plain average over scorers (``average``).

    Args:
        model_by_scorer: scorer -> (P,) the model's (best-of-N) scores.
        baseline_by_scorer: scorer -> (P,) the baseline's scores for the same prompts.
    """
    model = _check_scores(model_by_scorer, 1, "win_rates (model)")
    baseline = _check_scores(baseline_by_scorer, 1, "win_rates (baseline)")
    if set(model) != set(baseline):
        raise ValueError(f"win_rates: model scorers {sorted(model)} differ from baseline scorers {sorted(baseline)}")
    model[AVERAGE] = average_scores(model_by_scorer)
    baseline[AVERAGE] = average_scores(baseline_by_scorer)
    return {
        name: WinRate(win_rate(model[name], baseline[name]), tie_share(model[name], baseline[name]), len(model[name]))
        for name in model
    }


def evaluate_models(
    scores: Mapping[str, Mapping[str, np.ndarray]], normalise: bool = False
) -> dict[str, ModelEvaluation]:
    """Best-of-N and the table row for every model.

    Args:
        scores: model -> scorer -> (P, N) scores, the same prompts and scorers for every model.
        normalise: choose the best image by the z-scored average (see :func:`average_scores`).
    """
    evaluations = {}
    for model, by_scorer in scores.items():
        indices = best_of_n(by_scorer, normalise)
        chosen = select(by_scorer, indices)
        evaluations[model] = ModelEvaluation(indices, chosen, summarise(chosen))
    return evaluations


def win_rates_against(evaluations: Mapping[str, ModelEvaluation], baseline: str) -> dict[str, dict[str, WinRate]]:
    """model -> metric -> WinRate of each model's best-of-N images against ``baseline``'s.

    The baseline itself is left out.
    """
    if baseline not in evaluations:
        raise ValueError(f"baseline model {baseline!r} was not evaluated; evaluated: {sorted(evaluations)}")
    reference = evaluations[baseline].best_scores
    return {
        model: win_rates(evaluation.best_scores, reference)
        for model, evaluation in evaluations.items()
        if model != baseline
    }
