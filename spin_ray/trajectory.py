"""theta_k's own reverse-process states for eq. C.5 (``loss.synthetic_states: reverse``).

While the opponent samples its image with DDIM (:func:`spin_ray.diffusion.sample_latents`),
each row keeps the state x'_t at one step of its trajectory, drawn uniformly among the S steps
the sampler visits from the row's own seed (:data:`spin_ray.generation.TRAJECTORY_STREAM`), and
theta_k's conditional noise prediction there, which classifier-free guidance computes anyway
(the cond half of its batch): memory, no extra compute. The sampler's timestep t and the
previous timestep t_prev it steps to are kept for the weight h_{t,t_prev} (:mod:`spin_ray.loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def draw_steps(seeds: Sequence[int], num_inference_steps: int) -> list[int]:
    """One step index in [0, S) per row, uniform, from a generator seeded with the row's seed."""
    if num_inference_steps < 1:
        raise ValueError(f"generation.num_inference_steps: must be >= 1, got {num_inference_steps}")
    return [int(np.random.default_rng(int(seed)).integers(num_inference_steps)) for seed in seeds]


@dataclass
class TrajectoryRecord:
    """The per-row state of one sampling step, filled by :meth:`on_step` during sampling.

    steps: (B,) the drawn step index of each row. After sampling: latents_t (B, C, h, w) x'_t,
    eps_cond (B, C, h, w) theta_k's conditional prediction at x'_t, timesteps (B,) t and
    prev_timesteps (B,) t_prev (negative at the last step), all on the CPU.
    """

    steps: list[int]
    latents_t: torch.Tensor | None = None
    eps_cond: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    prev_timesteps: torch.Tensor | None = None

    def on_step(self, index: int, t: int, t_prev: int, latents: torch.Tensor, cond_pred: torch.Tensor) -> None:
        """The sampler's callback: keep the rows whose drawn step is ``index``."""
        rows = [row for row, step in enumerate(self.steps) if step == index]
        if self.latents_t is None:
            batch = len(self.steps)
            self.latents_t = torch.full((batch, *latents.shape[1:]), float("nan"))
            self.eps_cond = torch.full((batch, *latents.shape[1:]), float("nan"))
            self.timesteps = torch.full((batch,), -1, dtype=torch.int64)
            self.prev_timesteps = torch.full((batch,), -1, dtype=torch.int64)
        if not rows:
            return
        index_rows = torch.tensor(rows)
        self.latents_t[index_rows] = latents[index_rows.to(latents.device)].float().cpu()
        self.eps_cond[index_rows] = cond_pred[index_rows.to(cond_pred.device)].float().cpu()
        self.timesteps[index_rows] = t
        self.prev_timesteps[index_rows] = t_prev

    def complete(self) -> TrajectoryRecord:
        """Self, after checking that every row was recorded (a step index beyond the sampler's steps was not)."""
        if self.timesteps is None or bool((self.timesteps < 0).any()):
            raise RuntimeError(f"trajectory: steps {self.steps} were not all visited by the sampler")
        return self


def sampler_timestep_pairs(scheduler, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, t_prev) pairs, each (S,) int64, that DDIM sampling with ``num_inference_steps``
    visits (as :func:`spin_ray.diffusion.sample_latents` and the recorded columns give them)."""
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps)
    timesteps = sampler.timesteps.to(torch.int64).cpu()
    return timesteps, timesteps - sampler.config.num_train_timesteps // num_inference_steps
