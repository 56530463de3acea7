"""Numerical faults and checkpoints in spin_ray.trainer, without a Ray cluster.

A step whose loss or gradient is not finite must be skipped (parameters and optimizer state
untouched), counted and logged; ``max_nonfinite_steps`` of them in a row stop training before
anything is reported, so the last checkpoint keeps the last finite weights. A checkpoint
restores theta, AdamW and the learning-rate schedule bit for bit, so training resumed from it
ends exactly where an uninterrupted run ends. Ray Train's own snapshot, cut off by a kill, is
set aside instead of failing every rerun. What one optimizer step applies is checked through
the real worker loop: accumulated micro-batches give one large batch's gradient, and the
learning rate follows the plan's schedule. ``ray.train.report`` is replaced by a recorder, and
for the whole worker loop the rest of ``ray.train``'s per-worker API by a single-worker
stand-in; ``ray.train.Checkpoint.from_directory`` needs no cluster.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spin_ray.train_step import PairBatch, make_lr_scheduler, make_optimizer, spin_batch_loss
from spin_ray.trainer import (
    RAY_SNAPSHOT_FILE,
    STATE_FILE,
    NonFiniteError,
    TrainPlan,
    _as_pair_batch,
    _count_nonfinite,
    _on_every_rank,
    _optimizer_step,
    _restore,
    _run_steps,
    _save_checkpoint,
    _StepRunner,
    set_aside_unreadable_snapshot,
    train_loop_per_worker,
)

CPU = torch.device("cpu")


def make_plan(**changes) -> TrainPlan:
    plan = TrainPlan(
        init_model_path="unused", loss_type="spin", online_reference=False, beta=2000.0, lr=1e-3, steps=6,
        batch_size=2, gradient_accumulation_steps=1, weight_decay=1e-2, warmup_steps=0, lr_schedule="linear",
        max_grad_norm=1.0, mixed_precision="no", gradient_checkpointing=False, checkpoint_every=1,
        log_every=1, max_nonfinite_steps=2, shared_noise=True, timestep_weighting="none", seed=0,
    )
    return replace(plan, **changes)


def optimizer_and_schedule(model: torch.nn.Module, plan: TrainPlan):
    optimizer = make_optimizer(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    schedule = make_lr_scheduler(optimizer, schedule=plan.lr_schedule, warmup_steps=plan.warmup_steps,
                                 total_steps=plan.steps)
    return optimizer, schedule


def set_grads(model: torch.nn.Module, value: float) -> None:
    """Gradients that depend on the current weights (so a wrong restore shows) plus ``value``."""
    for p in model.parameters():
        p.grad = 0.1 * p.detach().clone() + value


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": value.clone() for i, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()}


# ----------------------------------------------------------------------------- one optimizer step


def test_finite_step_clips_to_max_grad_norm_and_applies():
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.weight.grad = torch.tensor([[6.0, 8.0]])  # norm 10, clipped to norm 1
    assert _optimizer_step(model, optimizer, schedule, max_grad_norm=1.0)
    torch.testing.assert_close(model.weight.detach(), before - torch.tensor([[0.6, 0.8]]))
    assert model.weight.grad is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradient_skips_the_update_and_keeps_optimizer_state(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plan = make_plan(steps=10)
    optimizer, schedule = optimizer_and_schedule(model, plan)
    set_grads(model, 0.5)
    assert _optimizer_step(model, optimizer, schedule, plan.max_grad_norm)  # AdamW now has state
    params, state, lr_step = weights(model), optimizer_tensors(optimizer), schedule.last_epoch

    set_grads(model, 0.5)
    model.bias.grad[1] = bad
    assert not _optimizer_step(model, optimizer, schedule, plan.max_grad_norm)
    assert_same_tensors(weights(model), params)
    assert_same_tensors(optimizer_tensors(optimizer), state)
    assert schedule.last_epoch == lr_step + 1  # the schedule keeps time with the step count
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_loss_skips_the_update_even_with_finite_gradients():
    model = torch.nn.Linear(3, 2)
    plan = make_plan()
    optimizer, schedule = optimizer_and_schedule(model, plan)
    params = weights(model)
    set_grads(model, 0.5)
    assert not _optimizer_step(model, optimizer, schedule, plan.max_grad_norm, loss_finite=False)
    assert_same_tensors(weights(model), params)
    assert optimizer_tensors(optimizer) == {}


def spin_columns(components, *, ref_mse_syn: float) -> dict[str, torch.Tensor]:
    """Two pair rows as the trainer's data shard yields them."""
    generator = torch.Generator().manual_seed(1)
    shape = (2, *components.latent_shape(128))
    embed_dim = components.text_encoder.config.hidden_size
    return {
        "sample_id": torch.tensor([0, 1]),
        "noise_seed": torch.tensor([11, 12]),
        "prompt_embeds": torch.randn((2, 77, embed_dim), generator=generator).half(),
        "latents_real": torch.randn(shape, generator=generator),
        "latents_syn": torch.randn(shape, generator=generator),
        "ref_mse_real": torch.tensor([1.0, 1.0]),
        "ref_mse_syn": torch.tensor([1.0, ref_mse_syn]),
    }


def test_an_infinite_loss_with_finite_gradients_is_caught(tiny_components):
    """An opponent error of +inf gives loss = inf, yet every gradient stays finite (softplus is
    linear there): the step must be skipped because of the loss alone."""
    unet = tiny_components.unet.train()
    plan = make_plan()
    runner = _StepRunner(plan, unet, None, tiny_components.scheduler, CPU)
    metrics = runner.forward_backward(spin_columns(tiny_components, ref_mse_syn=float("inf")))
    assert metrics["loss"] == float("inf")
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)

    state = {"step": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0}
    columns = spin_columns(tiny_components, ref_mse_syn=float("inf"))
    optimizer, schedule = optimizer_and_schedule(unet, plan)
    params = weights(unet)
    with pytest.raises(NonFiniteError):
        _run_steps(replace(plan, max_nonfinite_steps=1), state, [columns], runner, unet, optimizer, schedule,
                   rank=0, device=CPU)
    assert_same_tensors(weights(unet), params)
    assert state == {"step": 1, "nonfinite_in_a_row": 1, "nonfinite_total": 1, "first_batch_time": state[
        "first_batch_time"]}
    assert torch.isinf(_as_pair_batch(columns, plan).ref_mse_syn).any()


def _rank_votes(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: rank 1 saw a non-finite loss in the first vote, nobody in the second."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        votes = [_on_every_rank(rank == 0, CPU), _on_every_rank(True, CPU)]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(votes))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_skips_when_one_rank_has_a_nonfinite_loss(tmp_path):
    """Losses are per rank; if ranks disagreed on skipping, the DDP replicas would drift apart."""
    import torch.multiprocessing

    assert _on_every_rank(False, CPU) is False and _on_every_rank(True, CPU) is True  # no process group
    torch.multiprocessing.spawn(_rank_votes, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True]


# ----------------------------------------------------------------------------- counting and stopping


def test_nonfinite_steps_are_counted_logged_and_stop_after_max_in_a_row(capsys):
    state = {"step": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0}
    for step, applied in enumerate([True, False, True, False, False], start=1):
        state["step"] = step
        _count_nonfinite(state, applied, max_in_a_row=3, rank=0)
    assert state == {"step": 5, "nonfinite_in_a_row": 2, "nonfinite_total": 3}
    logged = [json.loads(line)["train_skipped_nonfinite_step"] for line in capsys.readouterr().out.splitlines()]
    assert [entry["step"] for entry in logged] == [2, 4, 5]
    assert logged[-1] == {"step": 5, "nonfinite_in_a_row": 2, "nonfinite_total": 3}

    state["step"] = 6
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row.*step 6.*train.max_nonfinite_steps=3"):
        _count_nonfinite(state, False, max_in_a_row=3, rank=0)
    assert json.loads(capsys.readouterr().out)["train_skipped_nonfinite_step"]["nonfinite_in_a_row"] == 3
    _count_nonfinite({"step": 1, "nonfinite_in_a_row": 0, "nonfinite_total": 0}, False, max_in_a_row=3, rank=1)
    assert capsys.readouterr().out == ""  # only rank 0 logs


class GradientRunner:
    """Stands in for _StepRunner: each micro-batch is ``{"grad": g}`` and sets the model's
    gradients to 0.1 * weights + g (g may be NaN); the reported loss is g."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def forward_backward(self, columns: dict[str, float]) -> dict[str, float]:
        set_grads(self.model, columns["grad"])
        return {"loss": columns["grad"]}


class ReportRecorder:
    """Replaces ``ray.train.report``: keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.reports: list[tuple[dict, Path | None]] = []
        self.saved = 0

    def __call__(self, metrics: dict, checkpoint=None) -> None:
        saved = None
        if checkpoint is not None:
            self.saved += 1
            saved = self.folder / f"checkpoint_{self.saved}"
            shutil.copytree(checkpoint.path, saved)
        self.reports.append((metrics, saved))


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> ReportRecorder:
    import ray.train

    recorder = ReportRecorder(tmp_path)
    monkeypatch.setattr(ray.train, "report", recorder)
    return recorder


def fresh_state() -> dict:
    return {"step": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0, "history": []}


def test_nan_run_stops_without_touching_the_last_good_checkpoint(tiny_components, recorder):
    import ray.train

    unet = tiny_components.unet
    plan = make_plan(steps=10, max_nonfinite_steps=2)
    optimizer, schedule = optimizer_and_schedule(unet, plan)
    nan = float("nan")
    batches = [{"grad": g} for g in [0.1, 0.2, nan, 0.3, nan, nan, 0.4, 0.5]]
    after_step_4 = {}

    class Runner(GradientRunner):
        def forward_backward(self, columns):
            if len(recorder.reports) == 4:
                after_step_4.update(weights(self.model))
            return super().forward_backward(columns)

    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        _run_steps(plan, fresh_state(), batches, Runner(unet), unet, optimizer, schedule, rank=0, device=CPU)

    steps = [metrics["step"] for metrics, _ in recorder.reports]
    assert steps == [1, 2, 3, 4, 5], "step 6 (the second NaN in a row) must not be reported"
    assert [metrics["nonfinite_total"] for metrics, _ in recorder.reports] == [0, 0, 1, 1, 2]
    last_metrics, last_checkpoint = recorder.reports[-1]
    assert json.loads((last_checkpoint / STATE_FILE).read_text())["step"] == 5
    assert_same_tensors(weights(unet), after_step_4)  # steps 5 and 6 changed nothing

    restored = copy.deepcopy(unet)
    for p in restored.parameters():
        p.data.zero_()
    restored_optimizer, restored_schedule = optimizer_and_schedule(restored, plan)
    state = _restore(ray.train.Checkpoint.from_directory(str(last_checkpoint)), restored, restored_optimizer,
                     restored_schedule)
    assert state["step"] == 5 and state["nonfinite_total"] == 2
    assert_same_tensors(weights(restored), after_step_4)
    assert all(torch.isfinite(v).all() for v in weights(restored).values())


# ----------------------------------------------------------------------------- what a step applies


def pair_rows(components, count: int, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``count`` pair rows as the data shard holds them, each with its own noise seed; the
    opponent's errors are all 1.0 (precomputed reference)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *components.latent_shape(128))
    embed_dim = components.text_encoder.config.hidden_size
    return {
        "sample_id": torch.arange(count),
        "noise_seed": 100 + torch.arange(count),
        "prompt_embeds": torch.randn((count, 77, embed_dim), generator=generator).half(),
        "latents_real": torch.randn(shape, generator=generator),
        "latents_syn": torch.randn(shape, generator=generator),
        "ref_mse_real": torch.ones(count),
        "ref_mse_syn": torch.ones(count),
    }


@pytest.fixture
def one_worker(monkeypatch, recorder, tiny_pipeline_dir):
    """Runs :func:`train_loop_per_worker` as the only worker of a Ray Train run, without Ray:
    ``ray.train``'s per-worker calls are replaced (rank 0 of 1, the CPU, no checkpoint to
    resume, a dataset shard that cuts the given rows into batches in order as
    ``iter_torch_batches(drop_last=True)`` does), ``ray.train.report`` by ``recorder``. Models
    load from the tiny pipeline (``plan.init_model_path`` is set to it); everything else is the
    production path: models, optimizer, schedule, step runner, accumulation, reports.

    Returns ``run(plan, rows) -> list of the optimizer steps seen``, each
    ``{"lr": the lr it ran at, "grads": the gradients it applied}``, taken by a global
    optimizer pre-step hook (after clipping, before the update).
    """
    import ray.train
    import ray.train.torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    class Context:
        def get_world_rank(self) -> int:
            return 0

        def get_world_size(self) -> int:
            return 1

    class Shard:
        def __init__(self, rows: dict[str, torch.Tensor]):
            self.rows = rows

        def iter_torch_batches(self, *, batch_size: int, drop_last: bool, device: torch.device):
            assert drop_last
            count = len(self.rows["sample_id"])
            for start in range(0, count - batch_size + 1, batch_size):
                yield {key: value[start:start + batch_size].to(device) for key, value in self.rows.items()}

    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    steps: list[dict] = []

    def record(optimizer, args, kwargs) -> None:
        steps.append({"lr": optimizer.param_groups[0]["lr"],
                      "grads": [p.grad.detach().clone() for group in optimizer.param_groups
                                for p in group["params"] if p.grad is not None]})

    def run(plan: TrainPlan, rows: dict[str, torch.Tensor]) -> list[dict]:
        steps.clear()
        recorder.reports.clear()
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard(rows))
        train_loop_per_worker({"plan": replace(plan, init_model_path=str(tiny_pipeline_dir))})
        return list(steps)

    handle = register_optimizer_step_pre_hook(record)
    yield run
    handle.remove()


@pytest.mark.parametrize("loss_type", ["spin", "sft"])
def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_twice_as_large(
        one_worker, tiny_components, loss_type):
    """Both losses are means over the batch's rows, so for rows 1..2b split into halves A, B:

        grad L(A u B) = grad (1/2b) sum_i l_i = (1/2) grad L(A) + (1/2) grad L(B)

    (each row's l_i depends on its own row only: its seed fixes its t and eps, and the UNet
    treats the rows of a batch independently). With gradient_accumulation_steps = 2 the step
    runner backpropagates L(A)/2 and L(B)/2 into the same .grad, so the optimizer step must see
    the gradient of one batch of 2b. Without the division it would see twice that. The
    gradients are compared, not the updated weights: AdamW's first update is about
    lr * g / |g| per weight, the same for g and 2g, and clipping (off here, max_grad_norm=0)
    would rescale both to the same norm too. beta is small so that the SPIN logits stay near 0,
    where every row contributes a gradient (at beta 2000 the softplus saturates).
    """
    rows = pair_rows(tiny_components, 4)
    plan = make_plan(loss_type=loss_type, beta=20.0, steps=1, max_grad_norm=0.0, warmup_steps=0,
                     lr_schedule="constant", checkpoint_every=0)
    accumulated = one_worker(replace(plan, batch_size=2, gradient_accumulation_steps=2), rows)
    one_batch = one_worker(replace(plan, batch_size=4, gradient_accumulation_steps=1), rows)

    assert len(accumulated) == len(one_batch) == 1  # one optimizer step each
    grads_accumulated, grads_one_batch = accumulated[0]["grads"], one_batch[0]["grads"]
    assert len(grads_accumulated) == len(grads_one_batch) == len(list(tiny_components.unet.parameters()))
    total_norm = torch.stack([g.norm() for g in grads_one_batch]).norm()
    assert total_norm > 1e-3  # a real gradient, so a factor 2 cannot hide in zeros
    for g_acc, g_one in zip(grads_accumulated, grads_one_batch, strict=True):
        torch.testing.assert_close(g_acc, g_one, rtol=1e-4, atol=1e-6 * total_norm.item())


def lr_after(schedule: str, step: int, *, warmup: int, total: int) -> float:
    """Factor on the base lr after ``step`` optimizer steps: step/warmup during warm-up, then 1
    (``constant``) or (total - step) / (total - warmup), down to 0 at ``total`` (``linear``)."""
    if step < warmup:
        return step / warmup
    return 1.0 if schedule == "constant" else max(0.0, (total - step) / (total - warmup))


@pytest.mark.parametrize(("schedule", "used", "reported"), [
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25], [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_the_worker_loop_runs_each_step_at_the_plans_scheduled_lr(one_worker, recorder, tiny_components,
                                                                  schedule, used, reported):
    """6 steps, 2 of warm-up, base lr 1e-3: optimizer step k runs at lr x lr_after(k - 1) (the
    first warm-up step at 0, as diffusers' schedules start), and the lr reported after step k
    is the schedule's value after k steps, lr x lr_after(k): the lr step k + 1 will use."""
    base_lr, warmup, total = 1e-3, 2, 6
    plan = make_plan(lr=base_lr, steps=total, warmup_steps=warmup, lr_schedule=schedule, batch_size=1,
                     checkpoint_every=0, log_every=1)
    steps = one_worker(plan, pair_rows(tiny_components, total))

    assert used == [lr_after(schedule, k - 1, warmup=warmup, total=total) for k in range(1, total + 1)]
    assert reported == [lr_after(schedule, k, warmup=warmup, total=total) for k in range(1, total + 1)]
    assert [step["lr"] for step in steps] == pytest.approx([base_lr * f for f in used], abs=1e-12)
    assert [metrics["step"] for metrics, _ in recorder.reports] == list(range(1, total + 1))
    assert [metrics["lr"] for metrics, _ in recorder.reports] == pytest.approx(
        [base_lr * f for f in reported], abs=1e-12)


def test_the_step_runner_applies_the_plans_timestep_weighting(tiny_components):
    """``train.timestep_weighting: h2`` reaches the loss the runner backpropagates: its loss is
    :func:`spin_batch_loss`'s with h2 weights, and not the unweighted one (beta small enough
    that the logits are not saturated, where the weights change the loss)."""
    columns = pair_rows(tiny_components, 3)
    plan = make_plan(beta=20.0, timestep_weighting="h2")
    runner = _StepRunner(plan, tiny_components.unet.train(), None, tiny_components.scheduler, CPU)
    loss = runner.forward_backward(columns)["loss"]
    batch = PairBatch.from_columns({**columns, "prompt_embeds": columns["prompt_embeds"].float()})
    with torch.no_grad():
        weighted, unweighted = (
            spin_batch_loss(tiny_components.unet, tiny_components.scheduler, batch, beta=plan.beta,
                            timestep_weighting=weighting).loss.item()
            for weighting in ("h2", "none"))
    assert loss == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - unweighted) > 1e-3 * unweighted


# ----------------------------------------------------------------------------- checkpoint round trip


class Killed(Exception):
    """The worker died (raised by the batch stream after a given number of micro-batches)."""


def killed_after(batches: list[dict], count: int):
    yield from batches[:count]
    raise Killed


def test_training_resumed_from_a_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_ends(
        tiny_pipeline_dir, recorder):
    """Kill after 3 of 5 micro-batches (checkpoint at step 2, 2 micro-batches each), restore into
    fresh objects, replay the whole stream: weights, AdamW state and schedule match exactly."""
    import ray.train

    from spin_ray.diffusion import load_unet

    plan = make_plan(steps=5, gradient_accumulation_steps=2, checkpoint_every=2, warmup_steps=2,
                     max_nonfinite_steps=3)
    batches = [{"grad": 0.01 * i} for i in range(10)]
    batches[5] = {"grad": float("nan")}  # step 3 is skipped, before and after the restart

    def fresh():
        unet = load_unet(str(tiny_pipeline_dir), local_files_only=True).train()
        return (unet, *optimizer_and_schedule(unet, plan))

    unet, optimizer, schedule = fresh()
    _run_steps(plan, fresh_state(), batches, GradientRunner(unet), unet, optimizer, schedule, rank=0, device=CPU)
    uninterrupted = weights(unet), optimizer_tensors(optimizer), schedule.state_dict()
    history = [metrics for metrics, _ in recorder.reports]

    recorder.reports.clear()
    unet, optimizer, schedule = fresh()
    with pytest.raises(Killed):
        _run_steps(plan, fresh_state(), killed_after(batches, 7), GradientRunner(unet), unet, optimizer,
                   schedule, rank=0, device=CPU)
    checkpoint = [saved for _, saved in recorder.reports if saved is not None][-1]

    recorder.reports.clear()
    unet, optimizer, schedule = fresh()
    state = _restore(ray.train.Checkpoint.from_directory(str(checkpoint)), unet, optimizer, schedule)
    assert state["step"] == 2 and [m["step"] for m in state["history"]] == [1, 2]
    _run_steps(plan, state, batches, GradientRunner(unet), unet, optimizer, schedule, rank=0, device=CPU)

    assert_same_tensors(weights(unet), uninterrupted[0])
    assert_same_tensors(optimizer_tensors(optimizer), uninterrupted[1])
    assert schedule.state_dict() == uninterrupted[2]
    assert [m["step"] for m in state["history"]] == [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert state["nonfinite_total"] == 1 and history[-1]["nonfinite_total"] == 1


def test_checkpoint_files_are_safetensors_and_weights_only(tiny_components, tmp_path):
    """The UNet is stored as safetensors; the optimizer file loads with ``weights_only=True``."""
    unet = tiny_components.unet
    plan = make_plan()
    optimizer, schedule = optimizer_and_schedule(unet, plan)
    set_grads(unet, 0.1)
    _optimizer_step(unet, optimizer, schedule, plan.max_grad_norm)
    _save_checkpoint(tmp_path, unet, optimizer, schedule, {**fresh_state(), "step": 1})
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["metrics.jsonl", "optimizer.pt", "trainer_state.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(saved) == {"optimizer", "lr_scheduler"}


# ----------------------------------------------------------------------------- Ray Train's snapshot


@pytest.mark.parametrize("content", [b"", b'{"ray_version": "2.60.0", "checkpoint_results": [{"vers', b"\xff\xfe{"])
def test_a_snapshot_cut_off_mid_write_is_set_aside(tmp_path, content, capsys):
    """Ray Train rewrites its snapshot in place: a kill during the write leaves it empty or cut off."""
    (tmp_path / "iter_1").mkdir()
    (tmp_path / "iter_1" / RAY_SNAPSHOT_FILE).write_bytes(content)
    (tmp_path / "iter_1" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    aside = set_aside_unreadable_snapshot(str(tmp_path), "iter_1")
    assert aside is not None and Path(aside).parent == tmp_path / "iter_1"
    assert Path(aside).name.startswith(f"{RAY_SNAPSHOT_FILE}.unreadable-") and Path(aside).read_bytes() == content
    assert not (tmp_path / "iter_1" / RAY_SNAPSHOT_FILE).exists()
    assert (tmp_path / "iter_1" / "checkpoint_2026-01-01_00-00-00.000000").is_dir()  # nothing else is touched
    assert "this training starts over" in capsys.readouterr().out


def test_a_readable_or_missing_snapshot_is_left_alone(tmp_path):
    assert set_aside_unreadable_snapshot(str(tmp_path), "iter_1") is None
    (tmp_path / "iter_1").mkdir()
    snapshot = tmp_path / "iter_1" / RAY_SNAPSHOT_FILE
    snapshot.write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": []}))
    before = snapshot.stat().st_mtime_ns
    assert set_aside_unreadable_snapshot(str(tmp_path), "iter_1") is None
    assert snapshot.stat().st_mtime_ns == before and [p.name for p in (tmp_path / "iter_1").iterdir()] == [
        RAY_SNAPSHOT_FILE]


def test_a_snapshot_on_an_object_store_is_set_aside_too():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/run/iter_1/train/iter_1/" + RAY_SNAPSHOT_FILE, b'{"cut off')
    aside = set_aside_unreadable_snapshot("memory://bucket/run/iter_1/train", "iter_1")
    assert aside is not None and fs.cat_file(aside) == b'{"cut off'
    assert not fs.exists("/bucket/run/iter_1/train/iter_1/" + RAY_SNAPSHOT_FILE)
    fs.rm("/bucket/run", recursive=True)


def test_fit_sets_a_cut_off_snapshot_aside_before_ray_train_reads_it(tmp_path, monkeypatch):
    import ray.train.torch

    from spin_ray import trainer

    snapshot = tmp_path / "iter_1" / RAY_SNAPSHOT_FILE
    snapshot.parent.mkdir()
    snapshot.write_bytes(b'{"ray_version": "2.6')
    seen = {}

    class RecordingTrainer:
        def __init__(self, *args, **kwargs):
            seen["snapshot at construction"] = snapshot.exists()
            seen["name"] = kwargs["run_config"].name

        def fit(self):
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", RecordingTrainer)
    assert trainer.fit(make_plan(), None, name="iter_1", storage_path=str(tmp_path), num_workers=1,
                       use_gpu=False) == "result"
    assert seen == {"snapshot at construction": False, "name": "iter_1"}
    assert len(list(snapshot.parent.glob(f"{RAY_SNAPSHOT_FILE}.unreadable-*"))) == 1
