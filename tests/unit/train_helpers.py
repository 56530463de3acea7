"""Helpers shared by the training-loop tests (``test_train_loop``, ``test_trainer_faults``)."""

from __future__ import annotations

from dataclasses import replace

import torch

from spin_ray.train_loop import TrainPlan


def make_plan(**changes) -> TrainPlan:
    plan = TrainPlan(
        init_model_path="unused", loss_type="spin", online_reference=False, beta=2000.0, lr=1e-3, steps=6,
        batch_size=2, gradient_accumulation_steps=1, weight_decay=1e-2, warmup_steps=0, lr_schedule="linear",
        max_grad_norm=1.0, mixed_precision="no", gradient_checkpointing=False, checkpoint_every=1,
        log_every=1, max_nonfinite_steps=2, shared_noise=True, timestep_weighting="none", seed=0,
    )
    return replace(plan, **changes)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": value.clone() for i, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()}


def pair_rows(components, count: int, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``count`` pair rows as the data shard holds them, each with its own noise seed; the
    opponent's errors are all 1.0 (precomputed reference)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *components.latent_shape(128))
    embed_dim = components.text_encoder.config.hidden_size
    return {
        "sample_id": torch.arange(count),
        "noise_seed": 100 + torch.arange(count),
        "prompt_embeds": torch.randn((count, 77, embed_dim), generator=generator).half(),
        "latents_real": torch.randn(shape, generator=generator),
        "latents_syn": torch.randn(shape, generator=generator),
        "ref_mse_real": torch.ones(count),
        "ref_mse_syn": torch.ones(count),
    }

