"""The SPIN step without Ray: the opponent generator's output feeds the loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from spin_ray.diffusion import encode_prompt_ids, tokenize
from spin_ray.generation import GeneratorSpec, OpponentGenerator, derive_seed
from spin_ray.train_step import PairBatch, pair_errors, sft_batch_loss, spin_batch_loss


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


def test_sft_loss_is_the_denoising_mse(generated, tiny_components):
    out = sft_batch_loss(tiny_components.unet, tiny_components.scheduler, as_batch(generated, with_reference=True))
    assert out.loss.ndim == 0 and out.loss.item() > 0
