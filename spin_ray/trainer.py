"""Ray Train glue: the TorchTrainer that trains theta on (real, synthetic) pairs.

All ``ray.train`` calls live here; the loop itself is :func:`spin_ray.train_loop.run_steps`
(plain PyTorch). Each worker holds theta (plus theta_k in ``online`` reference mode), streams
its shard of pair rows with ``get_dataset_shard`` while the generation actors are still
producing them, and hands the loop a report callback that calls ``ray.train.report`` (rank 0
saves the checkpoints). ``ray.train.report`` is a barrier, so every rank reports at the same
optimizer steps.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

# spin_ray.train_step (hence diffusers, ~6 s of CPU to import) is imported inside the
# functions that use it: Ray Train's controller unpickles train_loop_per_worker, importing
# this module, and a worker should start its data stream before paying for that import.
# spin_ray.train_loop keeps to the same rule, so importing it here costs nothing.
from spin_ray.train_loop import (
    UNET_DIR,
    CheckpointRequest,
    Optimization,
    Report,
    StepRunner,
    TrainPlan,
    TrainState,
    load_checkpoint,
    load_models,
    read_history,
    run_steps,
)

if TYPE_CHECKING:
    from spin_ray.rundir import RunDir

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's list of registered checkpoints, in ``<storage_path>/<name>/``."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config["plan"]`` is a :class:`~spin_ray.train_loop.TrainPlan`."""
    import ray.train
    import ray.train.torch

    plan: TrainPlan = config["plan"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    # Pull the first batch while the models load: its pipeline has to start the generation
    # actors (a process each, importing torch and diffusers, loading theta_k) first.
    batches = StartedIterator(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=plan.batch_size, drop_last=True, device=device,
    ))
    torch.manual_seed(plan.seed + rank)
    unet, ref_unet, scheduler = load_models(plan, device)
    model = ray.train.torch.prepare_model(unet) if context.get_world_size() > 1 else unet.to(device)
    optim = Optimization.for_plan(unet, plan)
    state = _restore(ray.train.get_checkpoint(), optim)
    runner = StepRunner(plan, model, ref_unet, scheduler, device)
    report = ray_report(rank)
    if config.get("snapshots") is not None:  # every rank: they must hand Ray Train the same checkpoints
        report = reporting_snapshots(report, config["snapshots"], plan, rank)
    if rank == 0 and config.get("progress"):
        report = reporting_progress(report, config["progress"], plan.steps)
    run_steps(plan, state, batches, runner, optim, report=report, rank=rank)


def reporting_progress(report: Report, location: str, steps: int) -> Report:
    """``report`` that also records the step in the file ``location``, which the driver's
    :class:`spin_ray.progress.StageProgress` shows (rank 0 only: one writer)."""
    from spin_ray.progress import write_progress

    def report_and_record(metrics: dict, checkpoint: CheckpointRequest | None) -> None:
        report(metrics, checkpoint)
        write_progress(location, int(metrics["step"]), steps, metrics.get("loss"), metrics=metrics)

    return report_and_record


@dataclass(frozen=True)
class Snapshots:
    """Models to score after training (``train.eval_every``): theta after every ``every``-th
    optimizer step and the last, each written by rank 0 as a complete diffusers model (the
    starting model's VAE, text encoder, tokenizer and scheduler + theta's UNet, safetensors,
    no optimizer state) to ``rundir``'s :meth:`~spin_ray.run_layout.RunLayout.stage_checkpoint`.

    The plan's ``checkpoint_every`` must divide ``every`` (so the loop hands the report a
    checkpoint request, hence theta, at those steps); Ray Train checkpoints (theta plus the
    optimizer, for resuming) are kept only at multiples of ``ray_checkpoint_every`` (the
    user's ``train.checkpoint_every``; 0: none) and the last step.
    """

    rundir: RunDir
    """The run's :class:`~spin_ray.rundir.RunDir` (picklable; local or an object store)."""
    stage: str
    every: int
    ray_checkpoint_every: int

    def due(self, step: int, steps: int) -> bool:
        return step >= steps or step % self.every == 0

    def ray_checkpoint_due(self, step: int, steps: int) -> bool:
        return step >= steps or bool(self.ray_checkpoint_every and step % self.ray_checkpoint_every == 0)


def reporting_snapshots(report: Report, snapshots: Snapshots, plan: TrainPlan, rank: int) -> Report:
    """``report`` that, at the steps :class:`Snapshots` names, first has rank 0 write theta as a
    model to score, and that passes a checkpoint request on to ``report`` only at Ray Train
    checkpoint steps."""

    def report_and_snapshot(metrics: dict, checkpoint: CheckpointRequest | None) -> None:
        step = int(metrics["step"])
        if checkpoint is not None and rank == 0 and snapshots.due(step, plan.steps):
            save_snapshot(checkpoint.optim.model, plan.init_model_path, snapshots.rundir,
                          snapshots.rundir.stage_checkpoint(snapshots.stage, step), step)
        report(metrics, checkpoint if checkpoint is not None and snapshots.ray_checkpoint_due(step, plan.steps)
               else None)

    return report_and_snapshot


def save_snapshot(unet: torch.nn.Module, init_model_path: str, rundir: RunDir, rel: str, step: int) -> None:
    """Publish ``unet`` with the other components of the diffusers model ``init_model_path``
    as the model ``rel`` (DONE records ``step``). One already published is kept: a resumed
    training retrains the steps after its last Ray Train checkpoint, and the scores of the
    first copy may already be stored."""
    if rundir.is_done(rel):
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(init_model_path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(UNET_DIR, "DONE"))
        unet.save_pretrained(Path(tmp) / UNET_DIR, safe_serialization=True)
        rundir.publish_dir(tmp, rel, {"step": step})


def ray_report(rank: int) -> Report:
    """The loop's report callback for a Ray Train worker: ``ray.train.report`` on every rank
    (a barrier); at a checkpoint step rank 0 saves the checkpoint into a temporary
    directory that Ray Train copies to the run's storage during the call."""
    import ray.train

    def report(metrics: dict, checkpoint: CheckpointRequest | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                checkpoint.save(Path(tmp))
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)

    return report


def _restore(checkpoint, optim: Optimization) -> TrainState:
    """The state to resume from: a fresh one, or the one in Ray Train's last checkpoint
    (theta, the optimizer and the schedule are restored into ``optim``)."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as tmp:
        state = load_checkpoint(Path(tmp), optim)
    print(f"resumed training from checkpoint at step {state.step}", flush=True)
    return state


class StartedIterator:
    """Iterates ``iterable``, whose first item a background thread starts fetching at once.

    ``__iter__`` hands over that item (or re-raises what fetching it raised), then iterates
    the rest in the caller's thread. The thread is a daemon: a worker that fails before
    iterating still exits.
    """

    def __init__(self, iterable):
        self._iterator = iter(iterable)
        self._first: list[tuple[bool, object]] = []
        self._thread = threading.Thread(target=self._fetch_first, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first.append((True, next(self._iterator, _EXHAUSTED)))
        except BaseException as err:  # handed to the iterating thread
            self._first.append((False, err))

    def __iter__(self):
        self._thread.join()
        fetched, value = self._first[0]
        if not fetched:
            raise value
        if value is _EXHAUSTED:
            return
        yield value
        yield from self._iterator


_EXHAUSTED = object()


def fit(plan: TrainPlan, train_dataset, *, name: str, storage_path: str, num_workers: int,
        use_gpu: bool, resources_per_worker: dict[str, float] | None = None, max_failures: int = 0,
        progress: str | None = None, snapshots: Snapshots | None = None):
    """Build and fit the TorchTrainer; returns the ``ray.train.Result``.

    Rerunning with the same ``name`` and ``storage_path`` resumes from the last checkpoint.
    ``progress``: a file where rank 0 records each logged step (:mod:`spin_ray.progress`).
    ``snapshots``: also write theta as a model at those steps, for
    :mod:`spin_ray.checkpoint_selection` to score.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    set_aside_unreadable_snapshot(storage_path, name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "progress": progress, "snapshots": snapshots},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker=resources_per_worker or {"CPU": 1},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": train_dataset},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def set_aside_unreadable_snapshot(storage_path: str, name: str) -> str | None:
    """Move Ray Train's checkpoint snapshot aside when it does not parse; returns where to.

    Ray Train rewrites ``checkpoint_manager_snapshot.json`` in place after every checkpoint,
    so a driver killed during that write leaves a truncated file, and every later ``fit`` with
    the same name would fail on it. Without it, training starts over from step 0 (the cached
    opponents are still reused); the file is kept, renamed, for inspection.
    """
    from spin_ray.rundir import RunDir

    storage, rel = RunDir(storage_path), f"{name}/{RAY_SNAPSHOT_FILE}"
    if not storage.exists(rel):
        return None
    try:
        json.loads(storage.read_text(rel))
        return None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        aside = f"{rel}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        storage.move(rel, aside)
        print(f"Ray Train's checkpoint snapshot {storage.path(rel)} is unreadable ({err}); moved it to "
              f"{storage.path(aside)}: this training starts over", flush=True)
        return storage.path(aside)


def checkpoint_step(storage_path: str, name: str) -> int | None:
    """The step of the checkpoint that a :func:`fit` with this ``name`` and ``storage_path``
    resumes from (Ray Train's snapshot, read on the driver), or None: no checkpoint yet, or a
    snapshot that does not parse (:func:`set_aside_unreadable_snapshot` then says so)."""
    from spin_ray.rundir import RunDir

    try:
        latest = json.loads(RunDir(storage_path).read_text(f"{name}/{RAY_SNAPSHOT_FILE}"))["latest_checkpoint_result"]
        return int(latest["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):  # no file, not JSON, no checkpoint (null) or no step
        return None


def checkpoint_history(checkpoint) -> list[dict]:
    """The per-report metrics recorded in a checkpoint written by this module."""
    with checkpoint.as_directory() as tmp:
        return read_history(Path(tmp))
