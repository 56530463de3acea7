"""The training loop of spin_ray.train_loop, without Ray.

A step whose loss or gradient is not finite must be skipped (parameters and optimizer state
untouched), counted and logged; ``max_nonfinite_steps`` of them in a row stop training before
anything is reported, so the last checkpoint keeps the last finite weights. ``report`` is
called at every ``log_every``-th step, with a checkpoint request at every
``checkpoint_every``-th step, and at the last step with both. Accumulated micro-batches give
one large batch's gradient. A checkpoint restores theta, AdamW and the learning-rate schedule
bit for bit, so training resumed from it (or from an in-memory :class:`TrainState`) ends
exactly where an uninterrupted run ends; its trainer_state.json keeps the format that
checkpoints written before this module had. The report callback here is a recorder.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_tensors, make_plan, optimizer_tensors, pair_rows, weights

from spin_ray.pair_schema import PairBatch, pair_batch
from spin_ray.train_loop import (
    STATE_FILE,
    NonFiniteError,
    Optimization,
    StepRunner,
    TrainState,
    count_nonfinite,
    load_checkpoint,
    on_every_rank,
    optimizer_step,
    run_steps,
    save_checkpoint,
)
from spin_ray.train_step import spin_batch_loss

CPU = torch.device("cpu")


def set_grads(model: torch.nn.Module, value: float) -> None:
    """Gradients that depend on the current weights (so a wrong restore shows) plus ``value``."""
    for p in model.parameters():
        p.grad = 0.1 * p.detach().clone() + value


class GradientRunner:
    """Stands in for StepRunner: each micro-batch is ``{"grad": g}`` and sets the model's
    gradients to 0.1 * weights + g (g may be NaN); the reported loss is g. ``seen`` keeps the g's."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seen: list[float] = []

    def forward_backward(self, columns: dict[str, float]) -> dict[str, float]:
        self.seen.append(columns["grad"])
        set_grads(self.model, columns["grad"])
        return {"loss": columns["grad"]}


class Recorder:
    """The report callback: keeps every (metrics, checkpoint requested) and, given a folder,
    saves every requested checkpoint into a folder of its own (``saved``)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.reports: list[tuple[dict, bool]] = []
        self.saved: list[Path] = []

    def __call__(self, metrics: dict, checkpoint) -> None:
        if checkpoint is not None and self.folder is not None:
            path = self.folder / f"checkpoint_{len(self.saved) + 1}"
            path.mkdir()
            checkpoint.save(path)
            self.saved.append(path)
        self.reports.append((metrics, checkpoint is not None))

    def steps(self, *, checkpoints_only: bool = False) -> list[int]:
        return [m["step"] for m, checkpointed in self.reports if checkpointed or not checkpoints_only]


def grad_batches(values) -> list[dict[str, float]]:
    return [{"grad": v} for v in values]


class Killed(Exception):
    """The worker died (raised by the batch stream after a given number of micro-batches)."""


def killed_after(batches: list[dict], count: int):
    yield from batches[:count]
    raise Killed


# ----------------------------------------------------------------------------- one optimizer step


def test_finite_step_clips_to_max_grad_norm_and_applies():
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optim = Optimization(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    model.weight.grad = torch.tensor([[6.0, 8.0]])  # norm 10, clipped to norm 1
    assert optimizer_step(optim, max_grad_norm=1.0)
    torch.testing.assert_close(model.weight.detach(), before - torch.tensor([[0.6, 0.8]]))
    assert model.weight.grad is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradient_skips_the_update_and_keeps_optimizer_state(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plan = make_plan(steps=10)
    optim = Optimization.for_plan(model, plan)
    set_grads(model, 0.5)
    assert optimizer_step(optim, plan.max_grad_norm)  # AdamW now has state
    params, state, lr_step = weights(model), optimizer_tensors(optim.optimizer), optim.lr_scheduler.last_epoch

    set_grads(model, 0.5)
    model.bias.grad[1] = bad
    assert not optimizer_step(optim, plan.max_grad_norm)
    assert_same_tensors(weights(model), params)
    assert_same_tensors(optimizer_tensors(optim.optimizer), state)
    assert optim.lr_scheduler.last_epoch == lr_step + 1  # the schedule keeps time with the step count
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_loss_skips_the_update_even_with_finite_gradients():
    model = torch.nn.Linear(3, 2)
    plan = make_plan()
    optim = Optimization.for_plan(model, plan)
    params = weights(model)
    set_grads(model, 0.5)
    assert not optimizer_step(optim, plan.max_grad_norm, loss_finite=False)
    assert_same_tensors(weights(model), params)
    assert optimizer_tensors(optim.optimizer) == {}


def test_a_skipped_first_step_advances_the_schedule_without_torch_warning():
    """torch warns when lr_scheduler.step() comes before any optimizer.step(); a skipped first
    step must keep the schedule's time without that warning (issue 14)."""
    import warnings

    model = torch.nn.Linear(3, 2)
    plan = make_plan(warmup_steps=2)
    optim = Optimization.for_plan(model, plan)
    params, first_lr = weights(model), optim.lr_scheduler.get_last_lr()[0]
    set_grads(model, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not optimizer_step(optim, plan.max_grad_norm)
        set_grads(model, 0.5)
        assert optimizer_step(optim, plan.max_grad_norm)
    assert optim.lr_scheduler.last_epoch == 2 and optim.lr_scheduler.get_last_lr()[0] > first_lr
    assert not all(torch.equal(weights(model)[k], v) for k, v in params.items())


def _rank_votes(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: rank 1 saw a non-finite loss in the first vote, nobody in the second."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        votes = [on_every_rank(rank == 0, CPU), on_every_rank(True, CPU)]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(votes))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_skips_when_one_rank_has_a_nonfinite_loss(tmp_path):
    """Losses are per rank; if ranks disagreed on skipping, the DDP replicas would drift apart."""
    import torch.multiprocessing

    assert on_every_rank(False, CPU) is False and on_every_rank(True, CPU) is True  # no process group
    torch.multiprocessing.spawn(_rank_votes, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True]


# ----------------------------------------------------------------------------- the step runner


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
    runner = StepRunner(plan, unet, None, tiny_components.scheduler, CPU)
    metrics = runner.forward_backward(spin_columns(tiny_components, ref_mse_syn=float("inf")))
    assert metrics["loss"] == float("inf")
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)

    state = TrainState()
    columns = spin_columns(tiny_components, ref_mse_syn=float("inf"))
    optim = Optimization.for_plan(unet, plan)
    params = weights(unet)
    recorder = Recorder()
    with pytest.raises(NonFiniteError):
        run_steps(replace(plan, max_nonfinite_steps=1), state, [columns], runner, optim, report=recorder)
    assert_same_tensors(weights(unet), params)
    assert (state.step, state.nonfinite_in_a_row, state.nonfinite_total) == (1, 1, 1)
    assert state.first_batch_time is not None and state.history == [] and recorder.reports == []
    assert torch.isinf(pair_batch(columns, online_reference=plan.online_reference).ref_mse_syn).any()


def test_the_step_runner_applies_the_plans_timestep_weighting(tiny_components):
    """``train.timestep_weighting: h2`` reaches the loss the runner backpropagates: its loss is
    :func:`spin_batch_loss`'s with h2 weights, and not the unweighted one (beta small enough
    that the logits are not saturated, where the weights change the loss)."""
    columns = pair_rows(tiny_components, 3)
    plan = make_plan(beta=20.0, timestep_weighting="h2")
    runner = StepRunner(plan, tiny_components.unet.train(), None, tiny_components.scheduler, CPU)
    loss = runner.forward_backward(columns)["loss"]
    batch = PairBatch.from_columns({**columns, "prompt_embeds": columns["prompt_embeds"].float()})
    with torch.no_grad():
        weighted, unweighted = (
            spin_batch_loss(tiny_components.unet, tiny_components.scheduler, batch, beta=plan.beta,
                            timestep_weighting=weighting).loss.item()
            for weighting in ("h2", "none"))
    assert loss == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - unweighted) > 1e-3 * unweighted


# ----------------------------------------------------------------------------- counting and stopping


def test_nonfinite_steps_are_counted_logged_and_stop_after_max_in_a_row(capsys):
    state = TrainState()
    for step, applied in enumerate([True, False, True, False, False], start=1):
        state.step = step
        count_nonfinite(state, applied, max_in_a_row=3, rank=0)
    assert (state.step, state.nonfinite_in_a_row, state.nonfinite_total) == (5, 2, 3)
    logged = [json.loads(line)["train_skipped_nonfinite_step"] for line in capsys.readouterr().out.splitlines()]
    assert [entry["step"] for entry in logged] == [2, 4, 5]
    assert logged[-1] == {"step": 5, "nonfinite_in_a_row": 2, "nonfinite_total": 3}

    state.step = 6
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row.*step 6.*train.max_nonfinite_steps=3"):
        count_nonfinite(state, False, max_in_a_row=3, rank=0)
    assert json.loads(capsys.readouterr().out)["train_skipped_nonfinite_step"]["nonfinite_in_a_row"] == 3
    count_nonfinite(TrainState(step=1), False, max_in_a_row=3, rank=1)
    assert capsys.readouterr().out == ""  # only rank 0 logs


def test_the_loop_stops_after_max_nonfinite_steps_in_a_row_and_reports_none_of_them():
    model = torch.nn.Linear(3, 2)
    plan = make_plan(steps=10, max_nonfinite_steps=3, checkpoint_every=0)
    nan = float("nan")
    recorder = Recorder()
    state = TrainState()
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        run_steps(plan, state, grad_batches([0.1, nan, nan, 0.2, nan, nan, nan, 0.3]), GradientRunner(model),
                  Optimization.for_plan(model, plan), report=recorder)
    assert recorder.steps() == [1, 2, 3, 4, 5, 6], "step 7 (the third NaN in a row) must not be reported"
    assert [m["nonfinite_total"] for m, _ in recorder.reports] == [0, 1, 2, 2, 3, 4]
    assert (state.step, state.nonfinite_in_a_row, state.nonfinite_total) == (7, 3, 5)


# ----------------------------------------------------------------------------- reports


@pytest.mark.parametrize(("steps", "accumulation", "log_every", "checkpoint_every", "logged", "checkpointed"), [
    (7, 1, 2, 3, [2, 3, 4, 6, 7], [3, 6, 7]),
    (7, 2, 3, 0, [3, 6, 7], [7]),
    (4, 1, 1, 1, [1, 2, 3, 4], [1, 2, 3, 4]),
])
def test_report_is_called_at_log_every_and_checkpoint_every_and_the_last_step(
        steps, accumulation, log_every, checkpoint_every, logged, checkpointed):
    """Steps count optimizer steps (``accumulation`` micro-batches each); the metrics are the
    means over the micro-batches since the last report, and the state's history is the reports."""
    model = torch.nn.Linear(3, 2)
    plan = make_plan(steps=steps, gradient_accumulation_steps=accumulation, log_every=log_every,
                     checkpoint_every=checkpoint_every, batch_size=2)
    grads = [0.01 * i for i in range(1, steps * accumulation + 3)]  # 2 more than needed: unused
    recorder, state, runner = Recorder(), TrainState(), GradientRunner(model)
    run_steps(plan, state, grad_batches(grads), runner, Optimization.for_plan(model, plan), report=recorder)

    assert recorder.steps() == logged and recorder.steps(checkpoints_only=True) == checkpointed
    assert runner.seen == grads[:steps * accumulation] and state.step == steps
    assert [m for m, _ in recorder.reports] == state.history
    previous = 0
    for metrics, _ in recorder.reports:
        assert set(metrics) == {"step", "lr", "time", "first_batch_time", "nonfinite_total", "loss", "samples_per_s"}
        window = grads[previous * accumulation:metrics["step"] * accumulation]
        assert metrics["loss"] == pytest.approx(sum(window) / len(window))
        assert metrics["first_batch_time"] == state.first_batch_time and metrics["samples_per_s"] > 0
        previous = metrics["step"]


def test_a_run_resumed_from_its_train_state_skips_what_it_trained_on_and_ends_where_an_uninterrupted_run_ends():
    """Kill the stream after 3 of 6 micro-batches (step 3 is done), then hand the same state
    and objects the whole stream again: it skips 3 micro-batches and trains on the rest."""
    plan = make_plan(steps=6, checkpoint_every=0, log_every=1, warmup_steps=2)
    grads = [0.01 * i for i in range(6)]

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, Optimization.for_plan(model, plan)

    model, optim = fresh()
    uninterrupted = Recorder()
    run_steps(plan, TrainState(), grad_batches(grads), GradientRunner(model), optim, report=uninterrupted)
    expected = weights(model), optimizer_tensors(optim.optimizer), optim.lr_scheduler.state_dict()

    model, optim = fresh()
    state, recorder = TrainState(), Recorder()
    with pytest.raises(Killed):
        run_steps(plan, state, killed_after(grad_batches(grads), 3), GradientRunner(model), optim, report=recorder)
    assert state.step == 3 and recorder.steps() == [1, 2, 3]
    runner = GradientRunner(model)
    run_steps(plan, state, grad_batches(grads), runner, optim, report=recorder)

    assert runner.seen == grads[3:] and recorder.steps() == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(weights(model), expected[0])
    assert_same_tensors(optimizer_tensors(optim.optimizer), expected[1])
    assert optim.lr_scheduler.state_dict() == expected[2]
    assert [m["lr"] for m, _ in recorder.reports] == [m["lr"] for m, _ in uninterrupted.reports]


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("loss_type", ["spin", "sft"])
def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_twice_as_large(tiny_components, loss_type):
    """Both losses are means over the batch's rows, so for rows 1..2b split into halves A, B:

        grad L(A u B) = grad (1/2b) sum_i l_i = (1/2) grad L(A) + (1/2) grad L(B)

    (each row's l_i depends on its own row only: its seed fixes its t and eps). With
    gradient_accumulation_steps = 2 the step runner backpropagates L(A)/2 and L(B)/2 into the
    same .grad, so the optimizer step sees the gradient of one batch of 2b; without the
    division it would see twice that. Gradients are compared (taken by an optimizer pre-step
    hook), not the updated weights: AdamW's first update is about lr * g / |g| for g and 2g
    alike. beta is small so that the SPIN logits stay near 0, where every row contributes.
    """
    rows = pair_rows(tiny_components, 4)
    plan = make_plan(loss_type=loss_type, beta=20.0, steps=1, max_grad_norm=0.0, lr_schedule="constant",
                     checkpoint_every=0)
    unet = tiny_components.unet.train()
    start = weights(unet)

    def step_gradients(batch_size: int, accumulation: int) -> list[torch.Tensor]:
        unet.load_state_dict(start)
        optim = Optimization.for_plan(unet, plan)
        seen: list[torch.Tensor] = []
        hook = optim.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: seen.extend(p.grad.detach().clone() for p in unet.parameters()))
        batches = [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, 4, batch_size)]
        run_plan = replace(plan, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        run_steps(run_plan, TrainState(), batches, StepRunner(run_plan, unet, None, tiny_components.scheduler, CPU),
                  optim, report=Recorder())
        hook.remove()
        return seen

    accumulated, one_batch = step_gradients(2, 2), step_gradients(4, 1)
    assert len(accumulated) == len(one_batch) == len(list(unet.parameters()))
    total_norm = torch.stack([g.norm() for g in one_batch]).norm()
    assert total_norm > 1e-3  # a real gradient, so a factor 2 cannot hide in zeros
    for g_acc, g_one in zip(accumulated, one_batch, strict=True):
        torch.testing.assert_close(g_acc, g_one, rtol=1e-4, atol=1e-6 * total_norm.item())


# ----------------------------------------------------------------------------- checkpoints


def test_nan_run_stops_without_touching_the_last_good_checkpoint(tiny_components, tmp_path):
    unet = tiny_components.unet
    plan = make_plan(steps=10, max_nonfinite_steps=2)
    optim = Optimization.for_plan(unet, plan)
    nan = float("nan")
    recorder = Recorder(tmp_path)
    after_step_4 = {}

    class Runner(GradientRunner):
        def forward_backward(self, columns):
            if len(recorder.reports) == 4:
                after_step_4.update(weights(self.model))
            return super().forward_backward(columns)

    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        run_steps(plan, TrainState(), grad_batches([0.1, 0.2, nan, 0.3, nan, nan, 0.4, 0.5]), Runner(unet), optim,
                  report=recorder)

    assert recorder.steps() == [1, 2, 3, 4, 5], "step 6 (the second NaN in a row) must not be reported"
    assert [metrics["nonfinite_total"] for metrics, _ in recorder.reports] == [0, 0, 1, 1, 2]
    last_checkpoint = recorder.saved[-1]
    assert json.loads((last_checkpoint / STATE_FILE).read_text())["step"] == 5
    assert_same_tensors(weights(unet), after_step_4)  # steps 5 and 6 changed nothing

    restored = copy.deepcopy(unet)
    for p in restored.parameters():
        p.data.zero_()
    state = load_checkpoint(last_checkpoint, Optimization.for_plan(restored, plan))
    assert state.step == 5 and state.nonfinite_total == 2 and [m["step"] for m in state.history] == [1, 2, 3, 4, 5]
    assert_same_tensors(weights(restored), after_step_4)
    assert all(torch.isfinite(v).all() for v in weights(restored).values())


def test_training_resumed_from_a_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_ends(
        tiny_pipeline_dir, tmp_path):
    """Kill after 3 of 5 micro-batches (checkpoint at step 2, 2 micro-batches each), restore into
    fresh objects, replay the whole stream: weights, AdamW state and schedule match exactly."""
    from spin_ray.diffusion import load_unet

    plan = make_plan(steps=5, gradient_accumulation_steps=2, checkpoint_every=2, warmup_steps=2,
                     max_nonfinite_steps=3)
    batches = grad_batches([0.01 * i for i in range(10)])
    batches[5] = {"grad": float("nan")}  # step 3 is skipped, before and after the restart

    def fresh() -> Optimization:
        return Optimization.for_plan(load_unet(str(tiny_pipeline_dir), local_files_only=True).train(), plan)

    optim = fresh()
    uninterrupted = Recorder()
    run_steps(plan, TrainState(), batches, GradientRunner(optim.model), optim, report=uninterrupted)
    expected = weights(optim.model), optimizer_tensors(optim.optimizer), optim.lr_scheduler.state_dict()
    history = [metrics for metrics, _ in uninterrupted.reports]

    optim, killed = fresh(), Recorder(tmp_path)
    with pytest.raises(Killed):
        run_steps(plan, TrainState(), killed_after(batches, 7), GradientRunner(optim.model), optim, report=killed)

    optim = fresh()
    state = load_checkpoint(killed.saved[-1], optim)
    assert state.step == 2 and [m["step"] for m in state.history] == [1, 2]
    run_steps(plan, state, batches, GradientRunner(optim.model), optim, report=Recorder())

    assert_same_tensors(weights(optim.model), expected[0])
    assert_same_tensors(optimizer_tensors(optim.optimizer), expected[1])
    assert optim.lr_scheduler.state_dict() == expected[2]
    assert [m["step"] for m in state.history] == [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert state.nonfinite_total == 1 and history[-1]["nonfinite_total"] == 1


def test_checkpoint_files_are_safetensors_and_weights_only(tiny_components, tmp_path):
    """The UNet is stored as safetensors; the optimizer file loads with ``weights_only=True``."""
    unet = tiny_components.unet
    plan = make_plan()
    optim = Optimization.for_plan(unet, plan)
    set_grads(unet, 0.1)
    optimizer_step(optim, plan.max_grad_norm)
    save_checkpoint(tmp_path, optim, TrainState(step=1))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["metrics.jsonl", "optimizer.pt", "trainer_state.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(saved) == {"optimizer", "lr_scheduler"}


OLD_STATE_JSON = '{"step": 4, "nonfinite_in_a_row": 1, "nonfinite_total": 2, "first_batch_time": 1767225600.25}'
"""trainer_state.json as checkpoints written before spin_ray.train_loop had it."""


def test_trainer_state_json_keeps_the_format_of_earlier_checkpoints(tiny_components, tmp_path):
    """A checkpoint written before this module restores (run directories resume across the
    change), and a new one writes the very same trainer_state.json."""
    history = [{"step": 2, "lr": 1e-3, "loss": 0.5}, {"step": 4, "lr": 5e-4, "loss": 0.25}]
    state = TrainState(step=4, nonfinite_in_a_row=1, nonfinite_total=2, first_batch_time=1767225600.25,
                       history=history)
    assert json.dumps(state.to_json()) == OLD_STATE_JSON

    optim = Optimization.for_plan(tiny_components.unet, make_plan())
    save_checkpoint(tmp_path, optim, TrainState())
    (tmp_path / STATE_FILE).write_text(OLD_STATE_JSON)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    assert load_checkpoint(tmp_path, optim) == state
