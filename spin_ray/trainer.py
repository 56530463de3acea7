"""Ray Train: the TorchTrainer that trains theta on (real, synthetic) pairs.

All ``ray.train`` calls live here. Each worker holds theta (plus theta_k in ``online``
reference mode), streams its shard of pair rows with ``get_dataset_shard`` while the
generation actors are still producing them, and runs AdamW with warm-up and linear decay,
gradient accumulation and clipping, bf16 autocast on GPU. ``ray.train.report`` is a barrier,
so every rank reports at the same optimizer steps.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# spin_ray.train_step (hence diffusers, ~6 s of CPU to import) is imported inside the
# functions that use it: Ray Train's controller unpickles train_loop_per_worker, importing
# this module, and a worker should start its data stream before paying for that import.

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
HISTORY_FILE = "metrics.jsonl"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's list of registered checkpoints, in ``<storage_path>/<name>/``."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainPlan:
    """One iteration's training job, as each worker receives it (picklable)."""

    init_model_path: str
    """Local diffusers pipeline dir of theta_k: theta starts from its UNet."""
    loss_type: str
    """``spin`` or ``sft``."""
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config["plan"]`` is a :class:`TrainPlan`."""
    import ray.train
    import ray.train.torch

    plan: TrainPlan = config["plan"]
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    # Pull the first batch while the models load: its pipeline has to start the generation
    # actors (a process each, importing torch and diffusers, loading theta_k) first.
    batches = StartedIterator(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=plan.batch_size, drop_last=True, device=device,
    ))
    from spin_ray.train_step import make_lr_scheduler, make_optimizer

    torch.manual_seed(plan.seed + context.get_world_rank())
    unet, ref_unet, scheduler = _load_models(plan, device)
    model = ray.train.torch.prepare_model(unet) if context.get_world_size() > 1 else unet.to(device)
    optimizer = make_optimizer(unet.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, schedule=plan.lr_schedule,
                                     warmup_steps=plan.warmup_steps, total_steps=plan.steps)
    state = _restore(ray.train.get_checkpoint(), unet, optimizer, lr_scheduler)
    runner = _StepRunner(plan, model, ref_unet, scheduler, device)
    _run_steps(plan, state, batches, runner, unet, optimizer, lr_scheduler,
               rank=context.get_world_rank(), device=device)


def _run_steps(plan: TrainPlan, state: dict, batches, runner, unet, optimizer, lr_scheduler, *,
               rank: int, device: torch.device) -> None:
    """Optimizer steps ``state["step"] + 1 .. plan.steps`` over this worker's micro-batches.

    A resumed run skips the micro-batches it trained on before its checkpoint. A step whose
    loss or gradient is not finite is skipped, counted and logged (:func:`_count_nonfinite`);
    ``plan.max_nonfinite_steps`` of them in a row raise before anything is reported, so the
    last checkpoint keeps the last finite weights.
    """
    skip = state["step"] * plan.gradient_accumulation_steps
    micro = 0
    loss_finite = True
    window = _Window()
    for columns in batches:
        state.setdefault("first_batch_time", time.time())
        if state["step"] >= plan.steps:
            break
        if skip:  # a resumed run: these micro-batches were trained on before the checkpoint
            skip -= 1
            continue
        metrics = runner.forward_backward(columns)
        window.add(metrics, plan.batch_size)
        loss_finite = loss_finite and math.isfinite(metrics["loss"])
        micro += 1
        if micro % plan.gradient_accumulation_steps:
            continue
        applied = _optimizer_step(unet, optimizer, lr_scheduler, plan.max_grad_norm,
                                  loss_finite=_on_every_rank(loss_finite, device))
        loss_finite = True
        state["step"] += 1
        _count_nonfinite(state, applied, plan.max_nonfinite_steps, rank)
        _maybe_report(plan, state, window, lr_scheduler, unet, optimizer, rank)


def _load_models(plan: TrainPlan, device: torch.device):
    """theta (float32 master weights, train mode), theta_k when the reference is online, and
    the scheduler, on ``device`` through the fast path (:mod:`spin_ray.fast_path`): SDPA
    attention, channels_last on CUDA, optional ``torch.compile`` (``train.compile``; under DDP
    the in-place compile gives up overlapping the gradient all-reduce with the backward pass).
    theta_k gets bf16 weights on CUDA with mixed precision, as the generation actors use."""
    from diffusers import DDIMScheduler

    from spin_ray.diffusion import load_unet
    from spin_ray.fast_path import prepare_unet_for_inference, prepare_unet_for_training

    compile_unets = plan.compile
    unet = prepare_unet_for_training(load_unet(plan.init_model_path, local_files_only=True), device,
                                     compile=compile_unets, gradient_checkpointing=plan.gradient_checkpointing)
    ref_unet = None
    if plan.loss_type == "spin" and plan.online_reference:
        bf16 = device.type == "cuda" and plan.mixed_precision != "no"
        ref_unet = prepare_unet_for_inference(load_unet(plan.init_model_path, local_files_only=True), device,
                                              dtype=torch.bfloat16 if bf16 else torch.float32, compile=compile_unets)
    scheduler = DDIMScheduler.from_pretrained(plan.init_model_path, subfolder="scheduler")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return unet, ref_unet, scheduler


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


class _StepRunner:
    """Forward and backward of one micro-batch, with autocast and accumulation scaling."""

    def __init__(self, plan: TrainPlan, model, ref_unet, scheduler, device: torch.device):
        self.plan, self.model, self.ref_unet, self.scheduler = plan, model, ref_unet, scheduler
        use_bf16 = plan.mixed_precision == "bf16" or (plan.mixed_precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def forward_backward(self, columns: dict[str, torch.Tensor]) -> dict[str, float]:
        from spin_ray.train_step import sft_batch_loss, spin_batch_loss

        batch = _as_pair_batch(columns, self.plan)
        with self.autocast:
            if self.plan.loss_type == "sft":
                out = sft_batch_loss(self.model, self.scheduler, batch)
            else:
                out = spin_batch_loss(
                    self.model, self.scheduler, batch, beta=self.plan.beta,
                    shared_noise=self.plan.shared_noise, timestep_weighting=self.plan.timestep_weighting,
                    ref_unet=self.ref_unet,
                )
        (out.loss / self.plan.gradient_accumulation_steps).backward()
        return out.metrics()


def _as_pair_batch(columns: dict[str, torch.Tensor], plan: TrainPlan):
    from spin_ray.train_step import PairBatch

    columns = dict(columns)
    columns["prompt_embeds"] = columns["prompt_embeds"].float()
    if plan.online_reference:
        columns.pop("ref_mse_real", None)
        columns.pop("ref_mse_syn", None)
    return PairBatch.from_columns(columns)


def _optimizer_step(unet, optimizer, lr_scheduler, max_grad_norm: float, *, loss_finite: bool = True) -> bool:
    """Clip and step; a non-finite loss or gradient skips the update (parameters and optimizer
    state stay as they were; the learning-rate schedule still advances). Returns whether it was applied."""
    from spin_ray.train_step import gradients_finite

    params = [p for p in unet.parameters() if p.requires_grad]
    finite = loss_finite and gradients_finite(params)
    if finite:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over all training workers: a loss is per rank, but every rank must skip
    the same steps (gradients are all-reduced already, so they agree by themselves)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _count_nonfinite(state: dict, applied: bool, max_in_a_row: int, rank: int) -> None:
    """Update the non-finite step counters in ``state``; log a skipped step; raise
    :class:`NonFiniteError` when ``max_in_a_row`` steps in a row were skipped."""
    if applied:
        state["nonfinite_in_a_row"] = 0
        return
    state["nonfinite_in_a_row"] += 1
    state["nonfinite_total"] += 1
    counts = {key: state[key] for key in ("step", "nonfinite_in_a_row", "nonfinite_total")}
    if rank == 0:
        print(json.dumps({"train_skipped_nonfinite_step": counts}), flush=True)
    if state["nonfinite_in_a_row"] >= max_in_a_row:
        raise NonFiniteError(
            f"{state['nonfinite_in_a_row']} optimizer steps in a row had a non-finite loss or gradient "
            f"(last at step {state['step']}, train.max_nonfinite_steps={max_in_a_row}); "
            "the last checkpoint holds the last finite weights"
        )


class _Window:
    """Averages metrics over the micro-batches since the last report."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.samples = 0
        self.started = time.time()

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.samples += samples

    def pop(self) -> dict[str, float]:
        now = time.time()
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        means["samples_per_s"] = self.samples / max(now - self.started, 1e-9)
        self.__init__()
        return means


def _maybe_report(plan, state, window, lr_scheduler, unet, optimizer, rank: int) -> None:
    import ray.train

    step = state["step"]
    last = step >= plan.steps
    log_now = last or step % plan.log_every == 0
    checkpoint_now = last or (plan.checkpoint_every and step % plan.checkpoint_every == 0)
    if not (log_now or checkpoint_now):
        return
    metrics = {"step": step, "lr": lr_scheduler.get_last_lr()[0], "time": time.time(),
               "first_batch_time": state["first_batch_time"], "nonfinite_total": state["nonfinite_total"],
               **window.pop()}
    state.setdefault("history", []).append(metrics)
    if rank == 0:
        print(json.dumps({"train": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}),
              flush=True)
    if not checkpoint_now:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(Path(tmp), unet, optimizer, lr_scheduler, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _save_checkpoint(path: Path, unet, optimizer, lr_scheduler, state: dict) -> None:
    unet.save_pretrained(path / "unet", safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
               path / OPTIMIZER_FILE)
    history = state.get("history", [])
    (path / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    (path / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "history"}))


def _restore(checkpoint, unet, optimizer, lr_scheduler) -> dict:
    state = {"step": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0, "history": []}
    if checkpoint is None:
        return state
    from spin_ray.diffusion import load_unet

    with checkpoint.as_directory() as tmp:
        path = Path(tmp)
        trained = load_unet(str(path / "unet"), subfolder=None, local_files_only=True)
        unet.load_state_dict(trained.state_dict())
        saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        state.update(json.loads((path / STATE_FILE).read_text()))
        history_file = path / HISTORY_FILE
        state["history"] = [json.loads(line) for line in history_file.read_text().splitlines() if line]
    print(f"resumed training from checkpoint at step {state['step']}", flush=True)
    return state


def fit(plan: TrainPlan, train_dataset, *, name: str, storage_path: str, num_workers: int,
        use_gpu: bool, resources_per_worker: dict[str, float] | None = None, max_failures: int = 0):
    """Build and fit the TorchTrainer; returns the ``ray.train.Result``.

    Rerunning with the same ``name`` and ``storage_path`` resumes from the last checkpoint.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    set_aside_unreadable_snapshot(storage_path, name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
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
    import fsspec

    fs, root = fsspec.core.url_to_fs(storage_path)
    path = f"{root.rstrip('/')}/{name}/{RAY_SNAPSHOT_FILE}"
    if not fs.exists(path):
        return None
    try:
        json.loads(fs.cat_file(path))
        return None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.mv(path, aside)
        print(f"Ray Train's checkpoint snapshot {path} is unreadable ({err}); moved it to {aside}: "
              "this training starts over", flush=True)
        return aside


def checkpoint_history(checkpoint) -> list[dict]:
    """The per-report metrics recorded in a checkpoint written by this module."""
    with checkpoint.as_directory() as tmp:
        history_file = Path(tmp) / HISTORY_FILE
        return [json.loads(line) for line in history_file.read_text().splitlines() if line]


def plan_dict(plan: TrainPlan) -> dict:
    """The plan as plain data (for metrics.json)."""
    return asdict(plan)
