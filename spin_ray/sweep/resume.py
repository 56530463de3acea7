"""Resuming a sweep is opt-in (``jobs/sweep.py --resume``): issue 23, finding 2.

Ray Tune keeps an experiment's state (``tuner.pkl``, the trials' state) as pickles in the run
directory, and ``Tuner.restore`` unpickles them: whoever can write the run directory can run
code on the driver that resumes. A self-play rerun resumes from JSON markers and safetensors
only, so it stays automatic; a sweep resumes only when asked, and ``--resume`` means "I trust
this run directory" (docs/SECURITY.md). Without it, a run directory that already holds a sweep
is a one-line :class:`~spin_ray.config.ConfigError` with the hint; nothing is moved or deleted.
"""

from __future__ import annotations

import json
from typing import Any

from spin_ray.config import ConfigError
from spin_ray.rundir import RunDir

RESUME_HINT = ("rerun with --resume to continue it (Ray Tune unpickles its saved state: only for a "
               "run directory whose writers you trust) or set run_dir to a new directory")


def claim_run_dir(rundir: RunDir, signature: dict[str, Any], *, resume: bool) -> None:
    """Record the search in the run dir (:attr:`~spin_ray.run_layout.RunLayout.SWEEP_SIGNATURE`).
    A run dir that holds a sweep already is refused unless ``resume`` (and always when it holds
    another search)."""
    signature, record = json.loads(json.dumps(signature)), rundir.SWEEP_SIGNATURE
    if rundir.exists(record):
        stored = rundir.read_json(record)
        if stored != signature:
            raise ConfigError(f"sweep: {rundir.path(record)} records another search ({json.dumps(stored)}); "
                              f"resuming needs the same mode, metric, space, num_samples and seed, or a new run_dir")
        if not resume:
            raise ConfigError(f"sweep: {rundir.path()} holds a sweep already; {RESUME_HINT}")
        return
    rundir.write_json_atomic(record, signature)


def may_restore(experiment: str, *, resume: bool) -> bool:
    """Whether to ``Tuner.restore`` the Tune experiment at ``experiment``: only with ``resume``.
    Saved state without ``resume`` (``sweep.json`` was removed) is refused, never loaded."""
    from ray import tune

    if not tune.Tuner.can_restore(experiment):
        return False
    if not resume:
        raise ConfigError(f"sweep: {experiment} holds a Ray Tune experiment; {RESUME_HINT}")
    return True
