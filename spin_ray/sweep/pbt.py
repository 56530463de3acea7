"""Population-based self-play (``sweep.mode: pbt``).

Each trial runs the whole self-play loop and reports the held-out score after every iteration
with a checkpoint (a pointer to its model). Ray Tune's ``PopulationBasedTraining``
(synchronous) replaces the worst trials by clones of the best: a clone continues from the
winner's model, which becomes its next opponent, with perturbed hyperparameters. The final
winner's lineage is published as iterations 1 ... K (:mod:`spin_ray.sweep.publish`).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

from spin_ray.config import with_overrides
from spin_ray.run_layout import iteration_number
from spin_ray.rundir import RunDir
from spin_ray.stages import run_stage
from spin_ray.sweep.config import SweepError
from spin_ray.sweep.context import SweepContext, ensure_shared_opponents
from spin_ray.sweep.publish import publish_winner
from spin_ray.sweep.summary import write_iteration_report
from spin_ray.sweep.trials import (
    ITERATION_KEY,
    TrialRow,
    lineage_chain,
    plain_params,
    report_metrics,
    row_from_json,
    score_and_record,
    select_winner,
)
from spin_ray.sweep.tuner import quiet_data_progress, run_tuner


def run_pbt(shared: SweepContext) -> dict[int, TrialRow]:
    """Every trial runs the self-play loop; PBT clones the best; the final winner's lineage is published."""
    cfg, rundir, sweep = shared.cfg, shared.rundir, shared.sweep
    iterations = cfg.self_play.iterations
    if not rundir.is_done(rundir.PBT):
        _run_population(shared)
    rows_by_iteration = pbt_rows(rundir)
    missing = [k for k in range(1, iterations + 1) if not rows_by_iteration.get(k)]
    if missing:
        raise SweepError(f"pbt: no trial finished iterations {missing}; see {rundir.path(rundir.PBT)}")
    best = {k: select_winner(rows_by_iteration[k]) for k in range(1, iterations + 1)}
    chain = lineage_chain(rows_by_iteration, best[iterations], iterations)
    for k in range(1, iterations + 1):
        write_iteration_report(rundir, k, rows_by_iteration[k], best[k], chain[k], sweep.metric)
        publish_winner(shared, k, chain[k])
    rundir.mark_done(rundir.PBT, {"winner": chain[iterations].trial_id, "score": chain[iterations].score})
    return chain


def _run_population(shared: SweepContext) -> None:
    """The Tune experiment: theta_0's opponents once for all trials, then the population under PBT."""
    from ray.tune.schedulers import PopulationBasedTraining

    sweep = shared.sweep
    ensure_shared_opponents(shared, shared.rundir.PBT_OPPONENTS, RunDir.BASE, 1)
    scheduler = PopulationBasedTraining(
        time_attr=ITERATION_KEY, metric=sweep.metric, mode="max",
        perturbation_interval=sweep.perturbation_interval,
        hyperparam_mutations={key: dim.to_mutation() for key, dim in sweep.space.items()},
        quantile_fraction=sweep.quantile_fraction, resample_probability=sweep.resample_probability,
        synch=True,
    )
    # PBT draws whom to clone and how to perturb from Python's global random module.
    random.seed(sweep.seed)
    run_tuner(_pbt_trial, shared, storage_rel=shared.rundir.PBT, scheduler=scheduler,
              param_space={key: dim.to_tune() for key, dim in sweep.space.items()},
              stop={ITERATION_KEY: shared.cfg.self_play.iterations})


def pbt_rows(rundir: RunDir) -> dict[int, list[TrialRow]]:
    """Iteration -> the scored stages of every PBT trial (each trial iteration's score file,
    :meth:`~spin_ray.run_layout.RunLayout.pbt_scores_glob`)."""
    rows: dict[int, list[TrialRow]] = {}
    for rel in rundir.glob(rundir.pbt_scores_glob()):
        k = iteration_number(rel.rstrip("/").split("/")[-2])
        if k is not None:
            rows.setdefault(k, []).append(row_from_json(rundir.read_json(rel)))
    return {k: sorted(found, key=lambda row: row.trial_id) for k, found in sorted(rows.items())}


def _pbt_trial(config: dict[str, Any], shared: SweepContext) -> None:
    """Ray Tune trainable: self-play from the last checkpoint (its own, or a clone's) to the end,
    reporting the held-out score and a pointer to the model after every iteration."""
    from ray import tune

    quiet_data_progress()
    params, rundir = plain_params(config), shared.rundir
    trial_id = tune.get_context().get_trial_id()
    cfg = with_overrides(shared.cfg, params)
    done, opponent_rel = _restore_pointer(tune.get_checkpoint())
    for k in range(done + 1, cfg.self_play.iterations + 1):
        stage = rundir.pbt_trial(trial_id, k)
        _claim_stage(rundir, stage, {"opponent": opponent_rel, "params": params})
        run_stage(cfg, rundir, stage, model_path=shared.model_path(opponent_rel),
                  base_model=shared.base_model, prepared=shared.prepared, iteration=k, loss_type=cfg.loss.type,
                  opponents_rel=rundir.PBT_OPPONENTS if k == 1 else None)
        row = score_and_record(cfg, rundir, stage, trial_id=trial_id, params=params, opponent_rel=opponent_rel,
                               k=k, metric=shared.sweep.metric)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / rundir.POINTER_FILE).write_text(json.dumps({"iteration": k, "model": row.model,
                                                                    "trial": trial_id}))
            tune.report(report_metrics(row, shared.sweep.metric, k), checkpoint=tune.Checkpoint.from_directory(tmp))
        opponent_rel = row.model


def _restore_pointer(checkpoint: Any) -> tuple[int, str]:
    """(last finished iteration, its model) from a PBT checkpoint; (0, base) without one. After an
    exploit the checkpoint is the cloned trial's: its model is the next opponent and start."""
    if checkpoint is None:
        return 0, RunDir.BASE
    with checkpoint.as_directory() as path:
        pointer = json.loads((Path(path) / RunDir.POINTER_FILE).read_text())
    return int(pointer["iteration"]), str(pointer["model"])


def _claim_stage(rundir: RunDir, stage: str, lineage: dict[str, Any]) -> None:
    """A trial's stage dir belongs to one (opponent, hyperparameters); after an exploit the
    trial's older attempt at this iteration is moved aside, never mixed with the new one."""
    lineage = json.loads(json.dumps(lineage))
    record = rundir.stage_lineage(stage)
    if rundir.exists(stage):
        if rundir.exists(record) and rundir.read_json(record) == lineage:
            return
        rundir.set_aside(stage, "was trained from another opponent or with other hyperparameters")
    rundir.write_json_atomic(record, lineage)
