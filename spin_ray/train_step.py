"""One SPIN (or SFT, or Diffusion-DPO) training step in plain PyTorch: no Ray here.

A batch of pairs carries, per sample i: the real latent x0_i, the opponent's synthetic latent
x0'_i (sampled by theta_k), the prompt embedding c_i and a noise seed. The seed fixes the
timestep t_i and the noise eps_i (and eps'_i) of the loss (docs/DESIGN.md section 3.3); both the
generation actor and the trainer derive them from it, so the opponent's errors can be
computed on the Data side ("precomputed") and shipped as two scalars per sample.

With ``loss.synthetic_states: reverse`` (eq. C.5) the synthetic branch is not the forward
process applied to x0'_i but the state x'_t that theta_k visited while sampling x0'_i, at the
sampler's timestep, with theta_k's conditional prediction there as its target
(:class:`ReverseStates`; the maths in :mod:`spin_ray.loss`).

Paper: Yuan et al., "Self-Play Fine-Tuning of Diffusion Models", eq. 4.9 / C.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spin_ray.diffusion import noisy_latents, predict_noise, row_noise_and_timesteps, training_target
from spin_ray.loss import (
    DpoLossOutput,
    SftLossOutput,
    SpinLossOutput,
    diffusion_dpo_loss,
    h2_weight,
    per_sample_mse,
    sampler_h2_weight,
    sft_loss,
    spin_loss,
)
from spin_ray.pair_schema import PairBatch


@dataclass(frozen=True)
class ReverseStates:
    """The synthetic branch of eq. C.5: per sample, the state x'_t of theta_k's own sampling
    trajectory (``latents_t`` (B, C, h, w)), the sampler's timestep t (``timesteps`` (B,) int64)
    and previous timestep (``prev_timesteps`` (B,)), and the target ``target`` (B, C, h, w):
    theta_k's conditional prediction at x'_t, recorded by the sampler."""

    latents_t: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor

    @classmethod
    def of_batch(cls, batch: PairBatch) -> ReverseStates:
        """The batch's reverse states; a clear error when its rows have none (forward-mode rows)."""
        values = (batch.latents_syn_t, batch.eps_syn_target, batch.timestep_syn, batch.timestep_syn_prev)
        if any(value is None for value in values):
            raise ValueError("loss.synthetic_states=reverse: the pair rows have no latents_syn_t, eps_syn_target, "
                             "timestep_syn, timestep_syn_prev (opponents generated with synthetic_states=forward?)")
        return cls(*values)


def pair_errors(
    unet: torch.nn.Module,
    scheduler,
    latents_real: torch.Tensor,
    latents_syn: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_seed: torch.Tensor,
    *,
    shared_noise: bool = True,
    reverse: ReverseStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample denoising errors of ``unet`` on the real and the synthetic latents.

    Both branches are noised at the same t_i (and, with ``shared_noise``, the same eps_i)
    drawn from ``noise_seed`` and run through the UNet as one batch of 2B. With ``reverse``
    (eq. C.5) the synthetic half is instead ``reverse.latents_t`` at ``reverse.timesteps``
    against ``reverse.target`` (``latents_syn`` is not used; no eps' is drawn).

    Returns ``(mse_real (B,), mse_syn (B,), timesteps (B,))``, the MSEs in float32, the real
    branch's timesteps.
    """
    seeds = [int(s) for s in noise_seed.tolist()]
    draw = row_noise_and_timesteps(
        seeds, tuple(latents_real.shape[1:]), scheduler.config.num_train_timesteps,
        device=latents_real.device, shared_noise=shared_noise or reverse is not None,
    )
    if reverse is None:
        latents = torch.cat([latents_real, latents_syn])
        noise = torch.cat([draw.noise_real, draw.noise_syn]).to(latents.dtype)
        timesteps = torch.cat([draw.timesteps, draw.timesteps])
        noisy = noisy_latents(scheduler, latents, noise, timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
    else:
        noise = draw.noise_real.to(latents_real.dtype)
        state_t = reverse.timesteps.to(device=draw.timesteps.device, dtype=draw.timesteps.dtype)
        timesteps = torch.cat([draw.timesteps, state_t])
        noisy = torch.cat([noisy_latents(scheduler, latents_real, noise, draw.timesteps),
                           reverse.latents_t.to(device=latents_real.device, dtype=latents_real.dtype)])
        target = torch.cat([training_target(scheduler, latents_real, noise, draw.timesteps),
                            reverse.target.to(device=latents_real.device, dtype=latents_real.dtype)])
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
    synthetic_states: str = "forward",
    sampler_steps: int | None = None,
) -> SpinLossOutput:
    """SPIN loss of ``unet`` (theta) against the opponent theta_k on one batch (eq. 4.9, or
    eq. C.5 with ``synthetic_states="reverse"``: the batch's :class:`ReverseStates`).

    The opponent's errors come from ``batch.ref_mse_*`` (precomputed by the generation
    actor) or, when ``ref_unet`` is given, from running theta_k here without gradients.
    ``timestep_weighting="h2"`` weights by h_t^2 (:func:`spin_ray.loss.h2_weight`); in reverse
    mode the synthetic branch by h^2 on the sampler's (t, t_prev) pair, normalised over its
    ``sampler_steps`` steps (:func:`spin_ray.loss.sampler_h2_weight`).
    """
    reverse = ReverseStates.of_batch(batch) if synthetic_states == "reverse" else None
    if reverse is not None and scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"loss.synthetic_states=reverse: eq. C.5's h_t weighs noise predictions; the model's "
                         f"scheduler predicts {scheduler.config.prediction_type!r}, not 'epsilon'")
    policy_real, policy_syn, ref_real, ref_syn, timesteps = _preference_errors(
        unet, scheduler, batch, shared_noise=shared_noise, ref_unet=ref_unet, caller="spin_batch_loss",
        reverse=reverse)
    weight = weight_syn = None
    if timestep_weighting == "h2":
        weight = h2_weight(scheduler.alphas_cumprod.to(timesteps.device), timesteps)
        if reverse is not None:
            weight_syn = _sampler_weight(scheduler, reverse, sampler_steps)
    return spin_loss(policy_real, policy_syn, ref_real, ref_syn, beta, weight=weight, weight_syn=weight_syn)


def _sampler_weight(scheduler, reverse: ReverseStates, sampler_steps: int | None) -> torch.Tensor:
    """h^2 of each row's sampler step (t, t_prev), normalised over the sampler's steps."""
    from spin_ray.trajectory import sampler_timestep_pairs

    if not sampler_steps:
        raise ValueError("loss.timestep_weighting=h2 with loss.synthetic_states=reverse needs the sampler's "
                         "number of steps (generation.num_inference_steps) in the training plan")
    all_t, all_prev = sampler_timestep_pairs(scheduler, sampler_steps)
    return sampler_h2_weight(scheduler.alphas_cumprod, float(scheduler.final_alpha_cumprod), reverse.timesteps,
                             reverse.prev_timesteps, all_t, all_prev)


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
                       ref_unet: torch.nn.Module | None, caller: str, reverse: ReverseStates | None = None):
    """(policy real, policy syn, reference real, reference syn, timesteps), each (B,): the
    errors of the policy (with gradient) and of the frozen reference (``ref_unet``, or the
    batch's precomputed ``ref_mse_*``) on both latents of every pair (``reverse``: eq. C.5's
    synthetic states, :func:`pair_errors`). ``ref_unet`` runs in the caller's autocast, the
    policy's numerics (:mod:`spin_ray.numerics`)."""
    policy_real, policy_syn, timesteps = pair_errors(
        unet, scheduler, batch.latents_real, batch.latents_syn, batch.prompt_embeds,
        batch.noise_seed, shared_noise=shared_noise, reverse=reverse,
    )
    if ref_unet is not None:
        with torch.no_grad():
            ref_real, ref_syn, _ = pair_errors(
                ref_unet, scheduler, batch.latents_real, batch.latents_syn, batch.prompt_embeds,
                batch.noise_seed, shared_noise=shared_noise, reverse=reverse,
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
