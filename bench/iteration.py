"""One whole self-play iteration on the tiny model: the streaming Ray pipeline against two baselines.

- ``streaming``: :func:`spin_ray.self_play.run` with one iteration: Ray Data generation actors
  stream (real, synthetic) pairs into the Ray Train TorchTrainer (stage time; the prepared
  real table is built once beforehand and shared by all variants);
- ``plain``: one process, no Ray: the same generation (``OpponentGenerator`` on numpy batches,
  opponents written to parquet), the same training loop (:func:`spin_ray.train_loop.run_steps`
  with the streaming run's plan: ``spin_batch_loss``, AdamW, warm-up/decay, accumulation,
  clipping, non-finite steps) and the same model save;
- ``two_phase``: :func:`spin_ray.stages.generate_opponents` for every sample first, then
  :func:`spin_ray.stages.run_stage` training on the cached opponents.

CPU and tiny model only (on one GPU the actors and the trainer could not both hold a whole
GPU; the GPU-cluster picture is the scaling model in docs/PERFORMANCE.md). Torch threads: Ray
runs the generation actor and the training worker with one thread each (``OMP_NUM_THREADS=1``),
concurrently; the plain loop also uses one thread by default (``--threads``), so each process
computes alike and the streaming pipeline's overlap of generation with training shows. Takes
minutes; prints a table, then one JSON line.

Run: ``python -m bench.iteration`` (see ``--help`` for the workload size).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import (
    check_positive,
    emit_json,
    machine,
    print_table,
    ratio,
    set_threads,
    tiny_pipeline_dir,
)
from spin_ray.config import Config, with_overrides
from spin_ray.diffusion import load_components, save_pipeline
from spin_ray.generation import GeneratorSpec, OpponentGenerator
from spin_ray.pair_schema import PAIR_COLUMNS
from spin_ray.pairs import data_order, stretch_sample_ids
from spin_ray.rundir import RunDir
from spin_ray.train_loop import Optimization, StepRunner, TrainState, load_models, run_steps

VARIANTS = ("plain", "streaming", "two_phase")
RESOLUTION = 128  # the tiny pipeline: 16x16 latents, images 8x larger
ITERATION = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=32, help="optimizer steps in the iteration")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step and per generation batch")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per opponent image")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of toy SFT data (default: enough for one row per sample, as when the data set "
                             "is larger than an iteration (the toy data drops ~5%% ties); fewer rows are repeated, "
                             "and each repeat reads the prepared table again)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (the plain loop); Ray's workers use 1 (0: torch's default)")
    parser.add_argument("--workdir", default=None, help="run directories go here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = math.ceil(1.1 * args.train_steps * args.batch_size) + 4
    check_positive(args, "train_steps", "batch_size", "steps", "rows")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    return args


def bench_config(args: argparse.Namespace, workdir: Path, model_dir: Path, data_path: Path) -> Config:
    """One SPIN iteration on the tiny pipeline, one generation actor, one training worker."""
    return with_overrides(Config(), {
        "run_dir": str(workdir / "run"), "seed": 0,
        "model.pretrained": str(model_dir), "model.resolution": RESOLUTION, "model.local_files_only": True,
        "data.path": str(data_path), "data.format": "pickapic", "data.prepare_batch_size": 8,
        "generation.num_inference_steps": args.steps, "generation.guidance_scale": args.guidance_scale,
        "generation.batch_size": args.batch_size, "generation.num_actors": 1,
        "train.steps": args.train_steps, "train.batch_size": args.batch_size, "train.warmup_steps": 0,
        "train.num_workers": 1, "train.log_every": args.train_steps, "train.checkpoint_every": 0,
        "train.lr": 1e-5, "self_play.iterations": 1, "eval.enabled": False,
    })


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark; returns the record it printed as its last line."""
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        seconds = run_variants(args, workdir)
    n_samples = args.train_steps * args.batch_size
    record = {
        "bench": "iteration", "size": "tiny", "samples": n_samples, "train_steps": args.train_steps,
        "batch_size": args.batch_size, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "machine": machine(torch.device("cpu")), "seconds": seconds,
        "ratio_vs_plain": {v: ratio(seconds.get(v), seconds.get("plain")) for v in args.variants},
    }
    print_report(record, args.variants)
    return emit_json(record)


def run_variants(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Start Ray, prepare the real table once, then time each variant in turn."""
    from spin_ray.ray_session import ensure_ray
    from spin_ray.stages import ensure_prepared
    from spin_ray.toy.world import write_pickapic_parquet

    model_dir = tiny_pipeline_dir(workdir)
    data_path = write_pickapic_parquet(workdir / "data" / "train.parquet", n_rows=args.rows, seed=1,
                                       resolution=RESOLUTION)
    cfg = bench_config(args, workdir, model_dir, data_path)
    rundir = RunDir(cfg.run_dir)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    started_ray = ensure_ray(cfg.cluster.address)
    seconds["ray_init"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        prepared = ensure_prepared(cfg, rundir, str(model_dir))
        seconds["prepare"] = time.perf_counter() - started
        for variant in args.variants:
            seconds.update(VARIANT_RUNNERS[variant](cfg, rundir, prepared, str(model_dir)))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return seconds


# ----------------------------------------------------------------------------- the variants


def run_streaming(cfg: Config, rundir: RunDir, prepared, model_dir: str) -> dict[str, float]:
    """The iteration's stage time, and where it went: until the trainer got its first batch
    of pairs (start-up: the TorchTrainer's worker group, then the generation actor), training
    while generation streams, and from the last step to the published model."""
    from spin_ray.self_play import run

    started, started_unix = time.perf_counter(), time.time()
    result = run(cfg)
    seconds = {"streaming": result.timings[rundir.iteration(ITERATION)], "streaming_with_driver": time.perf_counter() - started}
    history = rundir.read_json(rundir.stage_metrics(rundir.iteration(ITERATION))).get("history") or []
    if history:
        first_batch, last_step = history[-1]["first_batch_time"], history[-1]["time"]
        seconds["streaming_until_first_batch"] = first_batch - started_unix
        seconds["streaming_overlapped"] = last_step - first_batch
        seconds["streaming_after_last_step"] = started_unix + seconds["streaming_with_driver"] - last_step
    return seconds


def run_two_phase(cfg: Config, rundir: RunDir, prepared, model_dir: str) -> dict[str, float]:
    from spin_ray.stages import generate_opponents, run_stage, samples_per_iteration

    n_samples = samples_per_iteration(cfg, ITERATION)
    started = time.perf_counter()
    generate_opponents(cfg, rundir, rundir.stage_opponents("two_phase"), model_path=model_dir, prepared=prepared,
                       iteration=ITERATION, n_samples=n_samples)
    generated = time.perf_counter()
    run_stage(cfg, rundir, "two_phase", model_path=model_dir, base_model=model_dir, prepared=prepared,
              iteration=ITERATION, loss_type=cfg.loss.type, opponents_rel=rundir.stage_opponents("two_phase"))
    done = time.perf_counter()
    return {"two_phase": done - started, "two_phase_generate": generated - started, "two_phase_train": done - generated}


def run_plain(cfg: Config, rundir: RunDir, prepared, model_dir: str) -> dict[str, float]:
    started = time.perf_counter()
    plain_iteration(cfg, rundir, prepared.path, model_dir)
    return {"plain": time.perf_counter() - started}


VARIANT_RUNNERS = {"plain": run_plain, "streaming": run_streaming, "two_phase": run_two_phase}


def plain_iteration(cfg: Config, rundir: RunDir, prepared_path: str, model_dir: str, out_rel: str = "plain") -> None:
    """The iteration in one process: generate a batch of opponents, train on it, repeat, with
    the trainer's own loop (:func:`spin_ray.train_loop.run_steps`) and the streaming run's plan."""
    from spin_ray.stages import train_plan

    cpu, g = torch.device("cpu"), cfg.generation
    plan = train_plan(cfg, model_dir, ITERATION, "spin")
    generator = OpponentGenerator(GeneratorSpec(
        model_path=model_dir, iteration=ITERATION, run_seed=cfg.seed, num_inference_steps=g.num_inference_steps,
        guidance_scale=g.guidance_scale, eta=g.eta,
        precompute_reference=not plan.online_reference, shared_noise=plan.shared_noise,
        opponents_dir=rundir.path(rundir.stage_opponents(out_rel)), device="cpu", mixed_precision=plan.mixed_precision,
    ))
    unet, ref_unet, scheduler = load_models(plan, cpu)
    optim = Optimization.for_plan(unet, plan)
    n_samples = plan.steps * plan.gradient_accumulation_steps * plan.batch_size
    pairs = (pair_columns(generator(rows))
             for rows in sample_batches(prepared_path, n_samples, plan.batch_size, seed=cfg.seed))
    run_steps(plan, TrainState(), pairs, StepRunner(plan, unet, ref_unet, scheduler, cpu), optim,
              report=lambda metrics, checkpoint: None)  # run_steps prints the metrics; no checkpoints here
    save_pipeline(load_components(model_dir, local_files_only=True), rundir.local_path(rundir.stage_model(out_rel)),
                  unet=unet)


def pair_columns(pairs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A generated batch as the trainer's data shard yields it: the pair columns as tensors."""
    return {name: torch.as_tensor(np.asarray(pairs[name])) for name in PAIR_COLUMNS}


def sample_batches(prepared_path: str, n_samples: int, batch_size: int, *, seed: int):
    """Iteration 1's samples in batches, as :func:`spin_ray.pairs.sample_table` gives them: the
    first ``n_samples`` positions of the data order of ``seed``, ``sample_id = pass << 32 | row_id``."""
    import ray.data  # noqa: F401  (registers the tensor column type the prepared parquet uses)

    table = pq.read_table(prepared_path).sort_by("row_id")
    row_id = table.column("row_id").to_numpy()
    embeds = table.column("prompt_embeds").combine_chunks().to_numpy(zero_copy_only=False)
    latents = table.column("latents_real").combine_chunks().to_numpy(zero_copy_only=False)
    prompts = np.asarray(table.column("prompt").to_pylist(), dtype=object)
    sample_id = stretch_sample_ids(data_order(row_id, seed), 0, n_samples)
    index = np.searchsorted(row_id, sample_id & 0xFFFFFFFF)  # the table is sorted by row_id
    for start in range(0, n_samples, batch_size):
        rows = index[start:start + batch_size]
        yield {"sample_id": sample_id[start:start + batch_size], "row_id": row_id[rows], "prompt": prompts[rows],
               "prompt_embeds": embeds[rows], "latents_real": latents[rows]}


def print_report(record: dict[str, object], variants: list[str]) -> None:
    seconds = record["seconds"]
    rows = [[v, seconds.get(v), record["samples"] / seconds[v] if seconds.get(v) else None,
             record["ratio_vs_plain"].get(v)] for v in variants]
    title = (f"one iteration, tiny model: {record['samples']} samples ({record['train_steps']} steps x "
             f"{record['batch_size']}), {record['steps']} DDIM steps, guidance {record['guidance_scale']}; "
             f"Ray start {seconds['ray_init']:.1f}s and prepare {seconds['prepare']:.1f}s not included")
    print_table(title, ["variant", "seconds", "samples/s", "time vs plain"], rows)
    if "streaming_overlapped" in seconds:
        print(f"streaming: {seconds['streaming_until_first_batch']:.1f}s until the trainer's first batch, "
              f"{seconds['streaming_overlapped']:.1f}s training while generating, "
              f"{seconds['streaming_after_last_step']:.1f}s from the last step to the published model")


if __name__ == "__main__":
    main()
