"""Config sections for experiment tracking and publishing (``tracking.*``, ``publish.*``).

Part of the schema of :mod:`spin_ray.config` (which includes them in :class:`Config`); kept apart
so that the schema module stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TrackerName = Literal["tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers that receive the training, generation and evaluation metrics."""

    backends: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    """Any subset of ``tensorboard`` (event files under ``<run_dir>/logs/``), ``mlflow`` and
    ``wandb``; an empty list turns tracking off."""
    uri: str | None = None
    """MLflow tracking URI (``http://host:5000``, ``file:...``); null: MLflow's own default."""
    project: str = "spin-ray"
    """wandb project."""
    experiment: str | None = None
    """MLflow experiment name; null: ``project``."""
    run_name: str | None = None
    """Name of the job's tracker run; null: the run directory's name."""


@dataclass(frozen=True)
class PublishConfig:
    """Where finished models go besides the run directory."""

    hub_repo_id: str | None = None
    """A Hugging Face Hub repository (``user/name``) that each finished model directory is
    uploaded to, with its model card, at the end of its stage (a failure is reported and the local
    copy stays); null: no upload."""
