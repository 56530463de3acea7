"""The stages of self-play, each a function that leaves its result in the run directory.

prepare (encode the real data once) -> generate (theta_k's opponents, cached) -> train (a
SPIN iteration, the SFT baseline or a sweep trial: :func:`run_stage`) -> publish (the trained
UNet as a full diffusers model; with ``train.eval_every`` the best or last of the checkpoints
scored on the selection prompts, :mod:`spin_ray.checkpoint_selection`). :mod:`spin_ray.self_play`
loops over them; the sweep (:mod:`spin_ray.sweep`) calls them for its trials. Every stage writes a DONE marker last, so
a rerun skips what is done (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spin_ray.checkpoint_selection import (
    Selection,
    remove_checkpoints,
    select_and_publish,
    snapshot_checkpoint_every,
    stage_selection,
)
from spin_ray.config import Config, DataConfig, baseline_names, dump_config
from spin_ray.hub_upload import upload_stage_model
from spin_ray.model_card import publish_model_card
from spin_ray.opponent_history import HistoryShare, copy_history, history_sources, opponent_history  # noqa: F401
from spin_ray.rundir import RunDir
from spin_ray.stage_plans import (  # noqa: F401  (the stage library's names, as callers use them)
    baseline_plan,
    generator_spec,
    iteration_offset,
    label_resources,
    peak_lr,
    samples_per_iteration,
    sft_baseline_steps,
    train_plan,
    worker_resources,
)


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
    """Encode the SFT data once per run (Ray Data: reader -> VAE/text-encoder actors).

    With a DPO baseline configured the Pick-a-Pic losers are read and encoded too
    (``latents_lose``); without one they are never read. A table prepared without them is
    prepared again when a DPO baseline is added later (its DONE records ``loser_latents``).
    """
    with_loser = "dpo" in baseline_names(cfg)
    if rundir.is_done(rundir.PREPARED):
        info = rundir.read_done(rundir.PREPARED)
        path = rundir.path(rundir.prepared_data())
        if not with_loser or info.get("loser_latents"):
            print(f"[prepare] already done in an earlier run: reusing its {info['n_rows']} encoded real rows "
                  f"in {path}", flush=True)
            rundir.verify(rundir.PREPARED)  # its checksums, before any stage reads it (once per process)
            return Prepared(path=path, n_rows=int(info["n_rows"]))
        print(f"[prepare] the earlier run encoded no loser images and the dpo baseline needs them: "
              f"preparing {path} again", flush=True)
        rundir.remove(rundir.PREPARED)
    from spin_ray.data import read_sft_dataset
    from spin_ray.prepare import EncoderSpec, prepare_real_table

    rundir.remove_incomplete(rundir.PREPARED)
    started = time.time()
    data_cfg = resolve_data(cfg, rundir)
    rows, stats = read_sft_dataset(data_cfg, with_loser=with_loser)
    table = prepare_real_table(
        rows, EncoderSpec(model_path=base_model, resolution=cfg.model.resolution),
        batch_size=cfg.data.prepare_batch_size, num_actors=cfg.data.prepare_num_actors,
        gpus_per_actor=cfg.data.prepare_gpus_per_actor, resources=label_resources(cfg.cluster.generation_node_label),
    )
    path = rundir.path(rundir.prepared_data())
    table.write_parquet(path)
    n_rows = _count_rows(path)
    info = {"n_rows": n_rows, "seconds": time.time() - started, "data": data_cfg.path, "loser_latents": with_loser,
            **stats.as_dict()}
    rundir.mark_done(rundir.PREPARED, info)
    print(f"prepared {n_rows} real rows in {info['seconds']:.1f}s -> {path}", flush=True)
    return Prepared(path=path, n_rows=n_rows)


def _count_rows(path: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet").count_rows()


# ----------------------------------------------------------------------------- one stage


def run_sft_baseline(cfg: Config, rundir: RunDir, *, base_model: str, prepared: Prepared) -> str:
    """Train (or reuse) the SFT baseline (:func:`run_baseline` ``sft``); returns its model directory."""
    return run_baseline(cfg, rundir, "sft", base_model=base_model, prepared=prepared)


def run_baseline(cfg: Config, rundir: RunDir, name: str, *, base_model: str, prepared: Prepared) -> str:
    """Train (or reuse) baseline ``name`` (``sft`` or ``dpo``) from theta_0 into the stage
    ``baseline_<name>/`` (DONE, a diffusers model, metrics.json) through :func:`run_stage`, with
    the schedule of :func:`baseline_plan`; returns its model directory.

    ``sft`` minimises the denoising error on the real images; ``dpo`` is Diffusion-DPO on the
    data's (winner, loser) pairs (:func:`spin_ray.pairs.dpo_pairs`) against theta_0 as its fixed
    reference, the same trainer and loss module as SPIN. Both draw iteration 1's noise seeds.
    """
    return run_stage(cfg, rundir, rundir.baseline(name), model_path=base_model, base_model=base_model,
                     prepared=prepared, iteration=1, loss_type=name, plan=baseline_plan(cfg, name, base_model),
                     offset=0, selection=stage_selection(cfg, name))


# ----------------------------------------------------------------------------- opponent history


def opponent_pairs(cfg: Config, rundir: RunDir, opponents_rel: str, *, model_path: str, prepared: Prepared,
                   iteration: int, n_samples: int, offset: int | None = None,
                   history: list[HistoryShare] | None = None):
    """The lazy dataset of (real, synthetic) pairs: theta_k (``model_path``) plays the opponent,
    on the data order's positions ``offset ..`` (default :func:`iteration_offset`). ``history``
    (:func:`opponent_history`): earlier iterations' opponents, copied into ``opponents_rel``
    first (:func:`copy_history`); the generator then makes only the rest of the ``n_samples``."""
    from spin_ray.opponents import cached_files
    from spin_ray.pairs import in_stretch_order, sample_table, spin_pairs

    n_new = n_samples
    if history:
        copy_history(cfg, rundir, opponents_rel, history, model_path=model_path, iteration=iteration)
        n_new = n_samples - sum(len(share.sample_ids) for share in history)
    spec = generator_spec(cfg, rundir, opponents_rel, model_path, iteration)
    cached = cached_files(spec.opponents_dir)  # listed once, for the line below and for spin_pairs
    _say_cached_opponents(opponents_rel, cached, n_samples, cfg.generation.batch_size)
    offset = iteration_offset(cfg, iteration) if offset is None else offset
    if cached[0]:
        cached = (in_stretch_order(cached[0], prepared.path, seed=cfg.seed, offset=offset, n_samples=n_new),
                  cached[1])
    samples = sample_table(prepared.path, prepared.n_rows, n_new, seed=cfg.seed, offset=offset)
    return spin_pairs(samples, spec,
                      n_samples=n_samples, batch_size=cfg.generation.batch_size, num_actors=cfg.generation.num_actors,
                      gpus_per_actor=cfg.generation.gpus_per_actor,
                      resources=label_resources(cfg.cluster.generation_node_label), cached=cached)


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
                       prepared: Prepared, iteration: int, n_samples: int, offset: int | None = None) -> None:
    """Generate (and cache in ``opponents_rel``) the opponents without training, so several
    trainings (e.g. Tune trials of one iteration) can share them."""
    pairs = opponent_pairs(cfg, rundir, opponents_rel, model_path=model_path, prepared=prepared,
                           iteration=iteration, n_samples=n_samples, offset=offset)
    for _ in pairs.iter_batches(batch_size=None):
        pass


def run_stage(cfg: Config, rundir: RunDir, rel: str, *, model_path: str, base_model: str,
              prepared: Prepared, iteration: int, loss_type: str, opponents_rel: str | None = None,
              steps: int | None = None, plan=None, offset: int | None = None, init_model: str | None = None,
              history: int = 1, selection: Selection | None = None) -> str:
    """Train one model (a SPIN iteration or a baseline); returns its model directory.

    ``model_path`` plays the opponent (and is the reference); theta starts from ``init_model``
    (default ``model_path``; ``self_play.opponent: initial`` passes theta_{k-1} here and theta_0
    as the opponent). ``history`` > 1 mixes the cached opponents of earlier iterations in
    (:func:`opponent_history`, ``self_play.opponent_history``).

    Opponents are cached in ``opponents_rel`` (default ``<rel>/opponents``); pass a shared
    folder to let several trainings of the same iteration reuse one generation. ``steps``
    replaces the iteration's ``train.steps``; ``plan`` replaces the whole schedule (a
    baseline's, :func:`baseline_plan`). The ``sft`` and ``dpo`` losses generate no opponents.
    The stage trains on the data order's positions ``offset ..`` (default
    :func:`iteration_offset`; a baseline passes 0), recorded in its metrics.json (``data_order``).

    ``selection`` (default ``train.eval_every`` / ``train.keep``): with ``eval_every`` > 0 the
    stage scores checkpoints on the selection prompts after training and publishes the best
    or the last (:mod:`spin_ray.checkpoint_selection`); metrics.json's ``selection`` and DONE's
    ``published_step`` say which.
    """
    model_rel = rundir.stage_model(rel)
    if rundir.is_done(rel):
        say_reused(rel, rundir.path(model_rel))
        remove_checkpoints(rundir, rel)  # an earlier run died between DONE and deleting them
        return rundir.local_copy(model_rel)
    from spin_ray.pairs import describe_stretch

    selection = selection or stage_selection(cfg)
    started = time.time()
    plan = plan or train_plan(cfg, init_model or model_path, iteration, loss_type, steps)
    if init_model is not None and init_model != model_path and plan.online_reference:
        from dataclasses import replace

        plan = replace(plan, reference_model_path=model_path)  # the online reference is the opponent
    n_samples = plan.steps * plan.batch_size * plan.gradient_accumulation_steps * cfg.train.num_workers
    offset = iteration_offset(cfg, iteration) if offset is None else offset
    peak = peak_lr(plan.lr, plan.warmup_steps, plan.steps)
    opponents = None if loss_type in ("sft", "dpo") else (opponents_rel or rundir.stage_opponents(rel))
    mixed = opponent_history(cfg, rundir, iteration, n_samples, history)[1] if opponents and history > 1 else []
    objective = loss_type if loss_type == "sft" else f"{loss_type}, beta={plan.beta}"  # SFT has no beta
    print(f"[{rel}] training {plan.steps} steps on {n_samples} samples{_repeat_note(prepared.n_rows, n_samples)} "
          f"({objective}, lr={plan.lr}) against {model_path}", flush=True)
    if peak < plan.lr:
        print(f"[{rel}] warm-up of {plan.warmup_steps} steps is longer than the {plan.steps} steps trained: "
              f"the learning rate peaks at {peak:.3g}, not {plan.lr:g}", flush=True)
    history, chosen = _train_and_publish(cfg, rundir, rel, plan, selection, base_model=base_model, prepared=prepared,
                                         opponents=opponents, model_path=model_path, iteration=iteration,
                                         n_samples=n_samples, offset=offset, history=mixed)
    rundir.write_text_atomic(rundir.stage_config(rel), dump_config(cfg))
    rundir.write_json_atomic(rundir.stage_metrics(rel), {
        "iteration": iteration, "loss_type": loss_type, "opponent": model_path, "beta": plan.beta,
        "init_model": plan.init_model_path,
        "opponent_history": [{"iteration": share.iteration, "samples": len(share.sample_ids)} for share in mixed],
        "lr": plan.lr, "peak_lr": peak, "warmup_steps": plan.warmup_steps, "steps": plan.steps,
        "n_samples": n_samples,
        "data_order": describe_stretch(prepared.n_rows, offset, n_samples - sum(len(m.sample_ids) for m in mixed)),
        "seconds": time.time() - started,
        "first_logit_abs": next((h["first_logit_abs"] for h in history if "first_logit_abs" in h), None),
        "history": history, "selection": chosen,
    })
    publish_model_card(cfg, rundir, rel)  # after the model's DONE: the card is not in its checksums
    upload_stage_model(cfg, rundir, rel)
    rundir.mark_done(rel, {"seconds": time.time() - started, "steps": plan.steps,
                           "published_step": chosen["published_step"] if chosen else plan.steps})
    remove_checkpoints(rundir, rel)
    return rundir.local_copy(model_rel)


def _train_and_publish(cfg: Config, rundir: RunDir, rel: str, plan, selection: Selection, *, base_model: str,
                       **train_args) -> tuple[list[dict], dict | None]:
    """Train the stage and publish its model: the last checkpoint, or with
    ``selection.eval_every`` the one :func:`spin_ray.checkpoint_selection.select_and_publish`
    chooses among the scored ones. Returns the training history and the selection record (None
    without ``eval_every``)."""
    from dataclasses import replace

    from spin_ray.trainer import Snapshots, checkpoint_history

    snapshots = None
    if selection.eval_every > 0:  # the loop hands over theta at every scored step
        ray_every = plan.checkpoint_every  # Ray Train's checkpoints (for resuming) stay where they were
        plan = replace(plan, checkpoint_every=snapshot_checkpoint_every(selection.eval_every, ray_every))
        snapshots = Snapshots(rundir, rel, selection.eval_every, ray_every)
    result = _train(cfg, rundir, rel, plan, snapshots=snapshots, **train_args)
    history = checkpoint_history(result.checkpoint)
    model_rel = rundir.stage_model(rel)
    if snapshots is not None:
        return history, select_and_publish(cfg, rundir, rel, selection, steps=plan.steps, history=history)
    if rundir.is_done(model_rel):  # an earlier run died between publishing the model and marking the stage done
        print(f"[{rel}] model already published at {rundir.path(model_rel)} by an earlier run; keeping it",
              flush=True)
    else:
        _publish_model(result.checkpoint, base_model, rundir, model_rel)
    return history, None


def _train(cfg: Config, rundir: RunDir, rel: str, plan, *, prepared: Prepared, opponents: str | None,
           model_path: str, iteration: int, n_samples: int, offset: int, history: list[HistoryShare] | None = None,
           snapshots=None):
    """Ray Train on the stage's samples (SFT rows, or pairs against ``model_path``'s opponents
    cached in ``opponents``) at positions ``offset ..`` of the data order
    (:func:`spin_ray.pairs.sample_table`), with its live progress on the console; the
    ``ray.train.Result``."""
    from spin_ray.pairs import dpo_pairs, sample_table, sft_samples
    from spin_ray.progress import StageProgress
    from spin_ray.trainer import fit

    if opponents is None:
        samples = sample_table(prepared.path, prepared.n_rows, n_samples, seed=cfg.seed, offset=offset)
        make = dpo_pairs if plan.loss_type == "dpo" else sft_samples  # DPO: (winner, loser) pair rows
        dataset = make(samples, run_seed=cfg.seed, iteration=iteration)
    else:
        dataset = opponent_pairs(cfg, rundir, opponents, model_path=model_path, prepared=prepared,
                                 iteration=iteration, n_samples=n_samples, offset=offset, history=history)
    name, storage_path = rel.replace("/", "_"), _storage_path(rundir, rel)
    _say_if_resuming(rel, storage_path, name, plan.steps)
    with StageProgress(rundir, rel, steps=plan.steps, samples_per_step=n_samples // max(plan.steps, 1),
                       opponents_rel=opponents, n_samples=n_samples, opponent_batch=cfg.generation.batch_size):
        return fit(plan, dataset, name=name, storage_path=storage_path,
                   num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                   resources_per_worker=worker_resources(cfg), max_failures=cfg.train.max_failures,
                   progress=rundir.path(rundir.stage_progress(rel)), snapshots=snapshots)


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
