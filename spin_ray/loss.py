"""Training objectives: SPIN-Diffusion, plain SFT and Diffusion-DPO (pure tensor functions).

SPIN-Diffusion (Yuan et al. 2024, arXiv 2402.10210) trains theta against its previous copy
theta_k. Its approximate objective (eq. 4.9; written with the noise prediction in eq. C.5)
with the logistic loss l(u) = log(1 + exp(-u)) is, for sample i with timestep t_i and noise
eps_i (docs/DESIGN.md section 4)::

    m_real = mean_{C,H,W} (eps_theta  (x_t^real, c, t) - eps )^2     policy, real image
    m_syn  = mean_{C,H,W} (eps_theta  (x_t^syn,  c, t) - eps')^2     policy, theta_k's image
    r_real, r_syn: the same errors of the frozen opponent theta_k (no gradient)
    logit_i = -(beta / 2) * ((m_real - m_syn) - (r_real - r_syn))
    loss    = mean_i softplus(-logit_i)                              (= -log sigmoid(logit_i))

The paper's timestep factor h_t^2 and the 1/2 are folded into beta, as in the Diffusion-DPO
reference trainer whose convention the paper's beta values (2000, 5000) use; :func:`h2_weight`
gives h_t^2 back as an optional per-sample weight. The same maths with (real, synthetic)
read as (winner, loser) is Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), so both share one
implementation.

All losses are computed in float32, whatever the dtype of the model's predictions: at
beta = 5000 the logits reach the hundreds and a bf16 difference of two MSEs is too coarse.

The synthetic branch on theta_k's own reverse states (eq. C.5, ``loss.synthetic_states:
reverse``). Eq. 4.9 replaces the synthetic chain x'_{0:T} ~ p_theta_k by the forward process
applied to theta_k's finished image x'_0; C.5 keeps the chain. Per step the objective compares
the two models' reverse kernels on theta_k's transition x'_t -> x'_{t_prev}::

    log p_theta(x'_{t_prev} | x'_t) - log p_theta_k(x'_{t_prev} | x'_t)
        = -(||x'_{t_prev} - mu_theta(x'_t)||^2 - ||x'_{t_prev} - mu_theta_k(x'_t)||^2) / (2 sigma^2)

With the deterministic DDIM step that theta_k samples with (eta = 0), x'_{t_prev} = mu_theta_k(x'_t),
so theta_k's own term vanishes, and mu is affine in the noise prediction with the coefficient
h_{t,t_prev} = sqrt(1 - abar_{t_prev}) - sqrt(abar_{t_prev} (1 - abar_t) / abar_t) (see
:func:`h2_weight`; t_prev = t - T/S is the sampler's previous timestep, S = its number of steps,
not t - 1). Hence the synthetic term is::

    mu_theta_k(x'_t) - mu_theta(x'_t) = h_{t,t_prev} (eps_theta_k(x'_t, c, t) - eps_theta(x'_t, c, t))
    m_syn = mean_{C,H,W} (eps_theta(x'_t, c, t) - e)^2,   e = eps_theta_k(x'_t, c, t) recorded by the sampler
    r_syn = mean_{C,H,W} (eps_theta_k(x'_t, c, t) - e)^2  (= 0 on theta_k's own trajectory)
    logit_i = -(beta/2) (w_real (m_real - r_real) - w_syn (m_syn - r_syn))

with the real branch as in eq. 4.9. r_syn is 0 in exact arithmetic; it is computed anyway (in the
trainer's numerics, :mod:`spin_ray.numerics`) so that rounding cancels at theta == theta_k, and so
that a state recorded on an earlier opponent's trajectory (``self_play.opponent_history``, target
e = that opponent's prediction) keeps theta_k's term, which then does not vanish. e is theta_k's
*conditional* prediction (the cond half of classifier-free guidance), as C.5 writes the model
p_theta_k(. | c); the trajectory itself is the guided one, as are the images of eq. 4.9.

Weights: as in eq. 4.9 the constant 1/(2 sigma^2) and the number of steps of each chain are
folded into beta. ``loss.timestep_weighting: none`` folds h^2 in too: w_real = w_syn = 1.
``h2``: w_real = :func:`h2_weight` (h^2 on (t, t-1), mean 1 over the T training timesteps) and
w_syn = :func:`sampler_h2_weight` (h^2 on the sampler's (t, t_prev), mean 1 over its S steps): each
branch's sum over its own chain (T steps of the forward process, S of the sampler) is estimated
from one uniformly drawn step, and the normalisation keeps beta's meaning in both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- building blocks


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32.

    pred, target: (B, C, H, W) (any dtype, e.g. bf16 UNet output and fp32 noise).
    Returns (B,) float32: mean over C, H, W of (pred - target)^2. Autocast is switched off so
    the subtraction and the square really happen in float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"per_sample_mse: pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"per_sample_mse: expected (B, ...) tensors with a batch dim, got shape {tuple(pred.shape)}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        diff = pred.float() - target.float()
        return diff.pow(2).mean(dim=tuple(range(1, diff.dim())))


def h2_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The paper's timestep factor h_t^2 (eq. C.5), normalised to mean 1 over all timesteps.

    alphas_cumprod: (T,) abar_t of the noise schedule (``scheduler.alphas_cumprod``),
    0-based as in diffusers (entry t is the abar of training timestep t).
    timesteps: (B,) integer training timesteps in [0, T).
    Returns (B,) float32 weights on the device of ``timesteps``.

    Derivation. Eq. 4.9 compares the reverse-step means, ||x_{t-1} - mu_theta(x_t, c, t)||^2.
    With the deterministic DDIM reverse step that SPIN-Diffusion samples with (sigma_t = 0),
    mu_theta(x_t) = sqrt(abar_{t-1}) (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
                    + sqrt(1 - abar_{t-1}) eps_theta,
    and the forward posterior mean is the same expression with the true noise eps. Hence
    x_{t-1} - mu_theta = h_t (eps - eps_theta) with
        h_t = sqrt(1 - abar_{t-1}) - sqrt(abar_{t-1} (1 - abar_t) / abar_t),
    which is how eq. C.5 turns eq. 4.9 into squared noise errors times h_t^2. abar before
    the first timestep is 1. Dividing by the mean of h_t^2 over all T timesteps keeps beta's
    meaning: under uniform timestep sampling the average weight is 1, as with no weighting.
    """
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(f"h2_weight: alphas_cumprod must have shape (T,), T >= 2; got {tuple(alphas_cumprod.shape)}")
    if timesteps.dim() != 1:
        raise ValueError(f"h2_weight: timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    num_steps = alphas_cumprod.numel()
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= num_steps):
        raise ValueError(
            f"h2_weight: timesteps must lie in [0, {num_steps}); got min {int(timesteps.min())}, "
            f"max {int(timesteps.max())}"
        )
    abar = alphas_cumprod.detach().to(torch.float64)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    h2 = ddim_h(abar, abar_prev).pow(2)
    normalised = h2 / h2.mean()
    index = timesteps.to(device=normalised.device, dtype=torch.long)
    return normalised[index].to(device=timesteps.device, dtype=torch.float32)


def ddim_h(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """h of the deterministic DDIM step from abar_t to abar_prev (same shapes, any float dtype):
    sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t), the coefficient of the noise
    prediction in the step's mean (:func:`h2_weight` derives it)."""
    return torch.sqrt(1.0 - abar_prev) - torch.sqrt(abar_prev * (1.0 - abar_t) / abar_t)


def sampler_h2_weight(alphas_cumprod: torch.Tensor, final_alpha_cumprod: float, timesteps: torch.Tensor,
                      prev_timesteps: torch.Tensor, sampler_timesteps: torch.Tensor,
                      sampler_prev_timesteps: torch.Tensor) -> torch.Tensor:
    """h^2 on the DDIM sampler's own timestep pairs (eq. C.5, ``loss.synthetic_states: reverse``),
    normalised to mean 1 over the sampler's S steps.

    alphas_cumprod: (T,) abar of the training schedule; final_alpha_cumprod: the abar a step to a
    negative previous timestep lands on (diffusers' ``scheduler.final_alpha_cumprod``).
    timesteps, prev_timesteps: (B,) each row's (t, t_prev) pair. sampler_timesteps,
    sampler_prev_timesteps: (S,) all pairs the sampler visits (the normalisation).
    Returns (B,) float32 on the device of ``timesteps``: h_{t,t_prev}^2 / mean_s h_{s,s_prev}^2.
    """
    abar = alphas_cumprod.detach().to(torch.float64).cpu()

    def h2(t: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        t, prev = t.detach().long().cpu(), prev.detach().long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= abar.numel() or bool((prev >= t).any())):
            raise ValueError(f"sampler_h2_weight: expected 0 <= t_prev < t < {abar.numel()} (t_prev < 0: the "
                             f"final step); got t {t.tolist()}, t_prev {prev.tolist()}")
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.tensor(float(final_alpha_cumprod),
                                                                                 dtype=torch.float64))
        return ddim_h(abar[t], abar_prev).pow(2)

    normaliser = h2(sampler_timesteps, sampler_prev_timesteps).mean()
    return (h2(timesteps, prev_timesteps) / normaliser).to(device=timesteps.device, dtype=torch.float32)


# ----------------------------------------------------------------------------- outputs


def _scalars_as_floats(record: object) -> dict[str, float]:
    """Every (0-dim tensor) field of a loss record as a Python float."""
    return {f.name: float(getattr(record, f.name).detach()) for f in dataclasses.fields(record)}


@dataclass(frozen=True)
class SpinLossOutput:
    """Result of :func:`spin_loss`. Every metric is a detached 0-dim float32 tensor (a batch
    mean); ``loss`` carries the gradient. ``margin == reward_real - reward_syn == logits_mean``."""

    loss: torch.Tensor
    """mean_i softplus(-logit_i); the only field with a gradient."""
    implicit_acc: torch.Tensor
    """Share of samples with logit_i > 0 (the policy prefers the real image more than theta_k)."""
    reward_real: torch.Tensor
    """mean_i -(beta/2) w_i (m_real - r_real): implicit reward of the real images."""
    reward_syn: torch.Tensor
    """mean_i -(beta/2) w_i (m_syn - r_syn): implicit reward of theta_k's images."""
    margin: torch.Tensor
    """reward_real - reward_syn."""
    policy_mse_real: torch.Tensor
    policy_mse_syn: torch.Tensor
    ref_mse_real: torch.Tensor
    ref_mse_syn: torch.Tensor
    logits_mean: torch.Tensor
    logits_abs_mean: torch.Tensor
    """mean_i |logit_i|: 0 when theta == theta_k (the first step of an iteration, :mod:`spin_ray.numerics`)."""

    def metrics(self) -> dict[str, float]:
        """All fields as floats, for ``ray.train.report`` and logs (one device sync)."""
        return _scalars_as_floats(self)


@dataclass(frozen=True)
class DpoLossOutput:
    """Result of :func:`diffusion_dpo_loss`; the fields of :class:`SpinLossOutput` with
    (real, syn) named (win, lose)."""

    loss: torch.Tensor
    implicit_acc: torch.Tensor
    reward_win: torch.Tensor
    reward_lose: torch.Tensor
    margin: torch.Tensor
    policy_mse_win: torch.Tensor
    policy_mse_lose: torch.Tensor
    ref_mse_win: torch.Tensor
    ref_mse_lose: torch.Tensor
    logits_mean: torch.Tensor
    logits_abs_mean: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """All fields as floats."""
        return _scalars_as_floats(self)


@dataclass(frozen=True)
class SftLossOutput:
    """Result of :func:`sft_loss`: ``loss`` (with gradient) and its detached copy ``mse``."""

    loss: torch.Tensor
    mse: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """All fields as floats."""
        return _scalars_as_floats(self)


# ----------------------------------------------------------------------------- losses


def _check_per_sample(name: str, value: torch.Tensor, batch: int) -> None:
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample), got {tuple(value.shape)}")


def _logistic_preference_loss(
    policy_mse_win: torch.Tensor,
    policy_mse_lose: torch.Tensor,
    ref_mse_win: torch.Tensor,
    ref_mse_lose: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None,
    weight_lose: torch.Tensor | None = None,
) -> DpoLossOutput:
    """The shared maths of SPIN-Diffusion (eq. 4.9, C.5) and Diffusion-DPO; see the module docstring.

    ``weight`` multiplies both branches, unless ``weight_lose`` is given: then ``weight`` (None:
    1) multiplies the win branch and ``weight_lose`` the lose branch (eq. C.5, whose branches
    have their own timesteps). The reference errors are detached: theta_k (or the DPO
    reference) never gets a gradient.
    """
    if policy_mse_win.dim() != 1:
        raise ValueError(f"policy_mse_win: expected shape (B,) (one value per sample), got {tuple(policy_mse_win.shape)}")
    batch = policy_mse_win.shape[0]
    for name, value in [
        ("policy_mse_win", policy_mse_win), ("policy_mse_lose", policy_mse_lose),
        ("ref_mse_win", ref_mse_win), ("ref_mse_lose", ref_mse_lose),
    ]:
        _check_per_sample(name, value, batch)
    for name, value in [("weight", weight), ("weight_syn", weight_lose)]:
        if value is not None:
            _check_per_sample(name, value, batch)
    if not beta > 0:
        raise ValueError(f"beta: must be positive, got {beta}")

    m_win, m_lose = policy_mse_win.float(), policy_mse_lose.float()
    r_win, r_lose = ref_mse_win.detach().float(), ref_mse_lose.detach().float()
    half_beta = torch.full_like(m_win, -0.5 * beta)
    scale = half_beta if weight is None else half_beta * weight.detach().float()
    scale_lose = scale if weight_lose is None else half_beta * weight_lose.detach().float()
    reward_win = scale * (m_win - r_win)
    reward_lose = scale_lose * (m_lose - r_lose)
    logits = reward_win - reward_lose
    # softplus is evaluated stably by torch (linear above its threshold, log1p(exp) below).
    loss = F.softplus(-logits).mean()

    def batch_mean(x: torch.Tensor) -> torch.Tensor:
        return x.detach().mean()

    return DpoLossOutput(
        loss=loss,
        implicit_acc=batch_mean((logits > 0).float()),
        reward_win=batch_mean(reward_win),
        reward_lose=batch_mean(reward_lose),
        margin=batch_mean(reward_win - reward_lose),
        policy_mse_win=batch_mean(m_win),
        policy_mse_lose=batch_mean(m_lose),
        ref_mse_win=batch_mean(r_win),
        ref_mse_lose=batch_mean(r_lose),
        logits_mean=batch_mean(logits),
        logits_abs_mean=batch_mean(logits.abs()),
    )


def spin_loss(
    policy_mse_real: torch.Tensor,
    policy_mse_syn: torch.Tensor,
    ref_mse_real: torch.Tensor,
    ref_mse_syn: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
    weight_syn: torch.Tensor | None = None,
) -> SpinLossOutput:
    """SPIN-Diffusion loss (paper eq. 4.9, in noise form eq. C.5, logistic loss).

    policy_mse_real, policy_mse_syn: (B,) per-sample errors of theta (with gradient) on the
    real and on theta_k's synthetic latent (:func:`per_sample_mse`).
    ref_mse_real, ref_mse_syn: (B,) the same errors of the opponent theta_k (detached here).
    beta: KL strength in the Diffusion-DPO convention (h_t^2 and 1/2 folded in).
    weight: optional (B,) per-sample factor on the logit, e.g. :func:`h2_weight`.
    weight_syn: optional (B,) factor on the synthetic branch alone (then ``weight`` is the real
    branch's; eq. C.5, where the synthetic state has its own timestep: :func:`sampler_h2_weight`).

    logit_i = -(beta/2) (w_real,i (m_real - r_real) - w_syn,i (m_syn - r_syn)), w_real = w_syn = w_i
    unless ``weight_syn`` is given; loss = mean softplus(-logit).
    When theta == theta_k every logit is 0 and the loss is exactly log 2.
    """
    out = _logistic_preference_loss(policy_mse_real, policy_mse_syn, ref_mse_real, ref_mse_syn, beta, weight,
                                    weight_syn)
    return SpinLossOutput(
        loss=out.loss,
        implicit_acc=out.implicit_acc,
        reward_real=out.reward_win,
        reward_syn=out.reward_lose,
        margin=out.margin,
        policy_mse_real=out.policy_mse_win,
        policy_mse_syn=out.policy_mse_lose,
        ref_mse_real=out.ref_mse_win,
        ref_mse_syn=out.ref_mse_lose,
        logits_mean=out.logits_mean,
        logits_abs_mean=out.logits_abs_mean,
    )


def diffusion_dpo_loss(
    policy_mse_win: torch.Tensor,
    policy_mse_lose: torch.Tensor,
    ref_mse_win: torch.Tensor,
    ref_mse_lose: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
) -> DpoLossOutput:
    """Diffusion-DPO loss (Wallace et al. 2023, arXiv 2311.12908, in its reference trainer's convention).

    All inputs (B,): per-sample noise errors of the policy (with gradient) and of the frozen
    reference on the preferred (win) and the rejected (lose) image. Identical to
    :func:`spin_loss` with (real, syn) = (win, lose).
    """
    return _logistic_preference_loss(policy_mse_win, policy_mse_lose, ref_mse_win, ref_mse_lose, beta, weight)


def sft_loss(pred: torch.Tensor, target: torch.Tensor) -> SftLossOutput:
    """Plain denoising loss (the SFT baseline): mean over the batch of :func:`per_sample_mse`.

    pred, target: (B, C, H, W) noise prediction and true noise. Returns float32 scalars.
    """
    loss = per_sample_mse(pred, target).mean()
    return SftLossOutput(loss=loss, mse=loss.detach())
