"""The SPIN step without Ray: the opponent generator's output feeds the loss."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spin_ray.diffusion import encode_prompt_ids, row_noise_and_timesteps, tokenize
from spin_ray.generation import GeneratorSpec, OpponentGenerator, derive_seed
from spin_ray.pair_schema import PairBatch
from spin_ray.train_step import (
    make_lr_scheduler,
    make_optimizer,
    pair_errors,
    sft_batch_loss,
    spin_batch_loss,
)


@pytest.fixture
def generated(tiny_pipeline_dir, tiny_components):
    """Three pair rows from the opponent generator (theta_k = the tiny pipeline)."""
    comps = tiny_components
    prompts = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        embeds = encode_prompt_ids(comps.text_encoder, tokenize(comps.tokenizer, prompts))
    latents_real = torch.randn((3, *comps.latent_shape(128)), generator=torch.Generator().manual_seed(0))
    batch = {
        "sample_id": np.arange(3, dtype=np.int64),
        "prompt": np.asarray(prompts, dtype=object),
        "prompt_embeds": embeds.numpy().astype(np.float16),
        "latents_real": latents_real.numpy(),
    }
    spec = GeneratorSpec(model_path=str(tiny_pipeline_dir), iteration=1, run_seed=0, num_inference_steps=3,
                         guidance_scale=2.0, eta=0.0, precompute_reference=True, shared_noise=True,
                         opponents_dir=None)
    return OpponentGenerator(spec)(batch)


def as_batch(rows, *, with_reference: bool) -> PairBatch:
    return PairBatch(
        latents_real=torch.as_tensor(rows["latents_real"]),
        latents_syn=torch.as_tensor(rows["latents_syn"]),
        prompt_embeds=torch.as_tensor(rows["prompt_embeds"]).float(),
        noise_seed=torch.as_tensor(rows["noise_seed"]),
        ref_mse_real=torch.as_tensor(rows["ref_mse_real"]) if with_reference else None,
        ref_mse_syn=torch.as_tensor(rows["ref_mse_syn"]) if with_reference else None,
    )


def test_generator_outputs_pairs_with_reference_errors(generated):
    assert generated["latents_syn"].shape == generated["latents_real"].shape
    assert generated["latents_syn"].dtype == np.float32
    assert np.isfinite(generated["ref_mse_real"]).all() and np.isfinite(generated["ref_mse_syn"]).all()
    assert generated["noise_seed"].tolist() == [derive_seed(0, 1, i, 1) for i in range(3)]


def test_precomputed_and_online_reference_give_the_same_loss(generated, tiny_components):
    """theta == theta_k: the Data-side errors equal the trainer's own; the loss is log 2."""
    policy = tiny_components.unet
    reference = copy.deepcopy(policy)
    scheduler = tiny_components.scheduler
    precomputed = spin_batch_loss(policy, scheduler, as_batch(generated, with_reference=True), beta=2000.0)
    online = spin_batch_loss(policy, scheduler, as_batch(generated, with_reference=False), beta=2000.0,
                             ref_unet=reference)
    torch.testing.assert_close(precomputed.loss, online.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(precomputed.ref_mse_real, online.ref_mse_real, rtol=1e-5, atol=1e-6)
    assert precomputed.loss.item() == pytest.approx(math.log(2), abs=1e-3)


def test_a_step_moves_theta_away_from_the_opponent(generated, tiny_components):
    policy = tiny_components.unet.train()
    scheduler = tiny_components.scheduler
    batch = as_batch(generated, with_reference=True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    before = spin_batch_loss(policy, scheduler, batch, beta=2000.0)
    before.loss.backward()
    optimizer.step()
    after = spin_batch_loss(policy, scheduler, batch, beta=2000.0)
    assert after.loss.item() < before.loss.item()
    assert after.margin > 0


def test_pair_errors_match_a_by_hand_computation(generated, tiny_components):
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    batch = as_batch(generated, with_reference=True)
    with torch.no_grad():
        mse_real, _, timesteps = pair_errors(unet, scheduler, batch.latents_real, batch.latents_syn,
                                             batch.prompt_embeds, batch.noise_seed)
        seed = int(batch.noise_seed[0])
        gen = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (1,), generator=gen)
        eps = torch.randn(batch.latents_real.shape[1:], generator=gen)
        abar = scheduler.alphas_cumprod[t]
        x_t = abar.sqrt() * batch.latents_real[:1] + (1 - abar).sqrt() * eps
        pred = unet(x_t, t, encoder_hidden_states=batch.prompt_embeds[:1]).sample
    assert int(timesteps[0]) == int(t)
    assert mse_real[0].item() == pytest.approx(((pred - eps) ** 2).mean().item(), rel=1e-4)


def test_sft_loss_is_the_denoising_mse_against_the_drawn_noise(generated, tiny_components):
    """The SFT baseline's loss, written out for an epsilon-prediction UNet:

        (t_i, eps_i)  = the draw of row i's noise seed (the same draw the SPIN loss uses)
        x_t_i         = sqrt(abar_{t_i}) x0_i + sqrt(1 - abar_{t_i}) eps_i
        loss          = (1/B) sum_i mean_{C,h,w} (eps_theta(x_t_i, c_i, t_i) - eps_i)^2

    Every row has the same C*h*w, so the mean of the per-row means is the mean over all
    elements. The target is the noise eps_i, not the clean latent x0_i. Both are N(0, I) draws
    here, so the untrained UNet's MSE against either is about 1 + its output's variance; the
    loss against x0_i is computed too and must lie 100 tolerances away from the expected one,
    so the test tells the two targets apart.
    """
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    batch = as_batch(generated, with_reference=True)
    assert scheduler.config.prediction_type == "epsilon"  # the target is eps (SD 1.5's convention)
    out = sft_batch_loss(unet, scheduler, batch)

    x0 = batch.latents_real
    draw = row_noise_and_timesteps(batch.noise_seed.tolist(), tuple(x0.shape[1:]),
                                   scheduler.config.num_train_timesteps)
    eps, t = draw.noise_real, draw.timesteps
    assert len(set(t.tolist())) == 3  # three different timesteps: a per-row mix-up would show
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=batch.prompt_embeds).sample.double()
    expected = ((pred - eps.double()) ** 2).mean().item()
    against_clean_latents = ((pred - x0.double()) ** 2).mean().item()

    rel = 1e-5
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.loss.item() == pytest.approx(expected, rel=rel)
    assert out.mse.item() == pytest.approx(expected, rel=rel)
    assert abs(against_clean_latents - expected) > 100 * rel * expected


def h2_by_hand(alphas_cumprod: torch.Tensor, step: int) -> float:
    """h_t^2 of paper eq. C.5 for 0-based training timestep ``step``, normalised to mean 1.

    The deterministic DDIM mean is linear in the predicted noise e:
        mu(e) = sqrt(abar_prev) (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t) + sqrt(1 - abar_prev) e,
    so mu(eps) - mu(eps_theta) = h_t (eps - eps_theta) with h_t = d mu / d e
        = sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t),
    abar_prev = abar_{t-1}, and 1 before the first timestep. Dividing by the mean of h^2 over
    all T timesteps makes the average weight 1 under uniform t.
    """
    abar = [float(a) for a in alphas_cumprod.double()]

    def h_squared(k: int) -> float:
        prev = abar[k - 1] if k > 0 else 1.0
        return (math.sqrt(1 - prev) - math.sqrt(prev) * math.sqrt(1 - abar[k]) / math.sqrt(abar[k])) ** 2

    mean = sum(h_squared(k) for k in range(len(abar))) / len(abar)
    return h_squared(step) / mean


def test_h2_timestep_weighting_reaches_the_spin_loss(generated, tiny_components):
    """With ``timestep_weighting="h2"`` each logit is multiplied by row i's h_{t_i}^2:

        logit_i = -(beta/2) w_i ((m_real_i - m_syn_i) - (r_real_i - r_syn_i))
        loss    = (1/B) sum_i log(1 + exp(-logit_i))

    with w_i = h2_by_hand(t_i), and w_i = 1 without weighting. At logit 0 every weight gives
    log 2, so the opponent's errors are set a little off theta's (r_real = m_real + d_i,
    r_syn = m_syn): then logit_i = (beta/2) w_i d_i, of order 1 for d ~ 1e-3 at beta 2000, where
    the weights change the loss. theta's errors m come from :func:`pair_errors` (checked by hand
    above); the weighting and the loss are computed here in float64.
    """
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    beta = 2000.0
    rows = as_batch(generated, with_reference=False)
    with torch.no_grad():
        m_real, m_syn, t = pair_errors(unet, scheduler, rows.latents_real, rows.latents_syn,
                                       rows.prompt_embeds, rows.noise_seed)
    offsets = torch.tensor([1.0, -0.5, 2.0]) * 1e-3
    batch = replace(rows, ref_mse_real=m_real + offsets, ref_mse_syn=m_syn.clone())

    def loss_by_hand(weights: list[float]) -> float:
        terms = []
        for i, w in enumerate(weights):
            policy = float(m_real[i]) - float(m_syn[i])
            reference = float(batch.ref_mse_real[i]) - float(batch.ref_mse_syn[i])
            logit = -(beta / 2) * w * (policy - reference)
            terms.append(math.log1p(math.exp(-logit)))
        return sum(terms) / len(terms)

    weights = [h2_by_hand(scheduler.alphas_cumprod, int(step)) for step in t]
    weighted = spin_batch_loss(unet, scheduler, batch, beta=beta, timestep_weighting="h2").loss.item()
    unweighted = spin_batch_loss(unet, scheduler, batch, beta=beta, timestep_weighting="none").loss.item()

    assert weighted == pytest.approx(loss_by_hand(weights), rel=1e-4)
    assert unweighted == pytest.approx(loss_by_hand([1.0] * len(weights)), rel=1e-4)
    assert abs(weighted - unweighted) > 0.05 * unweighted


# ----------------------------------------------------------------------------- learning-rate schedule


def lr_factor_by_hand(schedule: str, step: int, *, warmup: int, total: int) -> float:
    """The schedule's factor on the base lr after ``step`` scheduler steps (the lr optimizer
    step ``step + 1`` runs at): a linear ramp step/warmup during warm-up, then 1 (``constant``)
    or a linear decay (total - step) / (total - warmup) that reaches 0 at ``total`` (``linear``)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


@pytest.mark.parametrize(("schedule", "warmup", "total", "factors"), [
    ("linear", 2, 6, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("linear", 0, 4, [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("constant", 2, 6, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant", 0, 4, [1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule_follows_warmup_then_linear_decay_or_constant(schedule, warmup, total, factors):
    """lr after k scheduler steps = base lr x the factor of :func:`lr_factor_by_hand`; the
    factors are also written out literally, so a wrong formula here would show too."""
    base_lr = 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([param], lr=base_lr, weight_decay=1e-2)
    scheduler = make_lr_scheduler(optimizer, schedule=schedule, warmup_steps=warmup, total_steps=total)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr()[0] == pytest.approx(seen[-1])
        optimizer.step()
        scheduler.step()
    assert factors == [lr_factor_by_hand(schedule, k, warmup=warmup, total=total) for k in range(total + 1)]
    assert seen == pytest.approx([base_lr * f for f in factors], abs=1e-12)
