"""SPIN training step: opponent errors precomputed on the Data side against the ``online`` reference.

Both modes run :func:`spin_ray.train_step.spin_batch_loss` with AdamW, clipping and (on GPU)
bf16 autocast, as the trainer does, on the same policy UNet and batch of pairs:

- ``precomputed``: the batch carries ``ref_mse_real``/``ref_mse_syn`` (theta_k ran on the
  generation side), so the trainer holds no reference UNet;
- ``online``: the trainer holds a frozen copy of theta_k (``ref_unet``) and runs it on both
  latents each step.

Step time is measured side by side in this process (interleaved rounds, median). Peak memory
is measured in one fresh child process per mode, so each sees only what its mode allocates:
``torch.cuda.max_memory_allocated`` on GPU, the process's peak resident set size (Linux VmHWM,
else ``resource.getrusage``) on CPU (that includes the Python runtime, the same for both modes).

Run: ``python -m bench.train_step --size tiny`` (CPU) or ``--size sd15 --device cuda``.
Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from bench.common import (
    Timings,
    add_common_args,
    build_components,
    check_positive,
    emit_json,
    machine,
    param_bytes,
    print_table,
    random_text_embeddings,
    ratio,
    resolve_device,
    resolve_dtype,
    set_threads,
    synchronize,
    time_side_by_side,
)
from spin_ray.fast_path import (
    mfu,
    model_flops_per_forward,
    peak_bf16_flops,
    prepare_unet_for_inference,
    prepare_unet_for_training,
    resolve_channels_last,
    spin_flops_per_sample,
)
from spin_ray.pair_schema import PairBatch
from spin_ray.train_step import make_optimizer, spin_batch_loss

MODES = ("precomputed", "online")
BETA = 2000.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, batch_size=8)
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="prepare the UNets with spin_ray.fast_path (both modes alike)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure peak memory per mode in child processes")
    args = parser.parse_args(argv)
    check_positive(args, "batch_size", "repeats")
    return args


@dataclass
class StepSetup:
    """One mode's models, optimizer and batch on the device."""

    unet: torch.nn.Module
    ref_unet: torch.nn.Module | None
    scheduler: object
    optimizer: torch.optim.Optimizer
    batch: PairBatch
    autocast: torch.autocast


def build_setup(args: argparse.Namespace, device: torch.device, workdir: str, *, online: bool) -> StepSetup:
    """The policy theta (float32 master weights), theta_k in ``online`` mode, AdamW, a batch."""
    components = build_components(args.size, device, torch.float32, workdir, sd15_vae=False)
    unet = components.unet
    ref_unet = copy.deepcopy(unet) if online else None
    compute_dtype = resolve_dtype(args.dtype, device)
    if args.fast:
        prepare_unet_for_training(unet, device, channels_last=args.channels_last, compile=args.compile,
                                  gradient_checkpointing=args.gradient_checkpointing)
        if ref_unet is not None:
            prepare_unet_for_inference(ref_unet, device, dtype=compute_dtype, channels_last=args.channels_last,
                                       compile=args.compile)
    else:
        unet.train()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if ref_unet is not None:
            ref_unet.eval().requires_grad_(False)
    return StepSetup(
        unet=unet, ref_unet=ref_unet, scheduler=components.scheduler,
        optimizer=make_optimizer(unet.parameters(), lr=1e-6, weight_decay=1e-2),
        batch=random_pairs(args.batch_size, unet, device, with_reference=not online),
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16),
    )


def random_pairs(batch: int, unet: torch.nn.Module, device: torch.device, *, with_reference: bool) -> PairBatch:
    """Random (real, synthetic) latents (B, C, h, w), embeddings (B, 77, D), seeds and, for the
    precomputed mode, the opponent's errors (B,): step time does not depend on their values."""
    generator = torch.Generator().manual_seed(0)
    side, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    latents = torch.randn(2, batch, channels, side, side, generator=generator).to(device)
    ref = (torch.rand(2, batch, generator=generator) + 0.5).to(device) if with_reference else None
    return PairBatch(
        latents_real=latents[0], latents_syn=latents[1],
        prompt_embeds=random_text_embeddings(batch, int(unet.config.cross_attention_dim), device, torch.float32),
        noise_seed=torch.arange(batch, dtype=torch.int64),
        ref_mse_real=None if ref is None else ref[0], ref_mse_syn=None if ref is None else ref[1],
    )


def train_step(setup: StepSetup, *, online: bool, batch: PairBatch | None = None) -> float:
    """One optimizer step as the trainer takes it; returns the loss."""
    setup.optimizer.zero_grad(set_to_none=True)
    with setup.autocast:
        out = spin_batch_loss(setup.unet, setup.scheduler, batch or setup.batch, beta=BETA,
                              ref_unet=setup.ref_unet if online else None)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(setup.unet.parameters(), 1.0)
    setup.optimizer.step()
    return float(out.loss.detach())


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark; returns the record it printed as its last line."""
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        setup = build_setup(args, device, workdir, online=True)
        precomputed_batch = random_pairs(args.batch_size, setup.unet, device, with_reference=True)
        variants = {
            "precomputed": lambda: train_step(setup, online=False, batch=precomputed_batch),
            "online": lambda: train_step(setup, online=True),
        }
        timings = time_side_by_side(variants, warmup=args.warmup, repeats=args.repeats, device=device)
        peaks = peak_memory_by_mode(args, workdir) if args.memory else {}
    record = summarize(args, setup, device, timings, peaks)
    print_report(record)
    return emit_json(record)


# ----------------------------------------------------------------------------- peak memory


def peak_memory_by_mode(args: argparse.Namespace, workdir: str) -> dict[str, int]:
    """Peak bytes of each mode, each measured in a fresh child process (one at a time)."""
    context = multiprocessing.get_context("spawn")  # fresh interpreter: no memory of this one
    peaks = {}
    for mode in MODES:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            peaks[mode] = pool.submit(peak_memory_child, vars(args), workdir, mode).result()
    return peaks


def peak_memory_child(arg_values: dict, workdir: str, mode: str) -> int:
    """In a child process: build ``mode``'s setup, take warm-up + 2 steps, return peak bytes."""
    args = argparse.Namespace(**arg_values)
    set_threads(args.threads)
    device = resolve_device(args.device)
    online = mode == "online"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = build_setup(args, device, workdir, online=online)
    for _ in range(args.warmup + 2):
        train_step(setup, online=online)
    synchronize(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM, not ``ru_maxrss``: a spawned
    child is forked from its parent before it execs Python, and ``ru_maxrss`` keeps the
    parent's peak from before the exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


# ----------------------------------------------------------------------------- report


def summarize(args: argparse.Namespace, setup: StepSetup, device: torch.device, timings: Timings,
              peaks: dict[str, int]) -> dict[str, object]:
    """Samples/s (from the median step time), the time ratio, MFU and peak memory per mode."""
    seconds = timings.median
    unet = setup.unet
    side = int(unet.config.sample_size)
    forward_flops = model_flops_per_forward(unet, (1, int(unet.config.in_channels), side, side),
                                            (1, 77, int(unet.config.cross_attention_dim)))
    flops = {mode: spin_flops_per_sample(forward_flops, online_reference=mode == "online") for mode in MODES}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16_flops() if device.type == "cuda" else None)
    saved = peaks["online"] - peaks["precomputed"] if peaks else None
    ref_bytes = param_bytes(setup.ref_unet)
    return {
        "bench": "train_step", "size": args.size, "batch_size": args.batch_size, "fast": args.fast,
        "compile": args.compile, "channels_last": resolve_channels_last(args.channels_last, device),
        "gradient_checkpointing": args.gradient_checkpointing, "repeats": args.repeats,
        "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."), "machine": machine(device),
        "seconds_per_step": seconds,
        "samples_per_s": {mode: args.batch_size / s for mode, s in seconds.items()},
        "time_ratio_precomputed_vs_online": ratio(seconds["precomputed"], seconds["online"]),
        "best_seconds_per_step": timings.best,
        "best_time_ratio_precomputed_vs_online": ratio(timings.best["precomputed"], timings.best["online"]),
        "cpu_seconds_per_step": timings.cpu_median,
        "cpu_time_ratio_precomputed_vs_online": ratio(timings.cpu_median["precomputed"], timings.cpu_median["online"]),
        "tflop_per_sample": {mode: f / 1e12 for mode, f in flops.items()},
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": {mode: mfu(flops[mode] * args.batch_size, seconds[mode], peak) if peak else None for mode in MODES},
        "peak_memory_bytes": peaks or None,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "reference_unet_bytes": ref_bytes,
        "policy_unet_bytes": param_bytes(unet),
        "memory_saved_bytes": saved,
        "memory_saved_in_reference_unets": ratio(saved, ref_bytes),
    }


def print_report(record: dict[str, object]) -> None:
    peaks = record["peak_memory_bytes"] or {}
    rows = [[mode, record["seconds_per_step"][mode], record["samples_per_s"][mode], record["mfu"][mode],
             peaks[mode] / 2**20 if mode in peaks else None] for mode in MODES]
    title = (f"SPIN train step: {record['size']}, batch {record['batch_size']} pairs, {record['dtype']} compute, "
             f"fast path {'on' if record['fast'] else 'off'}, on {record['machine']['device']}; "
             f"precomputed/online step time {record['time_ratio_precomputed_vs_online']:.3f} "
             f"(best runs: {record['best_time_ratio_precomputed_vs_online']:.3f}, "
             f"CPU time: {record['cpu_time_ratio_precomputed_vs_online']:.3f})")
    print_table(title, ["mode", "s/step", "samples/s", "MFU", f"peak MiB ({record['peak_memory_kind']})"], rows)
    if record["memory_saved_bytes"] is not None:
        print(f"memory saved by precomputing: {record['memory_saved_bytes'] / 2**20:.1f} MiB = "
              f"{record['memory_saved_in_reference_unets']:.2f} x the reference UNet's "
              f"{record['reference_unet_bytes'] / 2**20:.1f} MiB of weights")


if __name__ == "__main__":
    main()
