"""Trial records: one trial's result in one self-play iteration, how it is scored, and who wins.

A trial is ranked by its held-out ``sweep.metric`` (:func:`score_model`), never by its
training loss, which is not comparable across beta. Everything here but the scoring is plain
data: Ray Tune's results become :class:`TrialRow` objects, the best one wins, and PBT's final
winner is traced back through its opponents (:func:`lineage_chain`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spin_ray.config import Config, per_iteration, with_overrides
from spin_ray.rundir import RunDir
from spin_ray.stages import samples_per_iteration
from spin_ray.sweep.config import AVERAGE_METRIC, SAMPLE_KEYS, Dimension, SweepError

ITERATION_KEY = "self_play_iteration"
"""Reported with every result; PBT's time attribute."""


@dataclass(frozen=True)
class TrialRow:
    """One trial's result in one self-play iteration."""

    trial_id: str
    params: dict[str, Any]
    """The searched keys' values (dotted key -> value)."""
    score: float | None
    """Held-out ``sweep.metric``; None when the trial failed before scoring."""
    error: str | None = None
    model: str | None = None
    """Run-dir-relative directory of the trained model."""
    opponent: str | None = None
    """Run-dir-relative model directory of the opponent (``base`` for theta_0)."""
    beta: float | None = None
    """The beta this trial trained with (searched or from the config)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None and math.isfinite(self.score)


def select_winner(rows: Sequence[TrialRow]) -> TrialRow:
    """The trial with the highest score; failed trials never win; a tie goes to the first row."""
    valid = [row for row in rows if row.ok]
    if not valid:
        errors = "; ".join(f"trial {row.trial_id}: {row.error or 'no score'}" for row in rows) or "no trials ran"
        raise SweepError(f"no trial finished with a score ({errors})")
    return max(valid, key=lambda row: row.score)


def lineage_chain(rows_by_iteration: Mapping[int, Sequence[TrialRow]], final: TrialRow, iterations: int
                  ) -> dict[int, TrialRow]:
    """The models the final winner descends from: iteration k -> the row whose model was the
    opponent (and starting point) of iteration k+1's member, back to iteration 1."""
    chain = {iterations: final}
    for k in range(iterations, 1, -1):
        parent = next((row for row in rows_by_iteration.get(k - 1, []) if row.model == chain[k].opponent), None)
        if parent is None:
            raise SweepError(f"iteration {k}: the opponent {chain[k].opponent!r} of trial {chain[k].trial_id} "
                             f"is not among iteration {k - 1}'s scored models")
        chain[k - 1] = parent
    return dict(sorted(chain.items()))


def rows_from_results(results: Iterable[Any], metric: str) -> list[TrialRow]:
    """TrialRows from Ray Tune results (``ResultGrid`` items: ``path``, ``config``, ``metrics``,
    ``error``), sorted by trial id; a failed trial keeps the last line of its error (the exception)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        error = None
        if result.error is not None:
            error = (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1]
        score = metrics.get(metric) if error is None else None
        rows.append(TrialRow(
            trial_id=str(metrics.get("trial_id") or RunDir.trial_id_of(Path(result.path).name)),
            params=plain_params(dict(result.config or {})), score=None if score is None else float(score),
            error=error, model=metrics.get("model"), opponent=metrics.get("opponent"), beta=metrics.get("beta"),
        ))
    return sorted(rows, key=lambda row: row.trial_id)


def plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Tune may hand numpy scalars; the config and JSON want Python numbers."""
    return {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}


def max_samples(cfg: Config, space: Mapping[str, Dimension], iteration: int) -> int:
    """The most samples any trial of ``iteration`` trains on: the shared opponents cover it,
    and a trial that needs fewer reads a prefix (the sample table is the same prefix-wise)."""
    keys = [key for key in SAMPLE_KEYS if key in space]
    combos = itertools.product(*(space[key].values for key in keys))
    return max(samples_per_iteration(with_overrides(cfg, dict(zip(keys, combo, strict=True))), iteration)
               for combo in combos)


def trial_beta(cfg: Config, params: Mapping[str, Any], k: int) -> float:
    """The beta a trial with hyperparameters ``params`` trains iteration k with."""
    return float(per_iteration(with_overrides(cfg, dict(params)).loss.beta, k))


def report_metrics(row: TrialRow, metric: str, k: int) -> dict[str, Any]:
    """What a trial reports to Ray Tune after iteration ``k``."""
    return {metric: row.score, ITERATION_KEY: k, "model": row.model, "opponent": row.opponent, "beta": row.beta}


def row_json(row: TrialRow) -> dict[str, Any]:
    return dataclasses.asdict(row)


def row_from_json(values: Mapping[str, Any]) -> TrialRow:
    names = {f.name for f in dataclasses.fields(TrialRow)}
    return TrialRow(**{key: value for key, value in values.items() if key in names})


# ----------------------------------------------------------------------------- scoring


def score_model(cfg: Config, rundir: RunDir, eval_rel: str, model_rel: str, metric: str) -> float:
    """Held-out score of one model (higher is better).

    ``eval.num_images_per_prompt`` images for each prompt of the first ``eval.selection_prompts``
    set (validation prompts, never the report's ``eval.prompts`` unless
    ``eval.allow_selection_on_report_prompts``; at most ``eval.max_prompts``), from fixed seeds (``eval.seed``), ``eval.num_inference_steps``
    DDIM steps and ``eval.guidance_scale``; best-of-N per prompt, then the mean of ``metric``
    over prompts (the paper's protocol, :mod:`spin_ray.eval.metrics`). The Ray Data pipeline of
    :mod:`spin_ray.eval.scoring` generates and scores (on ``eval.gpus_per_actor`` GPUs); the scores
    are cached in ``eval_rel`` (:mod:`spin_ray.eval.score_cache`).
    """
    from spin_ray.eval import metrics, prompt_sets, rows, score_cache

    scorers = list(cfg.eval.scorers) if metric == AVERAGE_METRIC else [metric]
    scoring_cfg = with_overrides(cfg, {"eval.scorers": scorers})
    prompts = prompt_sets.load_prompts(prompt_sets.selection_prompt_set(cfg.eval.selection_prompts),
                                       cfg.eval.max_prompts, cfg.eval.max_prompt_file_bytes)
    table = score_cache.model_scores(scoring_cfg, rundir, eval_rel, rundir.path(model_rel), prompts)
    scores = rows.gather_scores(table.to_pydict(), scorers, len(prompts), cfg.eval.num_images_per_prompt)
    result = metrics.evaluate_models({"model": scores}, normalise=cfg.eval.normalise_average)["model"]
    return float(result.summary[metrics.AVERAGE if metric == AVERAGE_METRIC else metric].mean)


def score_and_record(cfg: Config, rundir: RunDir, stage: str, *, trial_id: str, params: dict[str, Any],
                     opponent_rel: str, k: int, metric: str) -> TrialRow:
    """Score the model trained in the trial's ``stage`` (cached in its eval folder) and record it
    in the stage's score file; ``cfg`` is the trial's config (its ``params`` applied)."""
    model_rel = rundir.stage_model(stage)
    score = score_model(cfg, rundir, rundir.stage_eval(stage), model_rel, metric)
    row = TrialRow(trial_id=trial_id, params=params, score=score, model=model_rel, opponent=opponent_rel,
                   beta=float(per_iteration(cfg.loss.beta, k)))
    rundir.write_json_atomic(rundir.stage_score(stage), {**row_json(row), "metric": metric, "iteration": k})
    return row
