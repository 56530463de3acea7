"""The stages of self-play, each a function that leaves its result in the run directory.

prepare (encode the real data once) -> generate (theta_k's opponents, cached) -> train (a
SPIN iteration, the SFT baseline or a sweep trial: :func:`run_stage`) -> publish (the trained
UNet as a full diffusers model). :mod:`spin_ray.self_play` loops over them; the sweep
(:mod:`spin_ray.sweep`) calls them for its trials. Every stage writes a DONE marker last, so
a rerun skips what is done (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spin_ray.config import Config, DataConfig, dump_config, per_iteration
from spin_ray.rundir import RunDir


def say_reused(rel: str, model: str) -> None:
    # A rerun skips finished stages; saying so tells a resume from a run that did nothing.
    print(f"[{rel}] already trained in an earlier run: model already published, reusing {model}", flush=True)


# ----------------------------------------------------------------------------- inputs


def resolve_base_model(cfg: Config, rundir: RunDir) -> str:
    """theta_0 as a local diffusers directory (builds the toy base model when asked)."""
    if cfg.model.pretrained == "toy":
        from spin_ray.toy.base_model import ensure_toy_base_model

        return str(ensure_toy_base_model(resolution=cfg.model.resolution))
    path = Path(cfg.model.pretrained).expanduser()
    if path.is_dir():
        return str(path)
    from spin_ray.diffusion import download_pipeline

    return download_pipeline(cfg.model.pretrained, revision=cfg.model.revision,
                             local_files_only=cfg.model.local_files_only)


def resolve_data(cfg: Config, rundir: RunDir) -> DataConfig:
    """The SFT data config; the toy world writes its Pick-a-Pic-style parquet on first use."""
    if cfg.data.path:
        return cfg.data
    from spin_ray.toy.world import write_pickapic_parquet

    rel = rundir.TOY_DATA
    if not rundir.exists(rel):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "train.parquet"
            write_pickapic_parquet(local, n_rows=TOY_TRAIN_ROWS, seed=cfg.seed, resolution=cfg.model.resolution)
            rundir.upload_file(str(local), rel)
    from dataclasses import replace

    return replace(cfg.data, path=rundir.path(rel), format="pickapic")


TOY_TRAIN_ROWS = 1024
"""Real rows of the toy world: an iteration of the default (70 x 32 samples) sees each about twice."""


@dataclass(frozen=True)
class Prepared:
    """The cached real table: where it is and how many rows it has."""

    path: str
    n_rows: int


def ensure_prepared(cfg: Config, rundir: RunDir, base_model: str) -> Prepared:
    """Encode the SFT data once per run (Ray Data: reader -> VAE/text-encoder actors)."""
    if rundir.is_done(rundir.PREPARED):
        info = rundir.read_done(rundir.PREPARED)
        path = rundir.path(rundir.prepared_data())
        print(f"[prepare] already done in an earlier run: reusing its {info['n_rows']} encoded real rows "
              f"in {path}", flush=True)
        return Prepared(path=path, n_rows=int(info["n_rows"]))
    from spin_ray.data import read_sft_dataset
    from spin_ray.prepare import EncoderSpec, prepare_real_table

    rundir.remove_incomplete(rundir.PREPARED)
    started = time.time()
    data_cfg = resolve_data(cfg, rundir)
    rows, stats = read_sft_dataset(data_cfg)
    table = prepare_real_table(
        rows, EncoderSpec(model_path=base_model, resolution=cfg.model.resolution),
        batch_size=cfg.data.prepare_batch_size, num_actors=cfg.data.prepare_num_actors,
        gpus_per_actor=cfg.data.prepare_gpus_per_actor, resources=_label(cfg.cluster.generation_node_label),
    )
    path = rundir.path(rundir.prepared_data())
    table.write_parquet(path)
    n_rows = _count_rows(path)
    info = {"n_rows": n_rows, "seconds": time.time() - started, "data": data_cfg.path, **stats.as_dict()}
    rundir.mark_done(rundir.PREPARED, info)
    print(f"prepared {n_rows} real rows in {info['seconds']:.1f}s -> {path}", flush=True)
    return Prepared(path=path, n_rows=n_rows)


def _count_rows(path: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet").count_rows()


def _label(name: str | None) -> dict[str, float] | None:
    # A tiny share of a node type's custom resource pins work to that node type.
    return {name: 0.001} if name else None


# ----------------------------------------------------------------------------- one stage


def samples_per_iteration(cfg: Config, iteration: int, steps: int | None = None) -> int:
    """Samples one iteration trains on: steps x batch x accumulation x workers (``steps``:
    the iteration's ``train.steps`` unless given)."""
    t = cfg.train
    steps = int(per_iteration(t.steps, iteration)) if steps is None else steps
    return steps * t.batch_size * t.gradient_accumulation_steps * t.num_workers


def sft_baseline_steps(cfg: Config) -> int:
    """The SFT baseline's steps: all SPIN iterations' steps together, so it trains on as many
    real samples as the whole self-play run (a fair comparison of the two uses of the data)."""
    return sum(int(per_iteration(cfg.train.steps, k)) for k in range(1, cfg.self_play.iterations + 1))


def run_sft_baseline(cfg: Config, rundir: RunDir, *, base_model: str, prepared: Prepared) -> str:
    """Train (or reuse) the SFT baseline from theta_0 with iteration 1's learning rate and
    :func:`sft_baseline_steps` steps; returns its model directory."""
    return run_stage(cfg, rundir, rundir.baseline("sft"), model_path=base_model, base_model=base_model, prepared=prepared,
                     iteration=1, loss_type="sft", steps=sft_baseline_steps(cfg))


def opponent_pairs(cfg: Config, rundir: RunDir, opponents_rel: str, *, model_path: str, prepared: Prepared,
                   iteration: int, n_samples: int):
    """The lazy dataset of (real, synthetic) pairs: theta_k (``model_path``) plays the opponent."""
    from spin_ray.opponents import cached_files
    from spin_ray.pairs import sample_table, spin_pairs

    spec = _generator_spec(cfg, rundir, opponents_rel, model_path, iteration)
    cached = cached_files(spec.opponents_dir)  # listed once, for the line below and for spin_pairs
    _say_cached_opponents(opponents_rel, cached, n_samples, cfg.generation.batch_size)
    return spin_pairs(sample_table(prepared.path, prepared.n_rows, n_samples), spec,
                      n_samples=n_samples, batch_size=cfg.generation.batch_size, num_actors=cfg.generation.num_actors,
                      gpus_per_actor=cfg.generation.gpus_per_actor,
                      resources=_label(cfg.cluster.generation_node_label), cached=cached)


def _say_cached_opponents(opponents_rel: str, cached, n_samples: int, batch_size: int) -> None:
    """One line when opponents are already on disk (a rerun, or trials sharing a generation)."""
    files, ids = cached
    if not files:
        return
    batches = math.ceil(n_samples / batch_size)
    reused = min(len(ids), n_samples)  # a cache made for more steps holds more than this stage reads
    rest = "nothing left to generate" if reused >= n_samples else f"generating the other {n_samples - reused}"
    print(f"[{opponents_rel}] {min(len(files), batches)} of {batches} opponent batches ({reused} of {n_samples} "
          f"samples) already on disk, reused; {rest}", flush=True)


def generate_opponents(cfg: Config, rundir: RunDir, opponents_rel: str, *, model_path: str,
                       prepared: Prepared, iteration: int, n_samples: int) -> None:
    """Generate (and cache in ``opponents_rel``) the opponents without training, so several
    trainings (e.g. Tune trials of one iteration) can share them."""
    pairs = opponent_pairs(cfg, rundir, opponents_rel, model_path=model_path, prepared=prepared,
                           iteration=iteration, n_samples=n_samples)
    for _ in pairs.iter_batches(batch_size=None):
        pass


def run_stage(cfg: Config, rundir: RunDir, rel: str, *, model_path: str, base_model: str,
              prepared: Prepared, iteration: int, loss_type: str, opponents_rel: str | None = None,
              steps: int | None = None) -> str:
    """Train one model (a SPIN iteration or the SFT baseline); returns its model directory.

    Opponents are cached in ``opponents_rel`` (default ``<rel>/opponents``); pass a shared
    folder to let several trainings of the same iteration reuse one generation. ``steps``
    replaces the iteration's ``train.steps`` (the SFT baseline trains for all iterations').
    """
    model_rel = rundir.stage_model(rel)
    if rundir.is_done(rel):
        say_reused(rel, rundir.path(model_rel))
        return rundir.local_copy(model_rel)
    from spin_ray.trainer import checkpoint_history

    started = time.time()
    plan = train_plan(cfg, model_path, iteration, loss_type, steps)
    n_samples = samples_per_iteration(cfg, iteration, plan.steps)
    opponents = None if loss_type == "sft" else (opponents_rel or rundir.stage_opponents(rel))
    objective = loss_type if loss_type == "sft" else f"{loss_type}, beta={plan.beta}"  # SFT has no beta
    print(f"[{rel}] training {plan.steps} steps on {n_samples} samples{_repeat_note(prepared.n_rows, n_samples)} "
          f"({objective}, lr={plan.lr}) against {model_path}", flush=True)
    result = _train(cfg, rundir, rel, plan, prepared=prepared, opponents=opponents, model_path=model_path,
                    iteration=iteration, n_samples=n_samples)
    history = checkpoint_history(result.checkpoint)
    if rundir.is_done(model_rel):  # an earlier run died between publishing the model and marking the stage done
        print(f"[{rel}] model already published at {rundir.path(model_rel)} by an earlier run; keeping it",
              flush=True)
    else:
        _publish_model(result.checkpoint, base_model, rundir, model_rel)
    rundir.write_text_atomic(rundir.stage_config(rel), dump_config(cfg))
    rundir.write_json_atomic(rundir.stage_metrics(rel), {
        "iteration": iteration, "loss_type": loss_type, "opponent": model_path, "beta": plan.beta,
        "lr": plan.lr, "steps": plan.steps, "n_samples": n_samples, "seconds": time.time() - started,
        "history": history,
    })
    rundir.mark_done(rel, {"seconds": time.time() - started, "steps": plan.steps})
    return rundir.local_copy(model_rel)


def _train(cfg: Config, rundir: RunDir, rel: str, plan, *, prepared: Prepared, opponents: str | None,
           model_path: str, iteration: int, n_samples: int):
    """Ray Train on the stage's samples (SFT rows, or pairs against ``model_path``'s opponents
    cached in ``opponents``), with its live progress on the console; the ``ray.train.Result``."""
    from spin_ray.pairs import sample_table, sft_samples
    from spin_ray.progress import StageProgress
    from spin_ray.trainer import fit

    if opponents is None:
        samples = sample_table(prepared.path, prepared.n_rows, n_samples)
        dataset = sft_samples(samples, run_seed=cfg.seed, iteration=iteration)
    else:
        dataset = opponent_pairs(cfg, rundir, opponents, model_path=model_path, prepared=prepared,
                                 iteration=iteration, n_samples=n_samples)
    name, storage_path = rel.replace("/", "_"), _storage_path(rundir, rel)
    _say_if_resuming(rel, storage_path, name, plan.steps)
    with StageProgress(rundir, rel, steps=plan.steps, samples_per_step=n_samples // max(plan.steps, 1),
                       opponents_rel=opponents, n_samples=n_samples, opponent_batch=cfg.generation.batch_size):
        return fit(plan, dataset, name=name, storage_path=storage_path,
                   num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                   resources_per_worker=_worker_resources(cfg), max_failures=cfg.train.max_failures,
                   progress=rundir.path(rundir.stage_progress(rel)))


def _repeat_note(n_rows: int, n_samples: int) -> str:
    """``, 8 real rows repeated 20 times`` when a stage needs more samples than the data has rows
    (:func:`spin_ray.pairs.sample_table` repeats them), else nothing."""
    if n_samples <= n_rows or n_rows < 1:
        return ""
    times = n_samples / n_rows
    count = f"{times:.0f}" if times.is_integer() else f"about {times:.1f}"
    return f", {n_rows} real rows repeated {count} times"


def _say_if_resuming(rel: str, storage_path: str, name: str, steps: int) -> None:
    from spin_ray.trainer import checkpoint_step

    step = checkpoint_step(storage_path, name)
    if step is not None:
        print(f"[{rel}] training resumes from its Ray Train checkpoint at step {step} of {steps}", flush=True)


def train_plan(cfg: Config, model_path: str, iteration: int, loss_type: str, steps: int | None = None):
    from spin_ray.trainer import TrainPlan

    t = cfg.train
    steps = int(per_iteration(t.steps, iteration)) if steps is None else steps
    return TrainPlan(
        init_model_path=model_path, loss_type=loss_type, online_reference=cfg.loss.reference == "online",
        beta=float(per_iteration(cfg.loss.beta, iteration)), lr=float(per_iteration(t.lr, iteration)),
        steps=steps, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule, max_grad_norm=t.max_grad_norm,
        mixed_precision=t.mixed_precision, gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_every=t.checkpoint_every, log_every=t.log_every, max_nonfinite_steps=t.max_nonfinite_steps,
        shared_noise=cfg.loss.shared_noise, timestep_weighting=cfg.loss.timestep_weighting,
        seed=cfg.seed + 1000 * iteration, compile=t.compile,
    )


def _generator_spec(cfg: Config, rundir: RunDir, opponents_rel: str, model_path: str, iteration: int):
    from spin_ray.generation import GeneratorSpec

    g = cfg.generation
    return GeneratorSpec(
        model_path=model_path, iteration=iteration, run_seed=cfg.seed,
        num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale, eta=g.eta,
        precompute_reference=cfg.loss.reference == "precomputed", shared_noise=cfg.loss.shared_noise,
        opponents_dir=rundir.path(opponents_rel), mixed_precision=cfg.train.mixed_precision,
        compile=g.compile,
    )


def _worker_resources(cfg: Config) -> dict[str, float]:
    resources = {"CPU": 1.0}
    resources.update(_label(cfg.cluster.train_node_label) or {})
    return resources


def _storage_path(rundir: RunDir, rel: str) -> str:
    path = rundir.path(rundir.stage_train(rel))
    return path if "://" in path else os.path.abspath(path)


def _publish_model(checkpoint, base_model: str, rundir: RunDir, model_rel: str) -> None:
    """theta_{k+1} as a full diffusers pipeline: the base's frozen parts + the trained UNet."""
    from spin_ray.diffusion import load_components, load_unet, save_pipeline

    components = load_components(base_model, local_files_only=True)
    with checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory() as tmp:
        unet = load_unet(str(Path(ckpt) / "unet"), subfolder=None, local_files_only=True)
        save_pipeline(components, tmp, unet=unet)
        rundir.publish_dir(tmp, model_rel)
