"""Tests written for the mutants of the training step and loop that survived ``make mutation``
(docs/TESTING.md): the wiring of noise sharing, the online reference, the loss type and mixed
precision; the rank-0 log lines; the throughput metric; the defaults of an old trainer_state.json;
checkpoint loading's refusal of pickled objects; ``on_every_rank``'s vote across ranks.

Expected values are computed here: by hand from the row seeds (t, eps, eps' drawn in the
documented order), from the formulas, or from what theta == theta_k implies (logit 0, loss log 2).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler
from train_helpers import make_plan, pair_rows

import spin_ray.train_loop as train_loop
from spin_ray.pair_schema import SFT_COLUMNS, PairBatch
from spin_ray.train_loop import (
    MetricWindow,
    Optimization,
    StepRunner,
    TrainState,
    count_nonfinite,
    load_checkpoint,
    load_models,
    on_every_rank,
    run_steps,
    save_checkpoint,
)
from spin_ray.train_step import (
    dpo_batch_loss,
    gradients_finite,
    make_lr_scheduler,
    make_optimizer,
    pair_errors,
    sft_batch_loss,
    spin_batch_loss,
)

CPU = torch.device("cpu")
LOG2 = math.log(2.0)


def _batch(rows: dict, *, with_reference: bool = True) -> PairBatch:
    columns = {**rows, "prompt_embeds": rows["prompt_embeds"].float()}
    if not with_reference:
        columns = {k: v for k, v in columns.items() if not k.startswith("ref_mse")}
    return PairBatch.from_columns(columns)


def _errors_by_hand(unet, scheduler, batch: PairBatch, *, shared_noise: bool):
    """Row i's (mse_real, mse_syn) for the scheduler's target, drawn from its seed in the
    documented order (t, eps, then eps' unless shared), in float64."""
    prediction_type = scheduler.config.prediction_type
    real, syn = [], []
    for i, seed in enumerate(batch.noise_seed.tolist()):
        generator = torch.Generator().manual_seed(int(seed))
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        shape = batch.latents_real.shape[1:]
        eps = torch.randn(shape, generator=generator)
        eps_syn = eps if shared_noise else torch.randn(shape, generator=generator)
        abar = scheduler.alphas_cumprod[t]
        errors = []
        for x0, noise in ((batch.latents_real[i : i + 1], eps), (batch.latents_syn[i : i + 1], eps_syn)):
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            with torch.no_grad():
                pred = unet(x_t, t, encoder_hidden_states=batch.prompt_embeds[i : i + 1]).sample.double()
            target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
            errors.append(((pred - target.double()) ** 2).mean().item())
        real.append(errors[0])
        syn.append(errors[1])
    return real, syn


# ----------------------------------------------------------------------------- spin_ray.train_step


@pytest.mark.parametrize("shared_noise", [True, False])
def test_pair_errors_draw_shared_or_independent_noise_for_the_synthetic_branch(tiny_components, shared_noise):
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    batch = _batch(pair_rows(tiny_components, 2))
    with torch.no_grad():
        mse_real, mse_syn, _ = pair_errors(unet, scheduler, batch.latents_real, batch.latents_syn,
                                           batch.prompt_embeds, batch.noise_seed, shared_noise=shared_noise)
    real, syn = _errors_by_hand(unet, scheduler, batch, shared_noise=shared_noise)
    assert mse_real.tolist() == pytest.approx(real, rel=1e-4)
    assert mse_syn.tolist() == pytest.approx(syn, rel=1e-4)


def test_pair_errors_and_the_sft_loss_use_the_v_prediction_target(tiny_components):
    """For a v-prediction model the target is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    unet = tiny_components.unet
    scheduler = DDIMScheduler.from_config(tiny_components.scheduler.config, prediction_type="v_prediction")
    batch = _batch(pair_rows(tiny_components, 2))
    real, syn = _errors_by_hand(unet, scheduler, batch, shared_noise=True)
    with torch.no_grad():
        mse_real, mse_syn, _ = pair_errors(unet, scheduler, batch.latents_real, batch.latents_syn,
                                           batch.prompt_embeds, batch.noise_seed)
        sft = sft_batch_loss(unet, scheduler, batch)
    assert mse_real.tolist() == pytest.approx(real, rel=1e-4)
    assert mse_syn.tolist() == pytest.approx(syn, rel=1e-4)
    assert sft.loss.item() == pytest.approx(sum(real) / len(real), rel=1e-4)


def test_with_theta_equal_to_theta_k_and_independent_noise_the_spin_loss_is_log_2(tiny_components):
    """Both branches of both models must see the same draw (eps for real, eps' for synthetic):
    then m == r for every row, every logit is 0 and the loss is log 2."""
    unet = tiny_components.unet
    batch = _batch(pair_rows(tiny_components, 2), with_reference=False)
    out = spin_batch_loss(unet, tiny_components.scheduler, batch, beta=2000.0, shared_noise=False,
                          ref_unet=copy.deepcopy(unet))
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-6)


def test_a_batch_without_reference_errors_and_no_reference_model_is_refused(tiny_components):
    batch = _batch(pair_rows(tiny_components, 2), with_reference=False)
    with pytest.raises(ValueError, match=r"^spin_batch_loss: the batch has no ref_mse_real/ref_mse_syn and no ref_unet was given$"):
        spin_batch_loss(tiny_components.unet, tiny_components.scheduler, batch, beta=1.0)


def test_make_optimizer_uses_the_given_lr_and_weight_decay_for_trainable_parameters_only():
    trained, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer = make_optimizer([trained, frozen], lr=3e-5, weight_decay=0.25)
    (group,) = optimizer.param_groups
    assert group["lr"] == 3e-5 and group["weight_decay"] == 0.25
    assert group["params"] == [trained]


def test_parameters_without_gradients_count_as_finite():
    assert gradients_finite([torch.nn.Parameter(torch.zeros(2))]) is True
    assert gradients_finite([]) is True


def _dpo_loss_by_hand(real, syn, ref_real, ref_syn, beta):
    """Diffusion-DPO on (winner, loser) = (real, syn): mean_i log(1 + exp(-logit_i)),
    logit_i = -(beta/2) ((m_w - m_l) - (r_w - r_l))."""
    logits = [-(beta / 2) * ((mw - ml) - (rw - rl)) for mw, ml, rw, rl in zip(real, syn, ref_real, ref_syn, strict=True)]
    return sum(math.log1p(math.exp(-z)) for z in logits) / len(logits)


def test_the_dpo_batch_loss_is_diffusion_dpo_with_one_noise_draw_per_pair(tiny_components):
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    rows = pair_rows(tiny_components, 2)
    rows["ref_mse_real"], rows["ref_mse_syn"] = torch.tensor([1.01, 0.99]), torch.tensor([1.0, 1.02])
    batch = _batch(rows)
    real, syn = _errors_by_hand(unet, scheduler, batch, shared_noise=True)  # the winner and loser share eps
    out = dpo_batch_loss(unet, scheduler, batch, beta=20.0)
    expected = _dpo_loss_by_hand(real, syn, [1.01, 0.99], [1.0, 1.02], 20.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    online = dpo_batch_loss(unet, scheduler, _batch(rows, with_reference=False), beta=20.0,
                            ref_unet=copy.deepcopy(unet))
    assert online.loss.item() == pytest.approx(LOG2, abs=1e-6)  # theta == theta_0
    with pytest.raises(ValueError, match=r"^dpo_batch_loss: the batch has no ref_mse_real/ref_mse_syn"):
        dpo_batch_loss(unet, scheduler, _batch(rows, with_reference=False), beta=20.0)


def test_the_cosine_schedule_warms_up_then_follows_half_a_cosine_to_zero():
    base_lr, warmup, total = 1e-3, 2, 6
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([param], lr=base_lr, weight_decay=0.0)
    scheduler = make_lr_scheduler(optimizer, schedule="cosine", warmup_steps=warmup, total_steps=total)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    by_hand = [base_lr * (k / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
               for k in range(total + 1)]
    assert seen == pytest.approx(by_hand, abs=1e-12)
    assert seen[warmup] == pytest.approx(base_lr) and seen[total] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- spin_ray.train_loop: the step runner


class AutocastRecorder:
    """Stands in for torch.autocast: records how the step runner asked for it."""

    def __init__(self, device_type, dtype=None, enabled=True):
        self.device_type, self.dtype, self.enabled = device_type, dtype, enabled


@pytest.mark.parametrize(
    ("mixed_precision", "device_type", "bf16"),
    [("bf16", "cpu", True), ("bf16", "cuda", True), ("auto", "cuda", True), ("auto", "cpu", False),
     ("no", "cuda", False), ("no", "cpu", False)],
)
def test_the_step_runner_autocasts_to_bf16_when_the_plan_asks_or_auto_on_cuda(
    monkeypatch, mixed_precision, device_type, bf16
):
    monkeypatch.setattr(torch, "autocast", AutocastRecorder)
    runner = StepRunner(make_plan(mixed_precision=mixed_precision), None, None, None, torch.device(device_type))
    assert (runner.autocast.device_type, runner.autocast.dtype, runner.autocast.enabled) == (
        device_type, torch.bfloat16, bf16)


def test_an_sft_runner_trains_on_sft_rows_with_the_denoising_loss(tiny_components):
    # SFT rows have no synthetic latents and no reference errors: only the SFT loss can use them.
    rows = {k: v for k, v in pair_rows(tiny_components, 2).items() if k in SFT_COLUMNS}
    runner = StepRunner(make_plan(loss_type="sft"), tiny_components.unet.train(), None,
                        tiny_components.scheduler, CPU)
    metrics = runner.forward_backward(rows)
    assert set(metrics) == {"loss", "mse"}
    real, _ = _errors_by_hand(tiny_components.unet, tiny_components.scheduler, _batch(rows, with_reference=False),
                              shared_noise=True)
    assert metrics["loss"] == pytest.approx(sum(real) / len(real), rel=1e-4)


def test_an_online_reference_runner_uses_theta_k_and_ignores_precomputed_errors(tiny_components):
    unet = tiny_components.unet.train()
    rows = pair_rows(tiny_components, 2)
    rows["ref_mse_real"] = torch.full((2,), float("nan"))  # what the Data side writes when online
    plan = make_plan(online_reference=True)
    runner = StepRunner(plan, unet, copy.deepcopy(unet).eval(), tiny_components.scheduler, CPU)
    assert runner.forward_backward(rows)["loss"] == pytest.approx(LOG2, abs=1e-6)
    without_reference_model = StepRunner(plan, unet, None, tiny_components.scheduler, CPU)
    with pytest.raises(ValueError, match="no ref_mse_real/ref_mse_syn and no ref_unet"):
        without_reference_model.forward_backward(pair_rows(tiny_components, 2))


def test_a_dpo_runner_trains_on_winner_loser_pairs_with_the_dpo_loss(tiny_components):
    unet = tiny_components.unet.train()
    rows = pair_rows(tiny_components, 2)  # reference errors 1.0
    metrics = StepRunner(make_plan(loss_type="dpo", beta=20.0), unet, None, tiny_components.scheduler,
                         CPU).forward_backward(rows)
    assert "reward_win" in metrics and "reward_real" not in metrics
    real, syn = _errors_by_hand(unet, tiny_components.scheduler, _batch(rows), shared_noise=True)
    assert metrics["loss"] == pytest.approx(_dpo_loss_by_hand(real, syn, [1.0, 1.0], [1.0, 1.0], 20.0), rel=1e-4)


def test_an_online_dpo_runner_uses_theta_0_as_the_reference(tiny_components):
    unet = tiny_components.unet.train()
    rows = {k: v for k, v in pair_rows(tiny_components, 2).items() if not k.startswith("ref_mse")}
    runner = StepRunner(make_plan(loss_type="dpo", online_reference=True), unet, copy.deepcopy(unet).eval(),
                        tiny_components.scheduler, CPU)
    assert runner.forward_backward(rows)["loss"] == pytest.approx(LOG2, abs=1e-6)  # theta == theta_0


def test_a_batch_with_only_one_of_the_two_reference_columns_is_refused(tiny_components):
    batch = replace(_batch(pair_rows(tiny_components, 2)), ref_mse_syn=None)
    with pytest.raises(ValueError, match="no ref_mse_real/ref_mse_syn and no ref_unet"):
        spin_batch_loss(tiny_components.unet, tiny_components.scheduler, batch, beta=1.0)


def test_the_step_runner_passes_the_plans_noise_sharing_to_the_loss(tiny_components):
    """With precomputed reference errors of 1.0 (pair_rows), the loss depends on eps': the
    runner's loss is the one of independent noise, not the one of shared noise."""
    unet, scheduler = tiny_components.unet.train(), tiny_components.scheduler
    rows = pair_rows(tiny_components, 2)
    plan = make_plan(shared_noise=False, beta=20.0)
    loss = StepRunner(plan, unet, None, scheduler, CPU).forward_backward(rows)["loss"]
    batch = _batch(rows)
    by_hand = {}
    for shared in (True, False):
        real, syn = _errors_by_hand(unet, scheduler, batch, shared_noise=shared)
        logits = [-(plan.beta / 2) * ((r - s) - (1.0 - 1.0)) for r, s in zip(real, syn, strict=True)]
        by_hand[shared] = sum(math.log1p(math.exp(-z)) for z in logits) / len(logits)
    assert loss == pytest.approx(by_hand[False], rel=1e-4)
    assert abs(by_hand[True] - by_hand[False]) > 1e-3 * by_hand[False]


# ----------------------------------------------------------------------------- the loop: logs, throughput, state


class ConstantRunner:
    """Each micro-batch sets every gradient to 1 and reports ``{"loss": columns["loss"]}``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def forward_backward(self, columns: dict) -> dict[str, float]:
        for p in self.model.parameters():
            p.grad = torch.ones_like(p)
        return {"loss": columns["loss"]}


def _run(plan, batches, **kwargs):
    model = torch.nn.Linear(2, 1)
    optim = Optimization.for_plan(model, plan)
    reports = []
    state = run_steps(plan, TrainState(), batches, ConstantRunner(model), optim,
                      report=lambda metrics, checkpoint: reports.append(metrics), **kwargs)
    return state, reports


def test_rank_0_logs_each_report_with_floats_rounded_to_6_decimals_and_other_ranks_stay_quiet(capsys):
    plan = make_plan(steps=3, lr=1e-3, warmup_steps=0, lr_schedule="linear", checkpoint_every=0)
    _, reports = _run(plan, [{"loss": 0.123456789}] * 3)  # rank defaults to 0
    lines = [json.loads(line)["train"] for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(reports) == 3
    for line, metrics in zip(lines, reports, strict=True):
        assert line["step"] == metrics["step"]
        assert line["loss"] == 0.123457
        assert line["lr"] == round(metrics["lr"], 6)
    assert lines[0]["lr"] == 0.000667  # 1e-3 * 2/3 after the first of three linear-decay steps
    _run(plan, [{"loss": 0.5}] * 3, rank=1)
    assert capsys.readouterr().out == ""


def test_rank_0_logs_a_skipped_step_from_the_loop(capsys):
    plan = make_plan(steps=2, max_nonfinite_steps=5, log_every=100, checkpoint_every=0)
    state, _ = _run(plan, [{"loss": float("nan")}, {"loss": 1.0}])
    assert (state.step, state.nonfinite_total) == (2, 1)
    skipped = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert skipped == [{"train_skipped_nonfinite_step": {"step": 1, "nonfinite_in_a_row": 1, "nonfinite_total": 1}}]


def test_the_loop_returns_its_state_when_the_data_outlasts_the_steps():
    plan = make_plan(steps=2, checkpoint_every=0)
    state, reports = _run(plan, [{"loss": 1.0}] * 5)
    assert isinstance(state, TrainState) and state.step == 2 and len(reports) == 2


def test_count_nonfinite_says_where_the_last_finite_weights_are():
    with pytest.raises(train_loop.NonFiniteError, match="the last checkpoint holds the last finite weights$"):
        count_nonfinite(TrainState(step=3), False, max_in_a_row=1, rank=1)


def test_samples_per_s_is_samples_over_seconds_since_the_last_pop(monkeypatch):
    now = [104.0]
    monkeypatch.setattr(train_loop.time, "time", lambda: now[0])
    window = MetricWindow(started=100.0)
    window.add({"loss": 1.0}, 2)
    window.add({"loss": 3.0}, 2)
    assert window.pop() == {"loss": 2.0, "samples_per_s": 4 / 4.0}
    window.add({"loss": 5.0}, 3)
    now[0] = 104.5  # under a second: 3 samples in 0.5 s
    assert window.pop() == {"loss": 5.0, "samples_per_s": 3 / 0.5}
    now[0] = 106.0
    assert window.pop() == {"samples_per_s": 0.0}


def test_an_old_trainer_state_without_counters_resumes_from_zero():
    state = TrainState.from_json({})
    assert (state.step, state.nonfinite_in_a_row, state.nonfinite_total) == (0, 0, 0)
    assert state.first_batch_time is None and state.history == []


def test_the_plans_learning_rate_schedule_reaches_the_optimizer():
    model = torch.nn.Linear(2, 1)
    optim = Optimization.for_plan(model, make_plan(lr=1e-3, steps=4, warmup_steps=0, lr_schedule="linear"))
    for _ in range(2):
        optim.optimizer.step()
        optim.lr_scheduler.step()
    assert optim.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (4 - 2) / 4)


def test_the_device_of_a_model_is_its_parameters_or_the_cpu_without_any():
    assert train_loop._device_of(torch.nn.Linear(2, 1, device="meta")) == torch.device("meta")
    assert train_loop._device_of(torch.nn.Sequential()) == CPU


# ----------------------------------------------------------------------------- checkpoints and models


def test_a_checkpoint_whose_optimizer_file_holds_other_objects_is_refused(tiny_components, tmp_path):
    """optimizer.pt is read with weights_only=True: a pickled object other than tensors and
    plain containers (here an argparse.Namespace) is not unpickled."""
    import pickle

    optim = Optimization.for_plan(tiny_components.unet, make_plan())
    save_checkpoint(tmp_path, optim, TrainState(step=1))
    saved = torch.load(tmp_path / train_loop.OPTIMIZER_FILE, weights_only=True)
    torch.save({**saved, "extra": argparse.Namespace(x=1)}, tmp_path / train_loop.OPTIMIZER_FILE)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(tmp_path, optim)


@pytest.mark.parametrize(
    ("loss_type", "online", "has_reference"),
    [("spin", True, True), ("spin", False, False), ("sft", True, False)],
)
def test_load_models_gives_theta_in_train_mode_and_theta_k_frozen_only_when_online(
    tiny_pipeline_dir, loss_type, online, has_reference
):
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), loss_type=loss_type, online_reference=online,
                     gradient_checkpointing=True)
    unet, ref_unet, scheduler = load_models(plan, CPU)
    assert unet.training and unet.is_gradient_checkpointing
    assert all(p.requires_grad and p.dtype == torch.float32 and p.device == CPU for p in unet.parameters())
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.num_train_timesteps == 1000
    assert scheduler.alphas_cumprod.device == CPU
    if not has_reference:
        assert ref_unet is None
        return
    assert not ref_unet.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in ref_unet.parameters())
    theta, theta_k = unet.state_dict(), ref_unet.state_dict()
    assert theta.keys() == theta_k.keys() and all(torch.equal(theta[k], theta_k[k]) for k in theta)
    assert ref_unet is not unet


# ----------------------------------------------------------------------------- on_every_rank


class FakeGroup:
    """torch.distributed as seen by one rank of ``1 + len(others)``: all_reduce combines this
    rank's tensor with the other ranks' values by the requested op, as the real one does."""

    def __init__(self, others: list[float]):
        self.others = others
        self.calls = 0

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        import torch.distributed as dist

        self.calls += 1
        combine = {str(dist.ReduceOp.SUM): sum, str(dist.ReduceOp.MIN): min, str(dist.ReduceOp.MAX): max}
        if op is None or str(op) not in combine:
            raise TypeError(f"all_reduce: unsupported op {op!r}")
        values = [float(tensor.item()), *self.others]
        tensor.fill_(combine[str(op)](values))


@pytest.mark.parametrize(
    ("mine", "others", "expected"),
    [(True, [1.0], True), (True, [0.0], False), (False, [1.0], False), (True, [1.0, 0.0], False),
     (True, [], True), (False, [], False)],
)
def test_on_every_rank_ands_the_flag_over_all_ranks(monkeypatch, mine, others, expected):
    import torch.distributed as dist

    group = FakeGroup(others)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1 + len(others))
    monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
    assert on_every_rank(mine, CPU) is expected
    assert group.calls == (1 if others else 0)  # one rank alone asks nobody

