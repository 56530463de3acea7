"""The numerics of theta's and theta_k's denoising errors: one definition for the trainer and the opponent.

SPIN's logit (eq. 4.9) is -(beta/2) times a difference of differences of MSEs, and at the first
step of an iteration theta == theta_k, so every logit should be 0. beta/2 is 1000-2500, so the
policy's errors (the trainer) and theta_k's (the generation actor, ``loss.reference:
precomputed``, or the trainer's frozen copy, ``online``) must be computed with the same numerics,
or their rounding difference becomes the logit. Both therefore go through this module:

- :func:`training_numerics` decides, from ``train.mixed_precision`` and the device, the weight
  dtype (always float32: theta keeps float32 master weights, so theta_k's error copy does too)
  and the autocast dtype (bf16 when ``bf16``, or ``auto`` on CUDA; none otherwise);
- :meth:`ForwardNumerics.autocast` is the one autocast context of both forwards;
- :func:`prepare_reference_unet` puts theta_k on the device the way the trainer's theta is
  (float32 weights, SDPA attention, channels_last on CUDA, compiled iff ``train.compile``:
  :mod:`spin_ray.fast_path`);
- :func:`reference_pair_errors` is theta_k's :func:`spin_ray.train_step.pair_errors` under them.

Sampling theta_k's images is a separate matter: it may keep bf16 weights on CUDA for speed
(:class:`spin_ray.generation.OpponentGenerator` then holds a second, float32 copy for the
errors), because the images enter the loss only as data, identical on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPE = torch.float32
"""The weight dtype of every UNet whose denoising errors enter the loss (theta and theta_k)."""


@dataclass(frozen=True)
class ForwardNumerics:
    """How a UNet forward whose errors enter the SPIN loss is computed (picklable)."""

    device_type: str
    """``cuda`` or ``cpu``: autocast's device type."""
    autocast_dtype: torch.dtype | None
    """bf16 under mixed precision, None: plain float32."""
    compile: bool = False
    """``train.compile``: theta is compiled, so theta_k's error copy is too."""

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPE

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward (disabled without mixed precision)."""
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)


def training_numerics(mixed_precision: str, device: str | torch.device, *, compile: bool = False) -> ForwardNumerics:
    """The trainer's numerics for ``train.mixed_precision`` on ``device``: bf16 autocast with
    ``bf16`` (on any device, the CPU included) or ``auto`` on CUDA; float32 with ``no`` or
    ``auto`` on the CPU. Weights are float32 in every case (:data:`WEIGHT_DTYPE`)."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"train.mixed_precision: expected auto, bf16 or no, got {mixed_precision!r}")
    device = torch.device(device)
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return ForwardNumerics(device.type, torch.bfloat16 if bf16 else None, compile=compile)


def prepare_reference_unet(unet: torch.nn.Module, device: str | torch.device,
                           numerics: ForwardNumerics) -> torch.nn.Module:
    """theta_k (frozen, eval mode) with the trainer's theta's weights and kernels: float32, SDPA
    attention, channels_last on CUDA, compiled iff ``numerics.compile``. Modifies and returns ``unet``."""
    from spin_ray.fast_path import prepare_unet_for_inference

    return prepare_unet_for_inference(unet, device, dtype=numerics.weight_dtype, compile=numerics.compile)


def reference_pair_errors(unet: torch.nn.Module, scheduler, latents_real: torch.Tensor, latents_syn: torch.Tensor,
                          prompt_embeds: torch.Tensor, noise_seed: torch.Tensor, *, shared_noise: bool,
                          numerics: ForwardNumerics, reverse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_k's per-sample errors (r_real (B,), r_syn (B,), float32) at the trainer's (t, eps)
    and in the trainer's numerics: :func:`spin_ray.train_step.pair_errors` under
    ``numerics.autocast()``, without gradients, on float32 inputs (latents (B, C, h, w), prompt
    embeddings (B, L, D)) as the trainer's batch holds them. ``reverse``: the synthetic branch's
    states (:class:`spin_ray.train_step.ReverseStates`, ``loss.synthetic_states: reverse``)."""
    from spin_ray.train_step import pair_errors

    with torch.no_grad(), numerics.autocast():
        mse_real, mse_syn, _ = pair_errors(unet, scheduler, latents_real.float(), latents_syn.float(),
                                           prompt_embeds.float(), noise_seed, shared_noise=shared_noise,
                                           reverse=reverse)
    return mse_real.float(), mse_syn.float()


def load_models(plan, device: torch.device):
    """A training worker's models for ``plan`` (:class:`spin_ray.train_loop.TrainPlan`): theta
    (float32 master weights, train mode), theta_k when the reference is online (for ``dpo`` the
    fixed theta_0, which is also theta's starting point), and the scheduler, on ``device``
    through the fast path (:mod:`spin_ray.fast_path`): SDPA attention, channels_last on CUDA,
    optional ``torch.compile`` (``train.compile``; under DDP the in-place compile gives up
    overlapping the gradient all-reduce with the backward pass). theta_k gets theta's numerics
    (:func:`prepare_reference_unet`), as the generation actors' error copy does: the two
    reference modes then agree, and theta == theta_k gives logit 0 (a bf16 copy would cost half
    the memory and give neither)."""
    from diffusers import DDIMScheduler

    from spin_ray.diffusion import load_unet
    from spin_ray.fast_path import prepare_unet_for_training

    unet = prepare_unet_for_training(load_unet(plan.init_model_path, local_files_only=True), device,
                                     dtype=WEIGHT_DTYPE, compile=plan.compile,
                                     gradient_checkpointing=plan.gradient_checkpointing)
    ref_unet = None
    if plan.loss_type in ("spin", "dpo") and plan.online_reference:
        reference = plan.reference_model_path or plan.init_model_path
        ref_unet = prepare_reference_unet(load_unet(reference, local_files_only=True), device,
                                          training_numerics(plan.mixed_precision, device, compile=plan.compile))
    scheduler = DDIMScheduler.from_pretrained(plan.init_model_path, subfolder="scheduler")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return unet, ref_unet, scheduler
