"""One SPIN (or SFT, or Diffusion-DPO) training step in plain PyTorch: no Ray here.

A batch of pairs carries, per sample i: the real latent x0_i, the opponent's synthetic latent
x0'_i (sampled by theta_k), the prompt embedding c_i and a noise seed. The seed fixes the
timestep t_i and the noise eps_i (and eps'_i) of the loss (docs/DESIGN.md section 3.3); both the
generation actor and the trainer derive them from it, so the opponent's errors can be
computed on the Data side ("precomputed") and shipped as two scalars per sample.

Paper: Yuan et al., "Self-Play Fine-Tuning of Diffusion Models", eq. 4.9 / C.5.
"""

from __future__ import annotations

import torch

from spin_ray.diffusion import noisy_latents, predict_noise, row_noise_and_timesteps, training_target
from spin_ray.loss import (
    DpoLossOutput,
    SftLossOutput,
    SpinLossOutput,
    diffusion_dpo_loss,
    h2_weight,
    per_sample_mse,
    sft_loss,
    spin_loss,
)
from spin_ray.pair_schema import PairBatch


def pair_errors(
    unet: torch.nn.Module,
    scheduler,
    latents_real: torch.Tensor,
    latents_syn: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_seed: torch.Tensor,
    *,
    shared_noise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample denoising errors of ``unet`` on the real and the synthetic latents.

    Both branches are noised at the same t_i (and, with ``shared_noise``, the same eps_i)
    drawn from ``noise_seed`` and run through the UNet as one batch of 2B.

    Returns ``(mse_real (B,), mse_syn (B,), timesteps (B,))``, the MSEs in float32.
    """
    seeds = [int(s) for s in noise_seed.tolist()]
    draw = row_noise_and_timesteps(
        seeds, tuple(latents_real.shape[1:]), scheduler.config.num_train_timesteps,
        device=latents_real.device, shared_noise=shared_noise,
    )
    latents = torch.cat([latents_real, latents_syn])
    noise = torch.cat([draw.noise_real, draw.noise_syn]).to(latents.dtype)
    timesteps = torch.cat([draw.timesteps, draw.timesteps])
    noisy = noisy_latents(scheduler, latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    pred = predict_noise(unet, noisy, timesteps, torch.cat([prompt_embeds, prompt_embeds]))
    mse = per_sample_mse(pred, target)
    batch = latents_real.shape[0]
    return mse[:batch], mse[batch:], draw.timesteps


def spin_batch_loss(
    unet: torch.nn.Module,
    scheduler,
    batch: PairBatch,
    *,
    beta: float,
    shared_noise: bool = True,
    timestep_weighting: str = "none",
    ref_unet: torch.nn.Module | None = None,
) -> SpinLossOutput:
    """SPIN loss of ``unet`` (theta) against the opponent theta_k on one batch (eq. 4.9).

    The opponent's errors come from ``batch.ref_mse_*`` (precomputed by the generation
    actor) or, when ``ref_unet`` is given, from running theta_k here without gradients.
    """
    policy_real, policy_syn, ref_real, ref_syn, timesteps = _preference_errors(
        unet, scheduler, batch, shared_noise=shared_noise, ref_unet=ref_unet, caller="spin_batch_loss")
    weight = None
    if timestep_weighting == "h2":
        weight = h2_weight(scheduler.alphas_cumprod.to(timesteps.device), timesteps)
    return spin_loss(policy_real, policy_syn, ref_real, ref_syn, beta, weight=weight)


def dpo_batch_loss(
    unet: torch.nn.Module,
    scheduler,
    batch: PairBatch,
    *,
    beta: float,
    ref_unet: torch.nn.Module | None = None,
) -> DpoLossOutput:
    """Diffusion-DPO loss of ``unet`` on one batch of (winner, loser) pairs (the DPO baseline).

    The batch is a pair batch like SPIN's, read as ``latents_real`` = the winner x0^w and
    ``latents_syn`` = the loser x0^l of a Pick-a-Pic pair (:func:`spin_ray.pairs.dpo_pairs`).
    Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, eq. 14) noises both at the same t with
    the same eps (its reference trainer repeats one noise draw for the pair), so the noise is
    always shared here, and the reference is the fixed base model theta_0: ``ref_unet`` (run
    here without gradients) or the batch's precomputed ``ref_mse_*``::

        L = -log sigmoid(-(beta/2) ((||eps - eps_theta(x_t^w)||^2 - ||eps - eps_ref(x_t^w)||^2)
                                    - (||eps - eps_theta(x_t^l)||^2 - ||eps - eps_ref(x_t^l)||^2)))

    with T omega(lambda_t) folded into beta as in that trainer. It is SPIN-Diffusion's eq. 4.9
    (:func:`spin_batch_loss`) with the opponent's image replaced by the human-rejected one and
    theta_k by theta_0: the same :func:`spin_ray.loss.diffusion_dpo_loss` maths.
    """
    policy_win, policy_lose, ref_win, ref_lose, _ = _preference_errors(
        unet, scheduler, batch, shared_noise=True, ref_unet=ref_unet, caller="dpo_batch_loss")
    return diffusion_dpo_loss(policy_win, policy_lose, ref_win, ref_lose, beta)


def _preference_errors(unet: torch.nn.Module, scheduler, batch: PairBatch, *, shared_noise: bool,
                       ref_unet: torch.nn.Module | None, caller: str):
    """(policy real, policy syn, reference real, reference syn, timesteps), each (B,): the
    errors of the policy (with gradient) and of the frozen reference (``ref_unet``, or the
    batch's precomputed ``ref_mse_*``) on both latents of every pair."""
    policy_real, policy_syn, timesteps = pair_errors(
        unet, scheduler, batch.latents_real, batch.latents_syn, batch.prompt_embeds,
        batch.noise_seed, shared_noise=shared_noise,
    )
    if ref_unet is not None:
        with torch.no_grad():
            ref_real, ref_syn, _ = pair_errors(
                ref_unet, scheduler, batch.latents_real, batch.latents_syn, batch.prompt_embeds,
                batch.noise_seed, shared_noise=shared_noise,
            )
    elif batch.ref_mse_real is not None and batch.ref_mse_syn is not None:
        ref_real, ref_syn = batch.ref_mse_real.float(), batch.ref_mse_syn.float()
    else:
        raise ValueError(f"{caller}: the batch has no ref_mse_real/ref_mse_syn and no ref_unet was given")
    return policy_real, policy_syn, ref_real, ref_syn, timesteps


def sft_batch_loss(unet: torch.nn.Module, scheduler, batch: PairBatch) -> SftLossOutput:
    """Plain denoising loss on the real latents only (the SFT baseline)."""
    seeds = [int(s) for s in batch.noise_seed.tolist()]
    latents = batch.latents_real
    draw = row_noise_and_timesteps(
        seeds, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps, device=latents.device,
    )
    noise = draw.noise_real.to(latents.dtype)
    noisy = noisy_latents(scheduler, latents, noise, draw.timesteps)
    pred = predict_noise(unet, noisy, draw.timesteps, batch.prompt_embeds)
    return sft_loss(pred, training_target(scheduler, latents, noise, draw.timesteps))


def make_optimizer(params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as in the paper (weight decay 1e-2)."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)


def make_lr_scheduler(optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """Linear warm-up, then linear (``linear``) or half-cosine (``cosine``) decay to 0 at
    ``total_steps``, or ``constant``."""
    from diffusers.optimization import get_scheduler

    name = {"linear": "linear", "cosine": "cosine"}.get(schedule, "constant_with_warmup")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def gradients_finite(params) -> bool:
    """True when every gradient is finite (a non-finite step is skipped, not applied)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())
