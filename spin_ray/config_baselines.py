"""Config sections for the baselines' schedules (``baselines.sft.*``, ``baselines.dpo.*``).

Part of the schema of :mod:`spin_ray.config` (which includes :class:`BaselinesConfig` in its
``Config``); kept apart so that the schema module stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LrSchedule = Literal["linear", "constant", "cosine"]
"""The learning-rate schedules after warm-up (:func:`spin_ray.train_step.make_lr_scheduler`)."""


@dataclass(frozen=True)
class SftBaselineConfig:
    """The SFT baseline's schedule (``self_play.baselines: [sft]``); an unset (null) value is the
    self-play value, as the SFT baseline has always trained."""

    lr: float | None = None
    """Peak learning rate; null: iteration 1's ``train.lr``."""
    steps: int | None = None
    """Optimizer steps; null: all iterations' ``train.steps`` summed (as many samples as self-play
    when the batch is the same)."""
    batch_size: int | None = None
    """Samples per micro-batch, per training worker; null: ``train.batch_size``."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; null: ``train.gradient_accumulation_steps``."""
    warmup_steps: int | None = None
    """Linear warm-up steps; null: ``train.warmup_steps``."""
    lr_schedule: LrSchedule | None = None
    """After warm-up: ``constant``, ``linear`` or ``cosine`` decay to 0; null: ``train.lr_schedule``."""
    eval_every: int | None = None
    """Score a checkpoint every N steps on the selection prompts (App. A.1 picks the SFT
    checkpoint on validation); null: ``train.eval_every``."""
    keep: Literal["last", "best"] | None = None
    """``last`` or ``best`` checkpoint published; null: ``train.keep``."""


@dataclass(frozen=True)
class DpoBaselineConfig:
    """The Diffusion-DPO baseline's schedule (``self_play.baselines: [dpo]``; Wallace et al. 2023):
    theta_0 trained on the data's (winner, loser) pairs against theta_0 itself as the fixed
    reference; an unset (null) value is the self-play value."""

    lr: float | None = None
    """Peak learning rate; null: iteration 1's ``train.lr``."""
    steps: int | None = None
    """Optimizer steps; null: all iterations' ``train.steps`` summed."""
    batch_size: int | None = None
    """(winner, loser) pairs per micro-batch, per training worker; null: ``train.batch_size``."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; null: ``train.gradient_accumulation_steps``."""
    warmup_steps: int | None = None
    """Linear warm-up steps; null: ``train.warmup_steps``."""
    lr_schedule: LrSchedule | None = None
    """After warm-up: ``constant``, ``linear`` or ``cosine`` decay to 0; null: ``train.lr_schedule``."""
    beta: float | None = None
    """KL strength beta (the Diffusion-DPO reference trainer's convention, as ``loss.beta``); null:
    iteration 1's ``loss.beta``."""
    eval_every: int | None = None
    """Score a checkpoint every N steps on the selection prompts; null: ``train.eval_every``."""
    keep: Literal["last", "best"] | None = None
    """``last`` or ``best`` checkpoint published; null: ``train.keep``."""


@dataclass(frozen=True)
class BaselinesConfig:
    """Schedules of the baselines that ``self_play.baselines`` turns on."""

    sft: SftBaselineConfig = field(default_factory=SftBaselineConfig)
    dpo: DpoBaselineConfig = field(default_factory=DpoBaselineConfig)
