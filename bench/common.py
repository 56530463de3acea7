"""What the benchmarks share: models at two sizes, timing side by side, tables and the JSON line.

Sizes: ``tiny`` is spin_ray's tiny pipeline (16x16 latents, 128 px images, saved and loaded
through the production loader); ``sd15`` is the real Stable Diffusion 1.5 architecture with
random weights (speed does not depend on weight values, so nothing is downloaded): the UNet
and VAE configs below, random (B, 77, 768) text embeddings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from spin_ray.diffusion import SDComponents, load_components
from spin_ray.tiny import build_tiny_pipeline, save_tiny_pipeline, sd15_ddim_scheduler

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
"""runwayml/stable-diffusion-v1-5 unet/config.json, the fields that set its size."""

SD15_VAE_CONFIG = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.18215,
}
"""runwayml/stable-diffusion-v1-5 vae/config.json."""

TINY_LATENT_SIZE = 16


# ----------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """Flags every model benchmark takes."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny",
                        help="tiny: 16x16 latents; sd15: SD-1.5's UNet (64x64 latents), random weights")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (interleaved)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last weights in the fast path (default: on CUDA only, as in production)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fast path (generation: adds the ours_compiled variant; "
                             "train_step: compiles the UNets of both modes)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU (default: the GPU's bf16 peak from spin_ray.fast_path)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--workdir", default=None, help="where the tiny pipeline is written (default: a temp dir)")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- models


def tiny_pipeline_dir(workdir: str | Path) -> Path:
    """The tiny pipeline (seed 0, 16x16 latents) saved under ``workdir`` (reused if there)."""
    out = Path(workdir) / "tiny_pipeline"
    if not (out / "model_index.json").exists():
        save_tiny_pipeline(out, seed=0, sample_size=TINY_LATENT_SIZE)
    return out


def build_components(size: str, device: torch.device, dtype: torch.dtype, workdir: str | Path, *,
                     sd15_vae: bool = True) -> SDComponents:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler at ``size`` on ``device`` in ``dtype``.

    ``sd15``: random SD-1.5 UNet and VAE built on the device (fast even at 860M parameters);
    the text encoder and tokenizer are the tiny ones, never run (the benches pass embeddings).
    ``sd15_vae=False`` keeps the tiny VAE instead (for benches that never decode).
    """
    if size == "tiny":
        return load_components(str(tiny_pipeline_dir(workdir)), local_files_only=True, device=device, dtype=dtype)
    tiny = build_tiny_pipeline(seed=0, sample_size=TINY_LATENT_SIZE)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG) if sd15_vae else tiny.vae.to(device)
    return SDComponents(
        unet=_cast(unet, dtype).eval(), vae=_cast(vae, dtype).eval().requires_grad_(False),
        text_encoder=_cast(tiny.text_encoder.to(device), dtype).requires_grad_(False),
        tokenizer=tiny.tokenizer, scheduler=sd15_ddim_scheduler(),
    )


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast only when needed: diffusers warns on every ``.to(dtype)``."""
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


def stock_pipeline(components: SDComponents, unet: torch.nn.Module | None = None) -> StableDiffusionPipeline:
    """diffusers' own StableDiffusionPipeline over the same modules (no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet, scheduler=components.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_text_embeddings(batch: int, dim: int, device: torch.device, dtype: torch.dtype,
                           seed: int = 0) -> torch.Tensor:
    """(batch, 77, dim) N(0, 1) stand-ins for CLIP text embeddings."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, dim, generator=generator).to(device=device, dtype=dtype)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call of each variant: the median wall time, the best (least disturbed) wall
    time, and the median CPU time of this process (on a shared CPU machine, CPU time does not
    count the time other processes hold the cores; on GPU it means little)."""

    median: dict[str, float]
    best: dict[str, float]
    cpu_median: dict[str, float]
    outputs: dict[str, object]
    """Each variant's last output."""


def time_side_by_side(variants: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                      device: torch.device) -> Timings:
    """Run each variant ``warmup`` times, then ``repeats`` rounds of all variants in turn (so
    machine noise hits them alike)."""
    outputs: dict[str, object] = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            outputs[name] = fn()
    synchronize(device)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return Timings(median={name: statistics.median(values) for name, values in wall.items()},
                   best={name: min(values) for name, values in wall.items()},
                   cpu_median={name: statistics.median(values) for name, values in cpu.items()}, outputs=outputs)


# ----------------------------------------------------------------------------- reporting


def machine(device: torch.device) -> dict[str, object]:
    """Where and when the figures were taken."""
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device), "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def emit_json(record: dict[str, object]) -> dict[str, object]:
    """Print ``record`` as the last line of output (one JSON object) and return it."""
    print(json.dumps(record, sort_keys=True), flush=True)
    return record


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
