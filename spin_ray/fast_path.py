"""The UNet fast path on GPU, and the FLOP accounting that says how close to the hardware we are.

Generation is over 90% of SPIN's compute (docs/DESIGN.md section 5: ~80 TFLOP per opponent image at
SD-1.5 size against ~6.4 TFLOP per training sample), so the UNet must run near the GPU's
limit: bf16 weights for the frozen opponent, PyTorch's fused scaled-dot-product attention
(diffusers' ``AttnProcessor2_0``), channels_last convolutions and, optionally, torch.compile.
Every step keeps the model's function: in float32 a prepared UNet gives the unprepared one's
outputs up to float rounding.

Model FLOPs utilisation (MFU) = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with
the model FLOPs counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add of matmuls,
convolutions and attention; elementwise ops not counted, as usual).
"""

from __future__ import annotations

import logging
import re

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

PEAK_BF16_DENSE_FLOPS: dict[str, float] = {
    "H200": 989.4e12,  # SXM; same tensor cores as the H100 SXM
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # SXM
    "A100": 312.0e12,  # SXM and PCIe
    "A10G": 70.0e12,  # AWS's A10G (the A10 is 125e12)
    "L4": 121.0e12,
}
"""Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s from NVIDIA's (and AWS's) data
sheets, keyed by the words of ``torch.cuda.get_device_name()`` that identify the GPU."""

_PLAIN_ATTENTION = (AttnProcessor, AttnProcessor2_0)
BACKWARD_TO_FORWARD_FLOPS = 2.0
"""A backward pass costs about twice its forward (gradients w.r.t. inputs and weights)."""


# ----------------------------------------------------------------------------- preparation


def prepare_unet_for_inference(
    unet: torch.nn.Module,
    device: str | torch.device,
    *,
    dtype: torch.dtype,
    channels_last: bool | None = None,
    compile: bool = False,
) -> torch.nn.Module:
    """Make a frozen UNet (the opponent theta_k) fast for sampling; modifies and returns ``unet``.

    eval mode, no gradients, moved to ``device`` in ``dtype`` (bf16 on GPU: half the memory of
    float32 and the tensor cores' full rate; sampling needs no float32 master weights), SDPA
    attention, channels_last weights (``None``: on CUDA only, see :func:`resolve_channels_last`),
    and ``unet.compile()`` in place when ``compile`` (the
    object keeps its type, so ``.config``, ``.device`` and ``.dtype`` still work; the
    first calls at each new input shape are slow while it compiles). Inputs keep their shapes:
    sample (B, C, h, w), timestep () or (B,), encoder_hidden_states (B, 77, D).
    """
    unet.eval().requires_grad_(False)
    return _prepare(unet, torch.device(device), dtype, channels_last=channels_last, compile=compile)


def prepare_unet_for_training(
    unet: torch.nn.Module,
    device: str | torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool | None = None,
    compile: bool = False,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Make the trained UNet (theta) fast; modifies and returns ``unet``.

    Train mode; weights stay in ``dtype`` (float32 by default) and the caller runs the forward
    under ``torch.autocast(device_type, dtype=torch.bfloat16)``: AdamW updates at SPIN's third
    learning rate (5e-8) are far below bf16's resolution of a weight, so bf16 master weights
    would not move. SDPA attention, channels_last weights (``None``: on CUDA only), optional
    gradient checkpointing and optional in-place ``unet.compile()``. With DDP, prefer compiling the DDP-wrapped module
    (``compile=False`` here) so that gradient all-reduce still overlaps the backward pass.
    ``requires_grad`` flags are left as they are (LoRA freezes the base weights).
    """
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return _prepare(unet, torch.device(device), dtype, channels_last=channels_last, compile=compile)


def resolve_channels_last(channels_last: bool | None, device: str | torch.device) -> bool:
    """``channels_last`` as given, or, when None, True on CUDA only: cuDNN's NHWC convolutions
    are faster there, while on the CPU channels_last made the tiny UNet's sampling 6% slower
    (median; 13% in the best runs, docs/PERFORMANCE.md)."""
    if channels_last is None:
        return torch.device(device).type == "cuda"
    return channels_last


def _prepare(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, channels_last: bool | None,
             compile: bool) -> torch.nn.Module:
    unet.to(device)
    if next(unet.parameters()).dtype != dtype:  # diffusers warns on casts; cast only when needed
        unet.to(dtype)
    set_sdpa_attention(unet)
    if resolve_channels_last(channels_last, device):
        unet.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        enable_fast_cuda_kernels()
    if compile:
        unet.compile()
    return unet


def set_sdpa_attention(unet: torch.nn.Module) -> int:
    """Use PyTorch's fused ``scaled_dot_product_attention`` (diffusers ``AttnProcessor2_0``) in
    every attention layer that has diffusers' plain processor; returns how many layers use it.

    Recent diffusers already default to it; setting it explicitly protects against a UNet whose
    processors were switched to the slow ``AttnProcessor`` (as ``set_default_attn_processor()``
    does). Custom processors (IP-adapter, LoRA processors, ...) are kept as they are.
    """
    processors = unet.attn_processors
    # Exact types: a subclass of the plain processor is somebody's custom processor.
    chosen = {name: AttnProcessor2_0() if type(proc) in _PLAIN_ATTENTION else proc
              for name, proc in processors.items()}
    if chosen:
        unet.set_attn_processor(chosen)
    kept = sorted({type(p).__name__ for p in chosen.values() if type(p) is not AttnProcessor2_0})
    if kept:
        log.info("kept custom attention processors %s", ", ".join(kept))
    return sum(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def enable_fast_cuda_kernels() -> None:
    """Process-wide CUDA settings for fixed-shape convolution networks: cuDNN autotuning
    (each UNet layer sees the same shapes every step) and TF32 for the float32 matmuls and
    convolutions that remain outside bf16 autocast."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------- FLOPs and MFU


def model_flops_per_forward(
    unet: torch.nn.Module,
    sample_shape: tuple[int, ...],
    encoder_shape: tuple[int, ...],
) -> int:
    """FLOPs of one UNet forward on a sample batch of ``sample_shape`` (B, C, h, w) with text
    embeddings of ``encoder_shape`` (B, L, D), counted with ``FlopCounterMode``.

    A diffusers model is counted on a twin built from its config on the ``meta`` device: no
    memory, no compute, and a compiled or DDP-wrapped UNet is not triggered. Other modules are
    run for real on their device. SD-1.5 at 512x512 (64x64 latents) counts 0.80 TFLOP per sample.
    """
    if sample_shape[0] != encoder_shape[0]:
        raise ValueError(f"sample_shape {sample_shape} and encoder_shape {encoder_shape}: batch sizes differ")
    model = getattr(unet, "module", unet)  # DDP keeps the model in .module
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        with torch.device("meta"):
            model = type(model).from_config(model.config)
    weight = next(model.parameters())
    sample = torch.zeros(sample_shape, device=weight.device, dtype=weight.dtype)
    encoder = torch.zeros(encoder_shape, device=weight.device, dtype=weight.dtype)
    timesteps = torch.full((sample_shape[0],), 500, device=weight.device, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(sample, timesteps, encoder_hidden_states=encoder)
    return int(counter.get_total_flops())


def generation_flops_per_image(forward_flops_per_sample: float, num_inference_steps: int,
                               guidance_scale: float) -> float:
    """Model FLOPs of sampling one image: one UNet forward per step, two with classifier-free
    guidance (the unconditional and the conditional branch). No VAE decode (the generator
    ships latents)."""
    branches = 2 if guidance_scale != 1.0 else 1
    return forward_flops_per_sample * num_inference_steps * branches


def spin_flops_per_sample(forward_flops_per_sample: float, *, online_reference: bool) -> float:
    """Model FLOPs of one SPIN training sample (a real and a synthetic latent, eq. 4.9): the
    policy's forward and backward on both (3 forwards' worth each), plus, with the ``online``
    reference, theta_k's forward on both. With the ``precomputed`` reference those two
    forwards run on the generation side instead."""
    policy = 2 * (1 + BACKWARD_TO_FORWARD_FLOPS) * forward_flops_per_sample
    return policy + (2 * forward_flops_per_sample if online_reference else 0.0)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` as a fraction of ``peak_flops``
    (FLOP/s of the hardware, e.g. :data:`PEAK_BF16_DENSE_FLOPS`)."""
    if seconds <= 0:
        raise ValueError(f"seconds: must be > 0, got {seconds}")
    if peak_flops <= 0:
        raise ValueError(f"peak_flops: must be > 0, got {peak_flops}")
    if flops < 0:
        raise ValueError(f"flops: must be >= 0, got {flops}")
    return flops / seconds / peak_flops


def peak_bf16_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name (default: the current CUDA device), or None
    when the GPU is not in :data:`PEAK_BF16_DENSE_FLOPS` or there is no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    words = set(re.split(r"[\s\-_/]+", device_name.upper()))
    # Most specific key first: "H100 PCIe" before "H100"; whole words, so "L4" never matches "L40S".
    for key in sorted(PEAK_BF16_DENSE_FLOPS, key=lambda k: -len(k.split())):
        if set(key.upper().split()) <= words:
            return PEAK_BF16_DENSE_FLOPS[key]
    return None
