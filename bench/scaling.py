"""The scaling model: one iteration's time on N GPUs split between generation and training.

Generation actors and training workers stream concurrently (docs/DESIGN.md section 3.1), so with G
generation GPUs at g images/s each and T training GPUs at s samples/s each, an iteration of n
samples takes about

    time(G, T) = max(n / (G g), n / (T s)) + startup

and is balanced when G g = T s, i.e. G / T = s / g. On a single GPU both share it:
n / g + n / s + startup. Per-GPU rates come from measurements (``bench/gpu.sh`` prints them)
or from FLOPs: rate = MFU x peak FLOP/s / FLOPs per item. SD-1.5's UNet costs 0.803 TFLOP per
512x512 sample forward; an opponent image is 100 forwards (50 DDIM steps, two guidance
branches), plus, with the ``precomputed`` reference (the default), theta_k's 2 forwards for its
errors on the real and the synthetic latent; a SPIN training sample is 6 forwards' worth
(policy forward and backward on both latents), plus those 2 with the ``online`` reference.

Run: ``python -m bench.scaling`` (FLOP-based estimate) or
``python -m bench.scaling --gen-images-per-s 5.1 --train-samples-per-s 40`` (measured rates).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from bench.common import emit_json, print_table

SD15_TFLOP_PER_FORWARD = 0.803
"""SD-1.5 UNet, one 512x512 sample (64x64 latents), counted by spin_ray.fast_path.model_flops_per_forward."""
PAPER_DDIM_STEPS = 50
PAPER_ITERATION_1_SAMPLES = 50 * 2048  # SPIN-Diffusion iteration 1: 50 steps x 2048 pairs
DEFAULT_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Plan:
    """The best split of ``gpus`` and the predicted time of one iteration."""

    gpus: int
    gen_gpus: int
    train_gpus: int
    gen_seconds: float
    train_seconds: float
    seconds: float
    shared: bool
    """One GPU does both, one after the other."""


def plan_iteration(gpus: int, n_samples: int, gen_rate: float, train_rate: float, startup: float) -> Plan:
    """The integer split of ``gpus`` (G generation + T training, both >= 1) with the shortest
    iteration; rates are per GPU (images/s, samples/s)."""
    if gpus < 1 or n_samples < 1 or gen_rate <= 0 or train_rate <= 0 or startup < 0:
        raise ValueError(f"plan_iteration: need gpus >= 1, n_samples >= 1, positive rates, startup >= 0; got "
                         f"{gpus}, {n_samples}, {gen_rate}, {train_rate}, {startup}")
    if gpus == 1:
        gen, train = n_samples / gen_rate, n_samples / train_rate
        return Plan(1, 1, 1, gen, train, gen + train + startup, shared=True)
    candidates = []
    for gen_gpus in range(1, gpus):
        gen, train = n_samples / (gen_gpus * gen_rate), n_samples / ((gpus - gen_gpus) * train_rate)
        candidates.append(Plan(gpus, gen_gpus, gpus - gen_gpus, gen, train, max(gen, train) + startup, shared=False))
    return min(candidates, key=lambda plan: plan.seconds)


def sd15_tflop_per_item(reference: str, steps: int = PAPER_DDIM_STEPS) -> tuple[float, float]:
    """(TFLOP per opponent image, TFLOP per training sample) at SD-1.5 size with guidance."""
    reference_forwards = 2  # theta_k on the real and the synthetic latent
    gen = SD15_TFLOP_PER_FORWARD * (2 * steps + (reference_forwards if reference == "precomputed" else 0))
    train = SD15_TFLOP_PER_FORWARD * (6 + (reference_forwards if reference == "online" else 0))
    return gen, train


def flop_rate(tflop_per_item: float, peak_tflops: float, mfu: float) -> float:
    """Items per second of one GPU running at ``mfu`` of ``peak_tflops``."""
    return mfu * peak_tflops / tflop_per_item


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=PAPER_ITERATION_1_SAMPLES, help="samples per iteration")
    parser.add_argument("--startup", type=float, default=120.0, help="seconds of fixed start-up per iteration")
    parser.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPU_COUNTS)), help="GPU counts to tabulate")
    parser.add_argument("--gen-images-per-s", type=float, default=None, help="measured opponent images/s per GPU")
    parser.add_argument("--train-samples-per-s", type=float, default=None, help="measured train samples/s per GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="for FLOP-based rates (H100 SXM bf16)")
    parser.add_argument("--gen-mfu", type=float, default=0.40, help="assumed MFU of generation")
    parser.add_argument("--train-mfu", type=float, default=0.30, help="assumed MFU of training")
    parser.add_argument("--reference", choices=["precomputed", "online"], default="precomputed",
                        help="where theta_k's errors are computed (loss.reference); sets the default FLOPs")
    parser.add_argument("--gen-tflop", type=float, default=None,
                        help="TFLOP per opponent image (default: SD-1.5, 50 DDIM steps, by --reference)")
    parser.add_argument("--train-tflop", type=float, default=None,
                        help="TFLOP per training sample (default: SD-1.5, by --reference)")
    args = parser.parse_args(argv)
    gen, train = sd15_tflop_per_item(args.reference)
    args.gen_tflop = gen if args.gen_tflop is None else args.gen_tflop
    args.train_tflop = train if args.train_tflop is None else args.train_tflop
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Print the table for each GPU count; returns the record printed as the last line."""
    args = parse_args(argv)
    measured = args.gen_images_per_s is not None and args.train_samples_per_s is not None
    gen_rate = args.gen_images_per_s if measured else flop_rate(args.gen_tflop, args.peak_tflops, args.gen_mfu)
    train_rate = args.train_samples_per_s if measured else flop_rate(args.train_tflop, args.peak_tflops,
                                                                      args.train_mfu)
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    plans = [plan_iteration(n, args.samples, gen_rate, train_rate, args.startup) for n in gpu_counts]
    source = "measured rates" if measured else (
        f"ESTIMATE from FLOPs: {args.gen_tflop:.4g} TFLOP/image at {args.gen_mfu:.0%} MFU, {args.train_tflop:.4g} "
        f"TFLOP/sample at {args.train_mfu:.0%} MFU, peak {args.peak_tflops} TFLOP/s, {args.reference} reference")
    rows = [[p.gpus, "shared" if p.shared else p.gen_gpus, "shared" if p.shared else p.train_gpus,
             p.gen_seconds, p.train_seconds, p.seconds, p.seconds / 3600, plans[0].seconds / p.seconds]
            for p in plans]
    print_table(f"one iteration of {args.samples} samples, g = {gen_rate:.3g} images/s/GPU, s = {train_rate:.3g} "
                f"samples/s/GPU, balanced G/T = s/g = {train_rate / gen_rate:.3g}, startup {args.startup:.0f}s "
                f"({source})",
                ["GPUs", "gen GPUs", "train GPUs", "gen s", "train s", "iteration s", "hours", "speed-up"], rows)
    return emit_json({
        "bench": "scaling", "measured": measured, "reference": args.reference, "samples": args.samples,
        "startup_s": args.startup, "gen_tflop_per_image": None if measured else args.gen_tflop,
        "train_tflop_per_sample": None if measured else args.train_tflop,
        "gen_images_per_s_per_gpu": gen_rate, "train_samples_per_s_per_gpu": train_rate,
        "balanced_gen_to_train_ratio": train_rate / gen_rate, "plans": [asdict(p) for p in plans],
    })


if __name__ == "__main__":
    main()
