"""Tests of spin_ray.loss, with the maths written out.

SPIN-Diffusion (eq. 4.9 / C.5, logistic loss, Diffusion-DPO convention), sample i:

    logit_i = -(beta/2) * w_i * ((m_real_i - m_syn_i) - (r_real_i - r_syn_i))
    loss    = (1/B) sum_i softplus(-logit_i) = (1/B) sum_i log(1 + exp(-logit_i))

Gradients (sigma = logistic sigmoid; d softplus(-x)/dx = -sigma(-x)):

    d loss / d m_real_i = (1/B) * (-sigma(-logit_i)) * (-(beta/2) w_i) = +(beta w_i / 2B) sigma(-logit_i)
    d loss / d m_syn_i  = -(beta w_i / 2B) sigma(-logit_i)
    d loss / d r_*      = 0 (the opponent is frozen)

So lowering the policy's error on real data, or raising it on synthetic data, lowers the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from spin_ray.loss import (
    DpoLossOutput,
    SpinLossOutput,
    diffusion_dpo_loss,
    h2_weight,
    per_sample_mse,
    sft_loss,
    spin_loss,
)

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    """log(1 + exp(x)) by hand, stable for large |x|."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ----------------------------------------------------------------------------- per_sample_mse


def test_per_sample_mse_hand_values():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 2.0]]]])
    # sample 0: four squared errors of 1 -> mean 1; sample 1: (4 + 0 + 0 + 4) / 4 = 2
    mse = per_sample_mse(pred, target)
    assert mse.shape == (2,)
    assert mse.dtype == torch.float32
    torch.testing.assert_close(mse, torch.tensor([1.0, 2.0]))


def test_per_sample_mse_bf16_is_float32_and_exact_on_upcast_values():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 8, 8).to(torch.bfloat16)
    target = torch.randn(3, 4, 8, 8).to(torch.bfloat16)
    mse = per_sample_mse(pred, target)
    assert mse.dtype == torch.float32
    expected = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mse, expected)


def test_per_sample_mse_under_autocast_stays_float32():
    pred = torch.randn(2, 4, 4, 4)
    target = torch.randn(2, 4, 4, 4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mse = per_sample_mse(pred, target)
    assert mse.dtype == torch.float32
    torch.testing.assert_close(mse, ((pred - target) ** 2).mean(dim=(1, 2, 3)))


def test_per_sample_mse_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(2, 4, 4, 3\)"):
        per_sample_mse(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 3))


# ----------------------------------------------------------------------------- spin_loss values


def test_theta_equals_opponent_gives_exactly_log2_and_zero_accuracy():
    # theta == theta_k: m_real = r_real and m_syn = r_syn, so every logit is 0,
    # loss = softplus(0) = log 2, and no sample has logit > 0.
    m_real, m_syn = t(0.3, 0.7, 1.1), t(0.5, 0.2, 0.9)
    out = spin_loss(m_real, m_syn, m_real.clone(), m_syn.clone(), beta=5000.0)
    assert isinstance(out, SpinLossOutput)
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert out.implicit_acc.item() == 0.0
    assert out.logits_mean.item() == 0.0
    assert out.reward_real.item() == 0.0 and out.reward_syn.item() == 0.0 and out.margin.item() == 0.0


def test_exact_values_on_hand_made_batch():
    beta = 10.0
    m_real, m_syn = [0.10, 0.30], [0.40, 0.20]
    r_real, r_syn = [0.20, 0.25], [0.30, 0.30]
    # sample 0: (m_real - m_syn) - (r_real - r_syn) = (-0.30) - (-0.10) = -0.20 -> logit = -5 * -0.20 = +1.0
    # sample 1: ( 0.10)        - (-0.05)           =  0.15               -> logit = -5 *  0.15 = -0.75
    logits = [1.0, -0.75]
    expected_loss = (softplus(-1.0) + softplus(0.75)) / 2
    # rewards: -(beta/2)(m - r): real: [-5*-0.10, -5*0.05] = [0.5, -0.25] -> mean 0.125
    #                             syn:  [-5* 0.10, -5*-0.10] = [-0.5, 0.5] -> mean 0.0
    out = spin_loss(t(*m_real), t(*m_syn), t(*r_real), t(*r_syn), beta=beta)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert out.implicit_acc.item() == pytest.approx(0.5)
    assert out.logits_mean.item() == pytest.approx(sum(logits) / 2, rel=1e-6)
    assert out.reward_real.item() == pytest.approx(0.125, rel=1e-6)
    assert out.reward_syn.item() == pytest.approx(0.0, abs=1e-6)
    assert out.margin.item() == pytest.approx(0.125, rel=1e-6)
    assert out.policy_mse_real.item() == pytest.approx(0.2)
    assert out.policy_mse_syn.item() == pytest.approx(0.3)
    assert out.ref_mse_real.item() == pytest.approx(0.225)
    assert out.ref_mse_syn.item() == pytest.approx(0.3)


def test_sign_policy_better_on_real_and_worse_on_synthetic_lowers_loss():
    # The policy fits the real image better than theta_k (m_real < r_real) and its own
    # opponent's sample worse (m_syn > r_syn): logit = -(beta/2)(-d - d) > 0 -> loss < log 2.
    ref_real, ref_syn = t(0.5, 0.5), t(0.5, 0.5)
    better = spin_loss(t(0.49, 0.48), t(0.51, 0.52), ref_real, ref_syn, beta=100.0)
    assert better.loss.item() < LOG2
    assert better.implicit_acc.item() == 1.0
    assert better.reward_real.item() > 0 > better.reward_syn.item()
    # The mirror image (worse on real, better on synthetic) raises it above log 2.
    worse = spin_loss(t(0.51, 0.52), t(0.49, 0.48), ref_real, ref_syn, beta=100.0)
    assert worse.loss.item() > LOG2
    assert worse.implicit_acc.item() == 0.0


def test_metrics_returns_floats_for_every_field():
    out = spin_loss(t(0.1), t(0.2), t(0.15), t(0.15), beta=2.0)
    metrics = out.metrics()
    assert set(metrics) == {
        "loss", "implicit_acc", "reward_real", "reward_syn", "margin", "policy_mse_real",
        "policy_mse_syn", "ref_mse_real", "ref_mse_syn", "logits_mean", "logits_abs_mean",
    }
    assert all(type(v) is float for v in metrics.values())
    # logit = -1 * ((0.1 - 0.2) - 0) = 0.1
    assert metrics["loss"] == pytest.approx(softplus(-0.1), rel=1e-6)
    assert metrics["logits_abs_mean"] == pytest.approx(0.1, rel=1e-6)


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_only_the_policy_terms_and_match_hand_derivation():
    beta = 4.0
    m_real, m_syn = t(0.2, 0.6, grad=True), t(0.5, 0.1, grad=True)
    r_real, r_syn = t(0.3, 0.4, grad=True), t(0.3, 0.2, grad=True)
    out = spin_loss(m_real, m_syn, r_real, r_syn, beta=beta)
    out.loss.backward()
    assert r_real.grad is None and r_syn.grad is None
    # logit_0 = -2 * ((0.2 - 0.5) - (0.3 - 0.3)) = 0.6 ; logit_1 = -2 * ((0.6 - 0.1) - (0.4 - 0.2)) = -0.6
    batch = 2
    expected_real = [beta / (2 * batch) * sigmoid(-logit) for logit in (0.6, -0.6)]
    torch.testing.assert_close(m_real.grad, torch.tensor(expected_real))
    torch.testing.assert_close(m_syn.grad, -torch.tensor(expected_real))
    # Metrics are detached: they never feed a second backward.
    assert not out.implicit_acc.requires_grad and not out.margin.requires_grad


def test_gradient_flows_through_per_sample_mse_into_the_prediction():
    torch.manual_seed(0)
    pred_real = torch.randn(2, 1, 2, 2, requires_grad=True)
    pred_syn = torch.randn(2, 1, 2, 2, requires_grad=True)
    noise = torch.randn(2, 1, 2, 2)
    ref = torch.tensor([1.0, 1.0])
    out = spin_loss(per_sample_mse(pred_real, noise), per_sample_mse(pred_syn, noise), ref, ref, beta=1.0)
    out.loss.backward()
    assert pred_real.grad is not None and pred_real.grad.abs().sum() > 0
    assert pred_syn.grad is not None and pred_syn.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("gap", [0.1, 1.0])
def test_stable_at_logits_in_the_hundreds_and_thousands(gap: float):
    # beta = 5000, gap 0.1 -> |logit| = 250; gap 1.0 -> |logit| = 2500.
    beta = 5000.0
    logit = beta / 2 * gap
    # Policy far better than the opponent: logit = +L, loss -> exp(-L) ~ 0, gradient -> 0.
    m_real = t(0.0, grad=True)
    good = spin_loss(m_real, t(gap), t(0.0), t(0.0), beta=beta)
    good.loss.backward()
    assert math.isfinite(good.loss.item()) and good.loss.item() == pytest.approx(0.0, abs=1e-30)
    assert math.isfinite(m_real.grad.item()) and m_real.grad.item() == pytest.approx(0.0, abs=1e-30)
    # Policy far worse: logit = -L, loss -> L (linear asymptote), gradient -> beta/2 per sample.
    m_real = t(gap, grad=True)
    bad = spin_loss(m_real, t(0.0), t(0.0), t(0.0), beta=beta)
    bad.loss.backward()
    assert bad.loss.item() == pytest.approx(logit, rel=1e-6)
    assert m_real.grad.item() == pytest.approx(beta / 2, rel=1e-6)
    assert bad.implicit_acc.item() == 0.0 and good.implicit_acc.item() == 1.0


def test_bf16_inputs_give_float32_results_equal_to_fp32():
    torch.manual_seed(0)
    values = [torch.rand(8).to(torch.bfloat16) for _ in range(4)]
    out_bf16 = spin_loss(*values, beta=2000.0)
    out_fp32 = spin_loss(*[v.float() for v in values], beta=2000.0)
    for name, value in out_bf16.metrics().items():
        assert getattr(out_bf16, name).dtype == torch.float32, name
        assert value == out_fp32.metrics()[name], name


# ----------------------------------------------------------------------------- weight, DPO, SFT


def test_weight_multiplies_each_logit():
    beta = 2.0
    m_real, m_syn, r_real, r_syn = t(0.1, 0.1), t(0.3, 0.3), t(0.2, 0.2), t(0.2, 0.2)
    # unweighted logit = -1 * ((0.1 - 0.3) - 0) = 0.2 for both; weights 3 and 0.5 -> 0.6, 0.1
    out = spin_loss(m_real, m_syn, r_real, r_syn, beta=beta, weight=t(3.0, 0.5))
    assert out.loss.item() == pytest.approx((softplus(-0.6) + softplus(-0.1)) / 2, rel=1e-6)
    assert out.logits_mean.item() == pytest.approx(0.35, rel=1e-6)
    assert out.margin.item() == pytest.approx(out.logits_mean.item(), rel=1e-6)
    ones = spin_loss(m_real, m_syn, r_real, r_syn, beta=beta, weight=torch.ones(2))
    plain = spin_loss(m_real, m_syn, r_real, r_syn, beta=beta)
    assert ones.metrics() == plain.metrics()


def test_diffusion_dpo_and_spin_both_match_the_dpo_formula_by_hand():
    # Diffusion-DPO (Wallace et al. 2023, eq. 14 in the reference trainer's convention), per pair:
    #   logit = -(beta/2) w ((m_win - r_win) - (m_lose - r_lose)), loss = mean softplus(-logit),
    # computed here in float64 from the inputs; SPIN-Diffusion with (real, syn) = (win, lose)
    # must give the same numbers under its own field names.
    torch.manual_seed(1)
    win, lose, ref_win, ref_lose = (torch.rand(5) for _ in range(4))
    weight = torch.rand(5) + 0.5
    beta = 30.0
    rows = zip(*(x.tolist() for x in (win, lose, ref_win, ref_lose, weight)), strict=True)
    reward_win, reward_lose, logits = [], [], []
    for mw, ml, rw, rl, w in rows:
        reward_win.append(-(beta / 2) * w * (mw - rw))
        reward_lose.append(-(beta / 2) * w * (ml - rl))
        logits.append(reward_win[-1] - reward_lose[-1])
    by_hand = {
        "loss": sum(softplus(-x) for x in logits) / 5,
        "implicit_acc": sum(x > 0 for x in logits) / 5,
        "reward_win": sum(reward_win) / 5,
        "reward_lose": sum(reward_lose) / 5,
        "margin": sum(logits) / 5,
        "logits_mean": sum(logits) / 5,
        "logits_abs_mean": sum(abs(x) for x in logits) / 5,
        "policy_mse_win": win.double().mean().item(),
        "policy_mse_lose": lose.double().mean().item(),
        "ref_mse_win": ref_win.double().mean().item(),
        "ref_mse_lose": ref_lose.double().mean().item(),
    }
    assert 0 < by_hand["implicit_acc"] < 1  # both signs of logit occur in this batch

    dpo = diffusion_dpo_loss(win, lose, ref_win, ref_lose, beta=beta, weight=weight)
    spin = spin_loss(win, lose, ref_win, ref_lose, beta=beta, weight=weight)
    assert isinstance(dpo, DpoLossOutput)
    assert dpo.metrics() == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    spin_names = {k.replace("win", "real").replace("lose", "syn"): v for k, v in by_hand.items()}
    assert spin.metrics() == pytest.approx(spin_names, rel=1e-5, abs=1e-6)


def test_sft_loss_is_mean_denoising_mse():
    pred = torch.zeros(2, 1, 1, 2, requires_grad=True)
    target = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 2.0]]]])
    out = sft_loss(pred, target)
    # sample errors: (1 + 9)/2 = 5 and (0 + 4)/2 = 2 -> mean 3.5
    assert out.loss.item() == pytest.approx(3.5)
    assert out.metrics() == {"loss": 3.5, "mse": 3.5}
    out.loss.backward()
    # d/dpred of (1/B)(1/N) sum (pred - target)^2 = 2 (pred - target) / (B N) = -(target) / 2
    torch.testing.assert_close(pred.grad, -target / 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy_mse_real": torch.zeros(2, 1)}, r"policy_mse_win: expected shape \(B,\)"),
        ({"ref_mse_syn": torch.zeros(3)}, r"ref_mse_lose: expected shape \(2,\)"),
        ({"weight": torch.ones(3)}, r"weight: expected shape \(2,\)"),
        ({"beta": 0.0}, r"beta: must be positive"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs: dict, message: str):
    args = {
        "policy_mse_real": torch.zeros(2), "policy_mse_syn": torch.zeros(2),
        "ref_mse_real": torch.zeros(2), "ref_mse_syn": torch.zeros(2), "beta": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        spin_loss(**args)


# ----------------------------------------------------------------------------- h_t^2 weighting


def sd_alphas_cumprod() -> torch.Tensor:
    """The Stable Diffusion 1.5 training schedule."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return scheduler.alphas_cumprod


def test_h2_weight_has_mean_one_over_all_timesteps_and_is_positive():
    abar = sd_alphas_cumprod()
    weights = h2_weight(abar, torch.arange(1000))
    assert weights.shape == (1000,) and weights.dtype == torch.float32
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (weights > 0).all()


def test_h2_weight_matches_formula_by_hand():
    # h_t = sqrt(1 - abar_{t-1}) - sqrt(abar_{t-1} (1 - abar_t) / abar_t), abar_{-1} = 1.
    abar = [0.9, 0.6, 0.2]
    prev = [1.0, 0.9, 0.6]
    h2 = [(math.sqrt(1 - p) - math.sqrt(p * (1 - a) / a)) ** 2 for a, p in zip(abar, prev, strict=True)]
    mean = sum(h2) / 3
    weights = h2_weight(torch.tensor(abar), torch.tensor([2, 0, 2, 1]))
    torch.testing.assert_close(weights, torch.tensor([h2[2], h2[0], h2[2], h2[1]]) / mean)
    # The same h_t^2 simplified by hand (a check of the function, not of the lines above):
    #   t = 0: (0 - sqrt(0.1 / 0.9))^2 = 1/9 (with abar_{-1} = 1, h_0^2 = (1 - abar_0) / abar_0)
    #   t = 1: (sqrt(0.1) - sqrt(0.9 * 0.4 / 0.6))^2 = 0.1 + 0.6 - 2 sqrt(0.06)
    #   t = 2: (sqrt(0.4) - sqrt(0.6 * 0.8 / 0.2))^2 = 0.4 + 2.4 - 2 sqrt(0.96)
    simplified = [1 / 9, 0.7 - 2 * math.sqrt(0.06), 2.8 - 2 * math.sqrt(0.96)]
    expected = torch.tensor(simplified, dtype=torch.float64) / (sum(simplified) / 3)
    torch.testing.assert_close(h2_weight(torch.tensor(abar), torch.tensor([0, 1, 2])), expected.float())


def test_h2_weight_feeds_spin_loss():
    abar = sd_alphas_cumprod()
    timesteps = torch.tensor([10, 500, 999])
    weight = h2_weight(abar, timesteps)
    ones = torch.ones(3)
    out = spin_loss(0.5 * ones, ones, ones, ones, beta=2.0, weight=weight)
    # logit_i = -1 * w_i * (0.5 - 1) = w_i / 2
    torch.testing.assert_close(out.logits_mean, (weight / 2).mean())


def test_h2_weight_rejects_out_of_range_timesteps():
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\).*max 1000"):
        h2_weight(sd_alphas_cumprod(), torch.tensor([0, 1000]))
