"""Tests written for the mutants that survived ``make mutation`` (docs/TESTING.md).

Each test pins a behaviour that a surviving mutant changed and no other test noticed: an input
check's exact bound, the argument an error names, the precision of a computation, an integer
dtype accepted. Expected values are computed here, independently of the code under test
(plain Python floats, or torch written out by hand).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from spin_ray.diffusion import predict_noise, row_noise_and_timesteps, sample_latents, training_target
from spin_ray.loss import h2_weight, per_sample_mse, spin_loss
from spin_ray.tiny import sd15_ddim_scheduler

# ----------------------------------------------------------------------------- spin_ray.loss


def test_per_sample_mse_accepts_two_dimensional_batches():
    # (B, D) has a batch dim: each row's mean squared error, by hand.
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    expected = torch.tensor([(0 + 4 + 9) / 3, (1 + 1 + 4) / 3])
    torch.testing.assert_close(per_sample_mse(pred, target), expected)


def test_per_sample_mse_rejects_a_tensor_without_a_batch_dim_and_says_so():
    with pytest.raises(ValueError, match=r"per_sample_mse: expected \(B, \.\.\.\) tensors with a batch dim, got shape \(3,\)"):
        per_sample_mse(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("bad", ["policy_mse_syn", "ref_mse_real"])
def test_a_misshapen_error_is_named_by_its_dpo_name(bad: str):
    # spin_loss hands (real, syn) to the shared maths as (win, lose); the message names the latter.
    dpo_name = {"policy_mse_syn": "policy_mse_lose", "ref_mse_real": "ref_mse_win"}[bad]
    args = {"policy_mse_real": torch.zeros(2), "policy_mse_syn": torch.zeros(2),
            "ref_mse_real": torch.zeros(2), "ref_mse_syn": torch.zeros(2), "beta": 1.0}
    args[bad] = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"^{dpo_name}: expected shape \(2,\) \(one value per sample\), got \(3,\)$"):
        spin_loss(**args)


def _h2_by_hand(abar: list[float]) -> list[float]:
    """h_t^2 / mean(h^2) in Python floats (float64): h_t = sqrt(1 - abar_{t-1}) -
    sqrt(abar_{t-1} (1 - abar_t) / abar_t), abar_{-1} = 1."""
    prev = [1.0, *abar[:-1]]
    h2 = [(math.sqrt(1 - p) - math.sqrt(p * (1 - a) / a)) ** 2 for a, p in zip(abar, prev, strict=True)]
    mean = sum(h2) / len(h2)
    return [v / mean for v in h2]


def test_h2_weight_is_computed_in_float64_on_the_sd_schedule():
    # Near t = 0 the two square roots of h_t nearly cancel: in float32 the weights are off by up
    # to ~1e-4 (relative); computed in float64 and rounded to float32, by ~1e-7.
    abar = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear").alphas_cumprod
    assert abar.dtype == torch.float32
    expected = torch.tensor(_h2_by_hand([float(a) for a in abar]), dtype=torch.float64)
    weights = h2_weight(abar, torch.arange(1000))
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0.0)


def test_h2_weight_works_on_the_shortest_schedule():
    # T = 2 is allowed (the check is T >= 2).
    abar = [0.9, 0.5]
    weights = h2_weight(torch.tensor(abar, dtype=torch.float64), torch.tensor([0, 1]))
    torch.testing.assert_close(weights, torch.tensor(_h2_by_hand(abar), dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_h2_weight_accepts_any_integer_timestep_dtype(dtype: torch.dtype):
    abar = [0.9, 0.6, 0.2]
    weights = h2_weight(torch.tensor(abar), torch.tensor([2, 0, 1], dtype=dtype))
    by_hand = _h2_by_hand(abar)
    torch.testing.assert_close(weights, torch.tensor([by_hand[2], by_hand[0], by_hand[1]], dtype=torch.float32))


@pytest.mark.parametrize(
    ("abar", "timesteps", "message"),
    [
        (torch.full((2, 3), 0.5), torch.tensor([0]), r"^h2_weight: alphas_cumprod must have shape \(T,\), T >= 2; got \(2, 3\)$"),
        (torch.tensor([0.5]), torch.tensor([0]), r"^h2_weight: alphas_cumprod must have shape \(T,\), T >= 2; got \(1,\)$"),
        (torch.tensor([0.9, 0.5]), torch.tensor([[0]]), r"^h2_weight: timesteps must have shape \(B,\), got \(1, 1\)$"),
    ],
)
def test_h2_weight_names_a_bad_shape(abar: torch.Tensor, timesteps: torch.Tensor, message: str):
    with pytest.raises(ValueError, match=message):
        h2_weight(abar, timesteps)


# ----------------------------------------------------------------------------- spin_ray.diffusion: noise and sampling

LATENT_SHAPE = (4, 16, 16)  # the shared tiny pipeline's latents


def test_row_noise_is_shared_unless_asked_otherwise():
    draw = row_noise_and_timesteps([3, 4], LATENT_SHAPE, 1000)
    assert draw.noise_syn is draw.noise_real


def test_independent_row_noise_is_drawn_in_the_documented_order_from_the_row_seed():
    # Per row, from a CPU generator seeded with the row's seed: t, then eps, then eps'.
    seeds = [7, 8]
    draw = row_noise_and_timesteps(seeds, LATENT_SHAPE, 1000, shared_noise=False)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (1,), generator=generator)
        eps = torch.randn(LATENT_SHAPE, generator=generator)
        eps_syn = torch.randn(LATENT_SHAPE, generator=generator)
        assert int(draw.timesteps[row]) == int(t)
        assert torch.equal(draw.noise_real[row], eps)
        assert torch.equal(draw.noise_syn[row], eps_syn)


def test_the_sample_prediction_type_is_trained_towards_the_clean_latents():
    scheduler = DDIMScheduler.from_config(sd15_ddim_scheduler().config, prediction_type="sample")
    latents, noise = torch.randn(2, *LATENT_SHAPE), torch.randn(2, *LATENT_SHAPE)
    assert torch.equal(training_target(scheduler, latents, noise, torch.tensor([3, 900])), latents)


def test_an_unknown_prediction_type_lists_the_known_ones():
    scheduler = DDIMScheduler.from_config(sd15_ddim_scheduler().config, prediction_type="flow")
    latents = torch.zeros(1, *LATENT_SHAPE)
    with pytest.raises(ValueError, match=r"is not one of 'epsilon', 'v_prediction', 'sample'$"):
        training_target(scheduler, latents, latents, torch.tensor([0]))


def test_predict_noise_casts_its_inputs_to_the_unets_dtype(tiny_components):
    # A float64 UNet given float32 inputs: the inputs are cast, the output is float64.
    unet = tiny_components.unet.double()
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim)
    noisy = torch.randn(2, *LATENT_SHAPE)
    out = predict_noise(unet, noisy, torch.tensor([5, 500]), embeds)
    assert out.dtype == torch.float64
    by_hand = unet(noisy.double(), torch.tensor([5, 500]), encoder_hidden_states=embeds.double()).sample
    assert torch.equal(out, by_hand)


def _sampling_inputs(components, negative_batch: int = 1):
    embed_dim = components.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn((2, 77, embed_dim), generator=generator)
    negative = torch.randn((negative_batch, 77, embed_dim), generator=generator)
    return embeds, negative


def test_a_negative_embedding_in_another_dtype_is_cast_to_the_unets(tiny_components):
    embeds, negative = _sampling_inputs(tiny_components)
    common = {"num_inference_steps": 2, "guidance_scale": 3.0, "latent_shape": LATENT_SHAPE}
    unet, scheduler = tiny_components.unet, tiny_components.scheduler
    float32 = sample_latents(unet, scheduler, embeds, negative, [1, 2], **common)
    float64 = sample_latents(unet, scheduler, embeds, negative.double(), [1, 2], **common)
    assert torch.equal(float32, float64)  # float32 -> float64 -> float32 is exact


def test_a_misshapen_negative_embedding_is_named_with_the_expected_shape(tiny_components):
    embeds, negative = _sampling_inputs(tiny_components, negative_batch=3)
    with pytest.raises(ValueError, match=r"^negative_embeds: shape \(3, 77, 32\), expected \(1 or 2, 77, 32\)$"):
        sample_latents(tiny_components.unet, tiny_components.scheduler, embeds, negative, [1, 2],
                       num_inference_steps=2, guidance_scale=3.0, latent_shape=LATENT_SHAPE)
    with pytest.raises(ValueError, match=r"^negative_embeds: required when guidance_scale != 1 \(use the empty prompt's embedding\)$"):
        sample_latents(tiny_components.unet, tiny_components.scheduler, embeds, None, [1, 2],
                       num_inference_steps=2, guidance_scale=3.0, latent_shape=LATENT_SHAPE)
