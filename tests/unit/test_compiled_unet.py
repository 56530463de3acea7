"""torch.compile'd code actually runs (``train.compile``) and computes what the eager UNet computes.

The other compile tests check that the flag compiles the module in place (the marker that
``nn.Module.compile()`` leaves is lazy: nothing is compiled until the first call). Here the
tiny UNet, prepared by the fast-path function the trainer uses, is called: its prediction, the
loss and every gradient must equal the eager ones up to the reordering of float32 sums that the
compiler's fused kernels may do (rtol 1e-4, atol 1e-5). ``generation.compile`` compiles through
the same helper (``spin_ray.fast_path._prepare``, ``unet.compile()``); it differs only in eval
mode and frozen weights. Compiling the forward and backward graphs with inductor on a CPU takes
about 1.5 CPU-minutes with a cold inductor cache (4 minutes of wall time on a loaded 2-core
machine; about 30 s once inductor's on-disk cache holds the kernels): ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spin_ray.diffusion import load_unet
from spin_ray.fast_path import prepare_unet_for_training

pytestmark = pytest.mark.slow

LATENT_SHAPE = (4, 16, 16)
RTOL, ATOL = 1e-4, 1e-5


def _inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((2, *LATENT_SHAPE), generator=generator)
    embeds = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    return noisy, torch.tensor([10, 700]), embeds


def _compiled(unet: torch.nn.Module) -> bool:
    return getattr(unet, "_compiled_call_impl", None) is not None


def test_the_compiled_trained_unet_gives_the_eager_loss_and_gradients(tiny_pipeline_dir):
    torch._dynamo.reset()
    eager = prepare_unet_for_training(load_unet(str(tiny_pipeline_dir), local_files_only=True), "cpu")
    compiled = prepare_unet_for_training(copy.deepcopy(eager), "cpu", compile=True)
    assert _compiled(compiled)
    noisy, timesteps, embeds = _inputs(eager)
    target = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(1))
    predictions, losses = [], []
    for unet in (eager, compiled):
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        loss = (prediction - target).pow(2).mean()
        loss.backward()
        predictions.append(prediction.detach())
        losses.append(loss.detach())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled code ran
    torch.testing.assert_close(predictions[1], predictions[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(losses[1], losses[0], rtol=RTOL, atol=ATOL)
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    compiled_grads = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)
