"""The training loop in plain PyTorch: theta's optimizer steps over a stream of pair batches.

No Ray here. :func:`run_steps` runs AdamW with warm-up and linear decay, gradient
accumulation and clipping (bf16 autocast on GPU) over any iterable of column dicts, and
hands every report (and every checkpoint request) to a ``report`` callback:
:mod:`spin_ray.trainer` runs it in each Ray Train worker with a callback that calls
``ray.train.report``; ``bench/iteration.py`` runs it in one process. A step whose loss or
gradient is not finite is skipped and counted (:class:`TrainState`); too many in a row raise
:class:`NonFiniteError` before anything is reported, so the last checkpoint keeps the last
finite weights.

A checkpoint is a directory: ``unet/`` (safetensors), ``optimizer.pt`` (AdamW and the
schedule, loadable with ``weights_only=True``), ``trainer_state.json`` and ``metrics.jsonl``
(:func:`save_checkpoint`, :func:`load_checkpoint`).

spin_ray.train_step, spin_ray.diffusion and diffusers (~6 s of CPU to import) are imported
inside the functions that use them, so importing this module stays cheap (see the note at
the top of :mod:`spin_ray.trainer`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from spin_ray.numerics import load_models  # noqa: F401  (re-exported: the trainer's models, theta and theta_k)
from spin_ray.pair_schema import pair_batch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
HISTORY_FILE = "metrics.jsonl"
UNET_DIR = "unet"


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainPlan:
    """One iteration's training job, as each worker receives it (picklable)."""

    init_model_path: str
    """Local diffusers pipeline dir of theta_k: theta starts from its UNet."""
    loss_type: str
    """``spin``, ``sft`` or ``dpo`` (Diffusion-DPO: the pairs are (winner, loser), the reference is
    theta_0 = ``init_model_path``)."""
    online_reference: bool
    beta: float
    lr: float
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    max_grad_norm: float
    mixed_precision: str
    gradient_checkpointing: bool
    checkpoint_every: int
    log_every: int
    max_nonfinite_steps: int
    shared_noise: bool
    timestep_weighting: str
    seed: int
    compile: bool = False
    """``train.compile``: ``torch.compile`` theta (and the online reference)."""
    reference_model_path: str | None = None
    """Local diffusers pipeline dir of the online reference (``online_reference``) when it is
    not ``init_model_path``: ``self_play.opponent: initial`` plays theta_0 while theta starts
    from theta_{k-1}. None: ``init_model_path``."""
    synthetic_states: str = "forward"
    """``loss.synthetic_states``: ``reverse`` trains the synthetic branch on theta_k's own sampling
    states (eq. C.5; the rows carry :data:`~spin_ray.pair_schema.REVERSE_COLUMNS`)."""
    sampler_steps: int | None = None
    """``generation.num_inference_steps``: the sampler's steps, for eq. C.5's h^2 weight."""


# ----------------------------------------------------------------------------- state


@dataclass
class MetricWindow:
    """Sums of the per-micro-batch metrics since the last report, for their means."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    samples: int = 0
    started: float = field(default_factory=time.time)

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.samples += samples

    def pop(self) -> dict[str, float]:
        """The means since the last pop, plus ``samples_per_s``; then starts a new window."""
        now = time.time()
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        means["samples_per_s"] = self.samples / max(now - self.started, 1e-9)
        self.sums, self.count, self.samples, self.started = {}, 0, 0, now
        return means


@dataclass
class TrainState:
    """Where training stands. A checkpoint keeps all of it but ``window`` (always empty right
    after a report): ``history`` in metrics.jsonl, the rest in trainer_state.json."""

    step: int = 0
    """Optimizer steps taken, skipped ones included (the schedule advanced on them too)."""
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    first_batch_time: float | None = None
    """Unix time the first batch arrived (of the first run: a resumed run keeps it)."""
    first_logit_abs: float | None = None
    """mean |logit| of the first optimizer step (theta == theta_k there, so 0 up to the numerics'
    rounding, :mod:`spin_ray.numerics`); None for losses without logits (SFT)."""
    history: list[dict] = field(default_factory=list)
    """Every report's metrics, in order."""
    window: MetricWindow = field(default_factory=MetricWindow, repr=False, compare=False)

    def to_json(self) -> dict:
        """The trainer_state.json record; its keys are the format that checkpoints have always had."""
        record = {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                  "nonfinite_total": self.nonfinite_total}
        if self.first_batch_time is not None:
            record["first_batch_time"] = self.first_batch_time
        if self.first_logit_abs is not None:
            record["first_logit_abs"] = self.first_logit_abs
        return record

    @classmethod
    def from_json(cls, record: dict, history: list[dict] | None = None) -> TrainState:
        return cls(step=int(record.get("step", 0)), nonfinite_in_a_row=int(record.get("nonfinite_in_a_row", 0)),
                   nonfinite_total=int(record.get("nonfinite_total", 0)),
                   first_batch_time=record.get("first_batch_time"), first_logit_abs=record.get("first_logit_abs"),
                   history=list(history or []))


@dataclass
class Optimization:
    """theta's module, its optimizer and learning-rate schedule: what a step updates and a
    checkpoint holds. ``model`` is the bare module, not a DDP wrapper of it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def for_plan(cls, model: torch.nn.Module, plan: TrainPlan) -> Optimization:
        """AdamW over ``model``'s trainable parameters and the plan's schedule."""
        from spin_ray.train_step import make_lr_scheduler, make_optimizer

        optimizer = make_optimizer(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
        lr_scheduler = make_lr_scheduler(optimizer, schedule=plan.lr_schedule, warmup_steps=plan.warmup_steps,
                                         total_steps=plan.steps)
        return cls(model, optimizer, lr_scheduler)


@dataclass(frozen=True)
class CheckpointRequest:
    """Handed to the report callback at a checkpoint step: ``save(dir)`` writes the checkpoint."""

    optim: Optimization
    state: TrainState

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.optim, self.state)


Report = Callable[[dict, CheckpointRequest | None], None]
"""``report(metrics, checkpoint)``: every rank calls it at the same steps (``ray.train.report``
is a barrier); ``checkpoint`` is None at a step that only logs."""


class MicroBatchRunner(Protocol):
    def forward_backward(self, columns: dict) -> dict[str, float]:
        """Forward and backward of one micro-batch; returns its metrics, ``loss`` among them."""


# ----------------------------------------------------------------------------- one micro-batch


class StepRunner:
    """Forward and backward of one micro-batch, with autocast and accumulation scaling.

    The autocast is :func:`spin_ray.numerics.training_numerics`'s, the one the generation actor
    computes theta_k's precomputed errors under, so that theta == theta_k gives logit 0."""

    def __init__(self, plan: TrainPlan, model, ref_unet, scheduler, device: torch.device):
        from spin_ray.numerics import training_numerics

        self.plan, self.model, self.ref_unet, self.scheduler = plan, model, ref_unet, scheduler
        self.numerics = training_numerics(plan.mixed_precision, device, compile=plan.compile)
        self.autocast = self.numerics.autocast()

    def forward_backward(self, columns: dict[str, torch.Tensor]) -> dict[str, float]:
        """``columns``: pair rows as the data shard yields them
        (:data:`~spin_ray.pair_schema.PAIR_COLUMNS`, batch B)."""
        from spin_ray.train_step import dpo_batch_loss, sft_batch_loss, spin_batch_loss

        batch = pair_batch(columns, online_reference=self.plan.online_reference)
        with self.autocast:
            if self.plan.loss_type == "sft":
                out = sft_batch_loss(self.model, self.scheduler, batch)
            elif self.plan.loss_type == "dpo":  # (winner, loser) pairs against theta_0 (the plan's model)
                out = dpo_batch_loss(self.model, self.scheduler, batch, beta=self.plan.beta, ref_unet=self.ref_unet)
            else:
                out = spin_batch_loss(
                    self.model, self.scheduler, batch, beta=self.plan.beta,
                    shared_noise=self.plan.shared_noise, timestep_weighting=self.plan.timestep_weighting,
                    ref_unet=self.ref_unet, synthetic_states=self.plan.synthetic_states,
                    sampler_steps=self.plan.sampler_steps,
                )
        # Each micro-batch's loss is a batch mean: dividing by the accumulation count makes the
        # summed .grad that of one batch accumulation times as large.
        (out.loss / self.plan.gradient_accumulation_steps).backward()
        return out.metrics()


# ----------------------------------------------------------------------------- one optimizer step


def optimizer_step(optim: Optimization, max_grad_norm: float, *, loss_finite: bool = True) -> bool:
    """Clip (``max_grad_norm`` > 0) and step; a non-finite loss or gradient skips the update
    (parameters and optimizer state stay as they were; the learning-rate schedule still
    advances). Clears the gradients. Returns whether the update was applied."""
    from spin_ray.train_step import gradients_finite

    params = [p for p in optim.model.parameters() if p.requires_grad]
    finite = loss_finite and gradients_finite(params)
    if finite:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        # Skip by dropping the gradients: torch optimizers leave a parameter whose .grad is None
        # untouched (no update, no weight decay, no state change). The optimizer step below is
        # then a no-op, and the schedule still advances after an optimizer step, in the order
        # torch expects (a bare lr_scheduler.step() on a skipped first step makes torch warn).
        optim.optimizer.zero_grad(set_to_none=True)
    optim.optimizer.step()
    optim.lr_scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    return finite


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over all training workers: a loss is per rank, but every rank must skip
    the same steps (gradients are all-reduced already, so they agree by themselves)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def count_nonfinite(state: TrainState, applied: bool, max_in_a_row: int, rank: int) -> None:
    """Update the non-finite step counters of ``state``; log a skipped step (rank 0); raise
    :class:`NonFiniteError` when ``max_in_a_row`` steps in a row were skipped."""
    if applied:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    counts = {"step": state.step, "nonfinite_in_a_row": state.nonfinite_in_a_row,
              "nonfinite_total": state.nonfinite_total}
    if rank == 0:
        print(json.dumps({"train_skipped_nonfinite_step": counts}), flush=True)
    if state.nonfinite_in_a_row >= max_in_a_row:
        raise NonFiniteError(
            f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
            f"(last at step {state.step}, train.max_nonfinite_steps={max_in_a_row}); "
            "the last checkpoint holds the last finite weights"
        )


# ----------------------------------------------------------------------------- the loop


def run_steps(plan: TrainPlan, state: TrainState, batches: Iterable[dict], runner: MicroBatchRunner,
              optim: Optimization, *, report: Report, rank: int = 0) -> TrainState:
    """Optimizer steps ``state.step + 1 .. plan.steps`` over this worker's micro-batches.

    Each optimizer step takes ``plan.gradient_accumulation_steps`` micro-batches (column dicts
    of ``plan.batch_size`` rows). A resumed run (``state`` from :func:`load_checkpoint`)
    skips the micro-batches it trained on before its checkpoint. A step whose loss (on any
    rank) or gradient is not finite is skipped and counted (:func:`count_nonfinite`). Every
    ``plan.log_every`` steps, and at the last one, ``report`` gets the metrics; every
    ``plan.checkpoint_every`` steps (0: never), and at the last one, a checkpoint request too.
    Returns ``state``, updated in place.
    """
    skip = state.step * plan.gradient_accumulation_steps
    micro = 0
    loss_finite = True
    step_logit_abs: list[float] = []
    state.window = MetricWindow()  # samples_per_s counts from this call, as a restart's does
    device = _device_of(optim.model)
    for columns in batches:
        if state.first_batch_time is None:
            state.first_batch_time = time.time()
        if state.step >= plan.steps:
            break
        if skip:  # a resumed run: these micro-batches were trained on before the checkpoint
            skip -= 1
            continue
        metrics = runner.forward_backward(columns)
        state.window.add(metrics, plan.batch_size)
        if "logits_abs_mean" in metrics:
            step_logit_abs.append(metrics["logits_abs_mean"])
        loss_finite = loss_finite and math.isfinite(metrics["loss"])
        micro += 1
        if micro % plan.gradient_accumulation_steps:
            continue
        applied = optimizer_step(optim, plan.max_grad_norm, loss_finite=on_every_rank(loss_finite, device))
        loss_finite = True
        state.step += 1
        if state.step == 1 and step_logit_abs:
            state.first_logit_abs = sum(step_logit_abs) / len(step_logit_abs)
        step_logit_abs = []
        count_nonfinite(state, applied, plan.max_nonfinite_steps, rank)
        _maybe_report(plan, state, optim, report, rank)
    return state


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _maybe_report(plan: TrainPlan, state: TrainState, optim: Optimization, report: Report, rank: int) -> None:
    step = state.step
    last = step >= plan.steps
    log_now = last or step % plan.log_every == 0
    checkpoint_now = last or bool(plan.checkpoint_every and step % plan.checkpoint_every == 0)
    if not (log_now or checkpoint_now):
        return
    metrics = {"step": step, "lr": optim.lr_scheduler.get_last_lr()[0], "time": time.time(),
               "first_batch_time": state.first_batch_time, "nonfinite_total": state.nonfinite_total,
               **state.window.pop()}
    if state.first_logit_abs is not None:
        metrics["first_logit_abs"] = state.first_logit_abs
    state.history.append(metrics)  # before the checkpoint, whose metrics.jsonl ends with this report
    if rank == 0:
        print(json.dumps({"train": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}),
              flush=True)
    report(metrics, CheckpointRequest(optim, state) if checkpoint_now else None)


# ----------------------------------------------------------------------------- checkpoints and models


def save_checkpoint(path: Path, optim: Optimization, state: TrainState) -> None:
    """Write a checkpoint into the existing directory ``path`` (``optim.model`` is a diffusers UNet)."""
    optim.model.save_pretrained(path / UNET_DIR, safe_serialization=True)
    torch.save({"optimizer": optim.optimizer.state_dict(), "lr_scheduler": optim.lr_scheduler.state_dict()},
               path / OPTIMIZER_FILE)
    (path / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in state.history))
    (path / STATE_FILE).write_text(json.dumps(state.to_json()))


def load_checkpoint(path: Path, optim: Optimization) -> TrainState:
    """Restore theta, the optimizer and the schedule from the checkpoint in ``path`` into
    ``optim``; returns the state to resume :func:`run_steps` from."""
    from spin_ray.diffusion import load_unet

    trained = load_unet(str(path / UNET_DIR), subfolder=None, local_files_only=True)
    optim.model.load_state_dict(trained.state_dict())
    saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    optim.optimizer.load_state_dict(saved["optimizer"])
    optim.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text()), read_history(path))


def read_history(path: Path) -> list[dict]:
    """The per-report metrics recorded in the checkpoint in ``path``."""
    return [json.loads(line) for line in (path / HISTORY_FILE).read_text().splitlines() if line]
