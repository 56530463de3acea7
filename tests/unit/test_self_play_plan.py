"""The SFT baseline trains on as many samples as all SPIN iterations together."""

from __future__ import annotations

from spin_ray.cli import DEFAULT_CONFIG
from spin_ray.config import load_config
from spin_ray.stages import samples_per_iteration, sft_baseline_steps, train_plan


def test_sft_baseline_steps_sum_the_iterations():
    cfg = load_config(DEFAULT_CONFIG, ["self_play.iterations=3", "train.steps=[10,20,30]", "train.batch_size=4",
                                       "train.gradient_accumulation_steps=2"])
    assert sft_baseline_steps(cfg) == 60
    spin_samples = sum(samples_per_iteration(cfg, k) for k in (1, 2, 3))
    assert samples_per_iteration(cfg, 1, sft_baseline_steps(cfg)) == spin_samples == 60 * 4 * 2


def test_sft_plan_uses_the_summed_steps_and_iteration_one_lr():
    cfg = load_config(DEFAULT_CONFIG, ["self_play.iterations=2", "train.steps=7", "train.lr=[0.001,0.0001]"])
    plan = train_plan(cfg, "model", 1, "sft", sft_baseline_steps(cfg))
    assert (plan.steps, plan.lr, plan.loss_type) == (14, 0.001, "sft")
    assert train_plan(cfg, "model", 2, "spin").steps == 7
