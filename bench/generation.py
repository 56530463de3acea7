"""Opponent generation throughput: spin-ray's sampler against stock diffusers, side by side.

Same UNet, text embeddings, seeds, DDIM steps, guidance and batch size for every variant:

- ``stock_latent``: ``StableDiffusionPipeline.__call__(output_type="latent")`` (no decode);
- ``stock_decode``: the same, decoding to images (``output_type="np"``);
- ``ours``: :func:`spin_ray.diffusion.sample_latents`, the sampler OpponentGenerator runs;
- ``ours_fast``: the same on a copy of the UNet prepared by
  :func:`spin_ray.fast_path.prepare_unet_for_inference` (SDPA; channels_last on CUDA unless ``--channels-last``/``--no-channels-last``);
- ``ours_compiled`` (``--compile``): that plus torch.compile;
- ``generator`` (``--size tiny``): ``OpponentGenerator.__call__`` on a numpy batch, end to end
  (it loads its own copy of the pipeline from disk; opponent errors off, nothing written).

``--variants`` picks a subset (each ``ours_*`` variant holds one more copy of the UNet).

Run: ``python -m bench.generation --size tiny`` (CPU) or ``--size sd15 --device cuda``.
Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from bench.common import (
    Timings,
    add_common_args,
    build_components,
    check_positive,
    emit_json,
    machine,
    print_table,
    random_text_embeddings,
    ratio,
    resolve_device,
    resolve_dtype,
    set_threads,
    stock_pipeline,
    time_side_by_side,
    tiny_pipeline_dir,
)
from spin_ray.diffusion import SDComponents, sample_latents
from spin_ray.fast_path import (
    generation_flops_per_image,
    mfu,
    model_flops_per_forward,
    peak_bf16_flops,
    prepare_unet_for_inference,
    resolve_channels_last,
)
from spin_ray.generation import GeneratorSpec, OpponentGenerator

STOCK = "stock_latent"
ALL_VARIANTS = ("stock_latent", "stock_decode", "ours", "ours_fast", "ours_compiled", "generator")
DEFAULT_VARIANTS = ("stock_latent", "stock_decode", "ours", "ours_fast", "generator")
LATENT_VARIANTS = ("stock_latent", "ours", "ours_fast", "ours_compiled", "generator")
"""Variants that stop at latents: their model FLOPs are the UNet's only (MFU is reported)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, batch_size=8)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {ALL_VARIANTS}; stock_latent is always run "
                             "(ratios are to it), ours_compiled is added by --compile, generator needs --size tiny")
    args = parser.parse_args(argv)
    check_positive(args, "batch_size", "steps", "repeats")
    args.variants = select_variants(args)
    return args


def select_variants(args: argparse.Namespace) -> list[str]:
    chosen = {v.strip() for v in args.variants.split(",") if v.strip()} | {STOCK}
    unknown = sorted(chosen - set(ALL_VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {ALL_VARIANTS}")
    if args.compile:
        chosen.add("ours_compiled")
    if args.size != "tiny":
        chosen.discard("generator")  # it loads a pipeline directory; sd15 exists only in memory here
    return [v for v in ALL_VARIANTS if v in chosen]


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark; returns the record it printed as its last line."""
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.size == "sd15" and device.type == "cpu":
        print("note: SD-1.5 size on CPU costs ~0.8 TFLOP per UNet sample; use few --steps", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        components = build_components(args.size, device, dtype, workdir)
        variants, errors = build_variants(args, components, device, dtype, workdir)
        timings = time_side_by_side(variants, warmup=args.warmup, repeats=args.repeats, device=device)
    record = summarize(args, components, device, dtype, timings)
    record["errors"] = errors
    print_report(record)
    return emit_json(record)


def build_variants(args: argparse.Namespace, components: SDComponents, device: torch.device, dtype: torch.dtype,
                   workdir: str) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """The callables timed side by side (each returns its latents or images), and the variants
    that could not be built, with their error (only ``ours_compiled`` may fail: torch.compile
    needs a working compiler toolchain, which a machine may lack)."""
    unet = components.unet
    dim = int(unet.config.cross_attention_dim)
    side = int(unet.config.sample_size)
    latent_shape = (int(unet.config.in_channels), side, side)
    embeds = random_text_embeddings(args.batch_size, dim, device, dtype, seed=0)
    negative = random_text_embeddings(1, dim, device, dtype, seed=1)
    seeds = list(range(args.batch_size))
    pipe = stock_pipeline(components)

    def stock(output_type: str) -> Callable[[], object]:
        def call():
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative.expand(len(seeds), -1, -1),
                        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                        generator=generators, output_type=output_type).images
        return call

    def ours(model: torch.nn.Module) -> Callable[[], object]:
        return lambda: sample_latents(model, components.scheduler, embeds, negative, seeds,
                                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                      latent_shape=latent_shape)

    def fast_copy(compile_: bool) -> torch.nn.Module:
        return prepare_unet_for_inference(copy.deepcopy(unet), device, dtype=dtype,
                                          channels_last=args.channels_last, compile=compile_)

    def compiled() -> Callable[[], object]:
        call = ours(fast_copy(True))
        call()  # compiles now, so that a compiler failure drops this variant and not the whole bench
        return call

    makers = {
        "stock_latent": lambda: stock("latent"),
        "stock_decode": lambda: stock("np"),
        "ours": lambda: ours(unet),
        "ours_fast": lambda: ours(fast_copy(False)),
        "ours_compiled": compiled,
        "generator": lambda: generator_variant(args, device, dtype, workdir, embeds, latent_shape),
    }
    variants, errors = {}, {}
    for name in args.variants:
        try:
            variants[name] = makers[name]()
        except Exception as err:  # reported in the record; the other variants still run
            if name != "ours_compiled":
                raise
            errors[name] = f"{type(err).__name__}: {err}"[:2000]
            print(f"variant {name} dropped: {errors[name]}", flush=True)
    return variants, errors


def generator_variant(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: str,
                      embeds: torch.Tensor, latent_shape: tuple[int, int, int]) -> Callable[[], object]:
    """OpponentGenerator.__call__ on a numpy batch, as Ray Data calls it."""
    spec = GeneratorSpec(
        model_path=str(tiny_pipeline_dir(workdir)), iteration=1, run_seed=0,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=0.0,
        precompute_reference=False, shared_noise=True, opponents_dir=None, device=str(device),
        mixed_precision="no" if dtype == torch.float32 else "bf16",
    )
    generator = OpponentGenerator(spec)
    batch_size = args.batch_size
    batch = {
        "sample_id": np.arange(batch_size, dtype=np.int64),
        "prompt": np.asarray([""] * batch_size, dtype=object),
        "prompt_embeds": embeds.float().cpu().numpy(),
        "latents_real": np.zeros((batch_size, *latent_shape), dtype=np.float32),
    }
    return lambda: generator(batch)["latents_syn"]


def summarize(args: argparse.Namespace, components: SDComponents, device: torch.device, dtype: torch.dtype,
              timings: Timings) -> dict[str, object]:
    """Images/s (from the median time), speed-ups over stock (> 1: faster; from the median wall
    time, the best wall times, and the median CPU times), MFU and agreement with stock, as one
    JSON-ready record."""
    seconds, outputs = timings.median, timings.outputs
    unet = components.unet
    side = int(unet.config.sample_size)
    forward_flops = model_flops_per_forward(unet, (1, int(unet.config.in_channels), side, side),
                                            (1, 77, int(unet.config.cross_attention_dim)))
    flops_per_image = generation_flops_per_image(forward_flops, args.steps, args.guidance_scale)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16_flops() if device.type == "cuda" else None)
    images_per_s = {name: args.batch_size / s for name, s in seconds.items()}
    latent_names = [name for name in images_per_s if name in LATENT_VARIANTS]
    return {
        "bench": "generation", "size": args.size, "batch_size": args.batch_size, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "dtype": str(dtype).removeprefix("torch."),
        "channels_last": resolve_channels_last(args.channels_last, device), "compile": args.compile, "repeats": args.repeats,
        "machine": machine(device),
        "seconds_per_batch": seconds,
        "best_seconds_per_batch": timings.best,
        "best_ratio_vs_stock_latent": {name: ratio(timings.best[STOCK], s) for name, s in timings.best.items()},
        "cpu_seconds_per_batch": timings.cpu_median,
        "cpu_ratio_vs_stock_latent": {name: ratio(timings.cpu_median[STOCK], s)
                                           for name, s in timings.cpu_median.items()},
        "images_per_s": images_per_s,
        "ratio_vs_stock_latent": {name: ratio(v, images_per_s[STOCK]) for name, v in images_per_s.items()},
        "ratio_vs_stock_decode": {name: ratio(v, images_per_s.get("stock_decode")) for name, v in images_per_s.items()},
        "tflop_per_forward": forward_flops / 1e12,
        "tflop_per_image": flops_per_image / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": {name: mfu(flops_per_image * args.batch_size, seconds[name], peak) if peak else None
                for name in latent_names},
        "max_abs_diff_vs_stock": {name: _max_abs_diff(outputs[name], outputs[STOCK])
                                  for name in ("ours", "ours_fast", "ours_compiled") if name in outputs},
    }


def _max_abs_diff(ours: object, stock: object) -> float:
    a, b = torch.as_tensor(ours).float().cpu(), torch.as_tensor(stock).float().cpu()
    return float((a - b).abs().max())


def print_report(record: dict[str, object]) -> None:
    images_per_s = record["images_per_s"]
    rows = [[name, record["seconds_per_batch"][name], value, record["ratio_vs_stock_latent"][name],
             record["best_ratio_vs_stock_latent"][name], record["cpu_ratio_vs_stock_latent"][name],
             record["mfu"].get(name), record["max_abs_diff_vs_stock"].get(name)]
            for name, value in images_per_s.items()]
    title = (f"generation: {record['size']}, batch {record['batch_size']}, {record['steps']} DDIM steps, "
             f"guidance {record['guidance_scale']}, {record['dtype']} on {record['machine']['device']} "
             f"({record['tflop_per_forward']:.4g} TFLOP per UNet sample forward)")
    print_table(title, ["variant", "s/batch", "images/s", "vs stock_latent", "best vs best", "CPU-time vs",
                        "MFU", "max|diff| vs stock"], rows)


if __name__ == "__main__":
    main()
