"""Per-iteration search (``sweep.mode: grid``): every trial trains theta_k from the same theta_{k-1}.

For each self-play iteration k, every trial trains theta_k from theta_{k-1} with its own
hyperparameters (grid points x ``num_samples`` draws of the random keys), all reading one
shared, once-generated set of theta_{k-1}'s opponents. Each trial is scored on held-out prompts;
the best trial's model is published as iteration k's model (:mod:`spin_ray.sweep.publish`) and
is the opponent and starting point of iteration k+1. Trials that played against a theta_{k-1}
since replaced are set aside, never mixed with new ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spin_ray.config import with_overrides
from spin_ray.rundir import RunDir
from spin_ray.stages import iteration_offset, run_stage
from spin_ray.sweep.context import SweepContext, ensure_shared_opponents
from spin_ray.sweep.publish import publish_winner
from spin_ray.sweep.summary import fmt_params, write_iteration_report
from spin_ray.sweep.trials import (
    TrialRow,
    plain_params,
    report_metrics,
    row_from_json,
    rows_from_results,
    score_and_record,
    select_winner,
    trial_beta,
)
from spin_ray.sweep.tuner import quiet_data_progress, run_tuner


def search_iteration(shared: SweepContext, k: int) -> TrialRow:
    """Iteration k: trials train theta_k from theta_{k-1} on shared opponents; publish the best."""
    rundir, sweep = shared.rundir, shared.sweep
    if rundir.is_done(rundir.iteration(k)) and rundir.last_done_iteration() >= k:
        return published_row(rundir, k)
    opponent_rel = previous_model(rundir, k)
    set_aside_if_stale(rundir, k, opponent_identity(rundir, opponent_rel))
    ensure_shared_opponents(shared, rundir.sweep_opponents(k), opponent_rel, k)
    results = run_tuner(_grid_trial, shared, storage_rel=rundir.sweep_iteration(k),
                        param_space={key: dim.to_tune() for key, dim in sweep.space.items()}, iteration=k)
    # A failed trial reported nothing: its beta comes from its hyperparameters.
    rows = [row if row.beta is not None else dataclasses.replace(row, beta=trial_beta(shared.cfg, row.params, k))
            for row in rows_from_results(results, sweep.metric)]
    winner = select_winner(rows)
    write_iteration_report(rundir, k, rows, winner, winner, sweep.metric)
    publish_winner(shared, k, winner)
    print(f"[sweep] iteration {k}: trial {winner.trial_id} wins with {sweep.metric} = {winner.score:.6g} "
          f"({fmt_params(winner.params)})", flush=True)
    return winner


def previous_model(rundir: RunDir, k: int) -> str:
    """theta_{k-1}, the opponent and starting point of iteration k: the base model, then iter_<k-1>/model."""
    return rundir.BASE if k == 1 else rundir.model(k - 1)


def published_row(rundir: RunDir, k: int) -> TrialRow:
    """The winner of an already published iteration (one published by jobs/self_play.py has no sweep record)."""
    winner_rel = rundir.sweep_winner(k)
    if rundir.exists(winner_rel):
        return row_from_json(rundir.read_json(winner_rel))
    return TrialRow(trial_id="self_play", params={}, score=None, model=rundir.model(k))


def opponent_identity(rundir: RunDir, opponent_rel: str) -> dict[str, Any]:
    """Which theta_{k-1} an iteration plays against; a republished model gets a new publish id."""
    if opponent_rel == rundir.BASE:
        return {"opponent": rundir.BASE}
    return {"opponent": opponent_rel, "publish_id": rundir.read_done(opponent_rel).get("publish_id")}


def set_aside_if_stale(rundir: RunDir, k: int, identity: dict[str, Any]) -> None:
    """Trials of iteration k that played against another theta_{k-1} (an earlier iteration was
    redone) are moved aside, never deleted; the same for a stale published iter_k."""
    sweep_rel, record = rundir.sweep_iteration(k), rundir.sweep_opponent_record(k)
    if rundir.exists(sweep_rel) and (not rundir.exists(record) or rundir.read_json(record) != identity):
        rundir.set_aside(sweep_rel, f"holds trials against another opponent than {identity['opponent']}")
    if rundir.is_done(rundir.iteration(k)):
        rundir.set_aside(rundir.iteration(k), "is finished but an earlier iteration is not (it was trained "
                                              "against another opponent)")
    if not rundir.exists(record):
        rundir.write_json_atomic(record, identity)


def _grid_trial(config: dict[str, Any], shared: SweepContext, iteration: int) -> None:
    """Ray Tune trainable: train theta_k (k = ``iteration``) with this trial's hyperparameters, score it, report."""
    from ray import tune

    quiet_data_progress()
    k, params, rundir = iteration, plain_params(config), shared.rundir
    trial_id = tune.get_context().get_trial_id()
    stage = rundir.sweep_trial(k, trial_id)
    opponent_rel = previous_model(rundir, k)
    cfg = with_overrides(shared.cfg, params)
    # Every pair is already in the shared opponents folder, but the pipeline still starts its
    # generator pool: one CPU actor instead of generation.num_actors GPUs that would idle.
    idle_generator = {"generation.num_actors": 1, "generation.gpus_per_actor": 0.0}
    run_stage(with_overrides(cfg, idle_generator), rundir, stage, model_path=shared.model_path(opponent_rel),
              base_model=shared.base_model, prepared=shared.prepared, iteration=k, loss_type=cfg.loss.type,
              opponents_rel=rundir.sweep_opponents(k),
              offset=iteration_offset(shared.cfg, k))  # where the shared opponents start, whatever the trial's steps
    row = score_and_record(cfg, rundir, stage, trial_id=trial_id, params=params, opponent_rel=opponent_rel,
                           k=k, metric=shared.sweep.metric)
    tune.report(report_metrics(row, shared.sweep.metric, k))
