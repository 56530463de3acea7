"""One class per tracker library, all with the same small surface (:class:`Backend`).

The job is one tracker run; each stage (``baseline_sft``, ``iter_1``, ...) has its own view with
its own step axis:

- TensorBoard (tensorboardX's ``SummaryWriter``, a Ray dependency): the job's event files in
  ``<run_dir>/logs/`` and each stage's in ``<run_dir>/logs/<stage>/``, so TensorBoard lists the
  stages as runs beside the job and overlays their curves.
- MLflow (``MlflowClient``, explicit run ids, no global active run): one parent run per job and
  one nested run per stage (tag ``mlflow.parentRunId``).
- wandb: one run per job; the stage's curves are keys ``<stage>/...`` plotted against their own
  step ``<stage>/step`` (``define_metric``), the job's against ``global_step``. wandb runs offline
  (files under ``<logs>/wandb/``, ``wandb sync`` uploads them) when no ``WANDB_API_KEY`` is set.

Metrics are logged as (key, value, step) with an explicit step, never "the next step", so a
history logged after live values fills their gaps instead of shifting them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from spin_ray.config import ConfigError

JOB_PREFIXES = ("train", "generation", "stage", "eval")
"""The job-level key prefixes (:mod:`spin_ray.tracking.records`)."""
PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
"""The package each backend imports (tensorboardX comes with Ray; the others with ``[tracking]``)."""


def check_installed(backends: list[str]) -> None:
    """A chosen backend whose package is missing: one-line :class:`ConfigError` saying what to install."""
    for name in backends:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"tracking.backends: {name} needs the {PACKAGES[name]} package, which is not "
                              f"installed: pip install 'spin_ray[tracking]' (or remove {name} from tracking.backends)")


class Backend(Protocol):
    """What the tracker calls; ``stage`` None means the job's own run and global step."""

    def start_stage(self, stage: str) -> None: ...

    def end_stage(self, stage: str) -> None: ...

    def log_metrics(self, values: Mapping[str, float], step: int, stage: str | None = None) -> None: ...

    def log_image(self, tag: str, image_png: Path, step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoardBackend:
    """Event files: the job's in ``log_dir``, each stage's in ``log_dir/<stage>``."""

    def __init__(self, log_dir: Path, params: Mapping[str, str], tags: Mapping[str, str]):
        from tensorboardX import SummaryWriter

        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.job = SummaryWriter(str(log_dir))
        self.stages: dict[str, object] = {}
        config_table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.job.add_text("config", "| key | value |\n| --- | --- |\n" + config_table, 0)
        self.job.add_text("tags", "\n\n".join(f"{key}: {value}" for key, value in tags.items()), 0)

    def start_stage(self, stage: str) -> None:
        self.stages.setdefault(stage, self._writer_class(str(self.log_dir / stage)))

    def end_stage(self, stage: str) -> None:
        writer = self.stages.pop(stage, None)
        if writer is not None:
            writer.close()
        self.job.flush()

    def log_metrics(self, values: Mapping[str, float], step: int, stage: str | None = None) -> None:
        writer = self.job if stage is None else self.stages[stage]
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def log_image(self, tag: str, image_png: Path, step: int) -> None:
        from PIL import Image

        with Image.open(image_png) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self.job.add_image(tag, pixels, step, dataformats="HWC")
        self.job.flush()

    def close(self, failed: bool = False) -> None:
        for stage in list(self.stages):
            self.end_stage(stage)
        self.job.close()


class MlflowBackend:
    """A parent run for the job, a nested run per stage, through ``MlflowClient``."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, params: Mapping[str, str],
                 tags: Mapping[str, str]):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        items = [Param(key, value[:6000]) for key, value in params.items()]  # MLflow's value limit
        for start in range(0, len(items), 100):  # and its batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        self.stages: dict[str, str] = {}
        self._tag = RunTag

    def start_stage(self, stage: str) -> None:
        if stage not in self.stages:
            run = self.client.create_run(self.experiment_id, run_name=stage,
                                         tags={"mlflow.parentRunId": self.run_id, "stage": stage})
            self.stages[stage] = run.info.run_id

    def end_stage(self, stage: str) -> None:
        run_id = self.stages.pop(stage, None)
        if run_id is not None:
            self.client.set_terminated(run_id, "FINISHED")

    def log_metrics(self, values: Mapping[str, float], step: int, stage: str | None = None) -> None:
        import time

        from mlflow.entities import Metric

        run_id = self.run_id if stage is None else self.stages[stage]
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def log_image(self, tag: str, image_png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(image_png), artifact_path=tag)

    def close(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        for stage in list(self.stages):
            self.client.set_terminated(self.stages.pop(stage), status)
        self.client.set_terminated(self.run_id, status)


class WandbBackend:
    """One wandb run per job; stage curves as ``<stage>/<key>`` against ``<stage>/step``."""

    def __init__(self, project: str, run_name: str, log_dir: Path, params: Mapping[str, str],
                 tags: Mapping[str, str]):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(log_dir), mode=mode,
                              config={**params, **{f"tags/{key}": value for key, value in tags.items()}},
                              reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True))  # the driver's console stays ours
        self.run.define_metric("global_step")
        for prefix in JOB_PREFIXES:  # explicit prefixes: a catch-all glob would also claim the stages' keys
            self.run.define_metric(f"{prefix}/*", step_metric="global_step")
        self._wandb = wandb

    def start_stage(self, stage: str) -> None:
        self.run.define_metric(f"{stage}/step")
        self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def end_stage(self, stage: str) -> None:
        return None

    def log_metrics(self, values: Mapping[str, float], step: int, stage: str | None = None) -> None:
        if stage is None:
            self.run.log({**values, "global_step": step})
        else:
            self.run.log({**{f"{stage}/{key}": value for key, value in values.items()}, f"{stage}/step": step})

    def log_image(self, tag: str, image_png: Path, step: int) -> None:
        self.run.log({tag: self._wandb.Image(str(image_png)), "global_step": step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        self._wandb.teardown()  # ends wandb's service process, which writes the run file out
