"""Driving Ray Tune: the tuner of a sweep's trials, what each trial reserves, and restoring an experiment.

Each trial is a Ray Tune function trainable that builds and fits its own ``TorchTrainer``
(through :func:`spin_ray.stages.run_stage`, the Ray Train V2 pattern). The experiment's state
lives in the run directory (:meth:`~spin_ray.run_layout.RunLayout.tune_experiment`); restoring
it unpickles that state, so it happens only with ``--resume`` (:func:`spin_ray.sweep.resume.may_restore`).
"""

from __future__ import annotations

import math
from typing import Any

from spin_ray.rundir import RunDir
from spin_ray.sweep.config import SweepConfig, SweepError
from spin_ray.sweep.resume import may_restore


def run_tuner(trainable: Any, shared: Any, *, storage_rel: str, param_space: dict[str, Any],
              scheduler: Any = None, stop: dict[str, Any] | None = None, **parameters: Any):
    """Fit a new Tune experiment under ``storage_rel``, or restore and finish the one there.
    ``trainable`` is called with each trial's config, ``shared`` (the sweep's
    :class:`~spin_ray.sweep.context.SweepContext`) and ``parameters``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep, rundir = shared.sweep, shared.rundir
    trainable = tune.with_resources(tune.with_parameters(trainable, shared=shared, **parameters),
                                    trial_resources(sweep, head_node_resource()))
    experiment = rundir.path(rundir.tune_experiment(storage_rel))
    if may_restore(experiment, resume=shared.resume):
        print(f"[sweep] resuming the Ray Tune experiment in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=sweep.seed),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(name=rundir.TUNE, storage_path=rundir.path(storage_rel), stop=stop,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    return tuner.fit()


def _trial_name(trial: Any) -> str:
    return RunDir.trial_dir_name(trial.trial_id)


def trial_resources(sweep: SweepConfig, head_resource: str) -> dict[str, float]:
    """What each trial process reserves: ``resources_per_trial`` plus 1/max_concurrent_trials
    (rounded down to Ray's precision, 1e-4) of ``head_resource``, the ``node:<head ip>``
    resource (1.0 on the head node).

    This caps the running trials and places the light trial processes on the head node.
    Tune's own ``max_concurrent_trials`` cannot serve: it caps the trials that exist, paused
    ones included, which would shrink a PBT population to that number. ``node:__internal_head__``
    cannot serve either: Ray Train's helper actors take 0.001 of it, and would wait forever.
    """
    share = math.floor(1e4 / sweep.max_concurrent_trials) / 1e4
    return {**sweep.resources_per_trial, head_resource: share}


def head_node_resource() -> str:
    """The ``node:<ip>`` resource of the running Ray cluster's head node."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return f"node:{node['NodeManagerAddress']}"
    raise SweepError("no live head node in the Ray cluster (no node offers 'node:__internal_head__')")


def quiet_data_progress() -> None:
    """No Ray Data progress bars from a trial: those of concurrent trials would interleave in
    the driver's log (Tune's status table shows the sweep's progress)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
