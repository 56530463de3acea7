"""Experiment tracking: TensorBoard (the default, event files under ``<run_dir>/logs/``), MLflow
and wandb (``tracking.backends``), fed from the driver (:mod:`spin_ray.tracking.tracker`).

The self-play driver's calls::

    tracker = open_tracker(cfg, rundir)          # job start (a missing package fails here)
    with tracker.stage(rel): run the stage        # each baseline and iteration
    tracker.log_evaluation()                      # after the evaluation wrote report/
    tracker.close(failed=...)                     # job end
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spin_ray.config import Config
from spin_ray.config_load import to_dict
from spin_ray.rundir import RunDir
from spin_ray.tracking import records
from spin_ray.tracking.backends import Backend, check_installed
from spin_ray.tracking.tracker import LIVE_EVERY_S, LOGS, LiveStage, Tracker

__all__ = ["LIVE_EVERY_S", "LOGS", "LiveStage", "Tracker", "check_installed", "job_params", "job_tags",
           "open_tracker"]


def job_params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat parameters (``train.lr`` -> ``"1e-05"``)."""
    return dict(records.flatten(to_dict(cfg)))


def job_tags(rundir: RunDir) -> dict[str, str]:
    """The run directory and, when the code runs from a git checkout, its commit."""
    tags = {"run_dir": rundir.path(), "spin_ray_version": _package_version()}
    commit = records.git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spin_ray")
    except PackageNotFoundError:
        return "unknown"


def open_tracker(cfg: Config, rundir: RunDir) -> Tracker:
    """The job's tracker run on ``cfg.tracking.backends`` (empty: a tracker that logs nothing).

    Raises :class:`~spin_ray.config.ConfigError` (one line) when a chosen backend's package is
    not installed.
    """
    names = list(cfg.tracking.backends)
    check_installed(names)
    run_name = cfg.tracking.run_name or os.path.basename(rundir.path().rstrip("/")) or "spin-ray"
    params, tags = (job_params(cfg), job_tags(rundir)) if names else ({}, {})
    local_logs = None
    if rundir.is_local:
        log_dir = rundir.local_path(LOGS)
    else:  # event files need a local file; they are copied to the run directory at each stage's end
        local_logs = log_dir = Path(tempfile.mkdtemp(prefix="spin-ray-logs-"))
    backends: list[Backend] = []
    for name in names:
        backends.append(_backend(name, cfg, log_dir, run_name, params, tags))
    return Tracker(backends, rundir, opponent_batch=cfg.generation.batch_size, local_logs=local_logs)


def _backend(name: str, cfg: Config, log_dir: Path, run_name: str, params: dict, tags: dict) -> Backend:
    from spin_ray.tracking import backends

    if name == "tensorboard":
        return backends.TensorBoardBackend(log_dir, params, tags)
    if name == "mlflow":
        return backends.MlflowBackend(cfg.tracking.uri, cfg.tracking.experiment or cfg.tracking.project, run_name,
                                      params, tags)
    return backends.WandbBackend(cfg.tracking.project, run_name, log_dir, params, tags)
