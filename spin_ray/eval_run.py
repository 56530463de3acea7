"""Evaluation at scale: N images per prompt from every model, every scorer, one report.

The paper's protocol (SPIN-Diffusion, Yuan et al. 2024, Sec. 5): each model generates
``eval.num_images_per_prompt`` images per prompt from the same seeds, every scorer scores
every image, best-of-N picks one image per prompt, and the table reports mean and median
per scorer plus win rates against a baseline model (arithmetic in :mod:`spin_ray.evaluation`).

Per (prompt set, model), one Ray Data pipeline::

    prompt rows (prompt_index, prompt, image_index, seed)
      --map_batches(EvalImageGenerator: the model, DDIM + CFG, VAE decode)--> + image (PNG bytes)
      --map_batches(ScorerActor: every scorer in eval.scorers)--> + one float32 column per scorer
      --> driver: scorer -> (P, N) scores

Layout in the run directory (one prompt set: no ``<set>/`` level)::

    eval/[<set>/]<model>/scores.parquet   one row per image; its PNG kept for the grid's images
    eval/[<set>/]<model>/DONE             written last; holds what the scores depend on
    report/[<set>/]                       metrics.json, report.md, metrics.png, image_grid.png,
                                          <metric>_over_iterations.png (self-play models),
                                          training_curves.png (stages trained in this run dir)

A model's scores are reused while its DONE records the same settings (prompts, seeds,
steps, guidance, resolution, scorers, model version); otherwise they are computed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# torch and diffusers (spin_ray.diffusion) are imported where they are used, and matplotlib
# (spin_ray.report) only by spin_ray.eval_report's functions: every actor process imports this
# module, and a scorer actor needs none of them.
from spin_ray.config import Config, ConfigError, EvalConfig, dump_config
from spin_ray.eval_report import _ITERATION, GRID_PROMPTS, IMAGE_COLUMN, SummaryTable, write_prompt_set_report
from spin_ray.prompts import load_prompts
from spin_ray.rewards import SCORER_NAMES, load_scorer
from spin_ray.rundir import RunDir
from spin_ray.user_cache import user_cache_dir

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
REPORT_DIR = "report"
SCORES_FILE = "scores.parquet"
ROW_COLUMNS = ("prompt_index", "prompt", "image_index", "seed")
DECODE_CHUNK = 4
"""Images per VAE decode call: a 512 px decode of a whole batch would need several GB."""
SEED_TAG = 0x5EED_E7A1
"""Separates the evaluation seeds from the training streams of :func:`spin_ray.generation.derive_seed`."""

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- pure parts


def image_seed(eval_seed: int, prompt_index: int, image_index: int) -> int:
    """The 63-bit seed of image ``image_index`` of prompt ``prompt_index``: the same for every
    model, so the models' images differ only by the model (common random numbers)."""
    entropy = [SEED_TAG, int(eval_seed), int(prompt_index), int(image_index)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def prompt_rows(prompts: Sequence[str], num_images: int, eval_seed: int) -> list[dict[str, Any]]:
    """The pipeline's input: P x N rows ``prompt_index, prompt, image_index, seed``, prompt-major."""
    return [
        {"prompt_index": p, "prompt": prompt, "image_index": i, "seed": image_seed(eval_seed, p, i)}
        for p, prompt in enumerate(prompts)
        for i in range(num_images)
    ]


def prompt_set_paths(prompts: str | list[str]) -> list[str]:
    """``eval.prompts`` (one path or a list) as a non-empty list."""
    paths = [prompts] if isinstance(prompts, str) else list(prompts)
    paths = [p for p in paths if p.strip()]
    if not paths:
        raise ConfigError("eval.prompts: no prompt set given; expected a path (a .txt, .tsv, .json or .parquet file, "
                          "an HPSv2 benchmark directory) or 'toy', or a list of them")
    return paths


def prompt_set_names(paths: Sequence[str]) -> list[str]:
    """A short, unique, file-system-safe name per prompt set (its file stem or directory name)."""
    names: list[str] = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem if path != "toy" else "toy"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "prompts"
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}_{n}", n + 1
        names.append(unique)
    return names


def check_models(models: Mapping[str, str]) -> None:
    """Model names become directory names: letters, digits, ``_.-``; at least one model."""
    if not models:
        raise ConfigError("eval.models: no models to evaluate; set it to name -> diffusers directory or hub id, "
                          "e.g. eval.models='{base: /models/sd15, spin_iter_1: runs/sd15/iter_1/model}'")
    for name, location in models.items():
        if not _MODEL_NAME.match(name):
            raise ConfigError(f"eval.models.{name}: model names may hold letters, digits, '_', '.', '-' only")
        if not location:
            raise ConfigError(f"eval.models.{name}: empty path; expected a diffusers directory or hub id")


def check_eval_config(eval_cfg: EvalConfig) -> None:
    """Fail before any work on what would fail later: no prompt set, no or unknown scorers."""
    prompt_set_paths(eval_cfg.prompts)
    if not eval_cfg.scorers:
        raise ConfigError(f"eval.scorers: no scorers given; expected some of {list(SCORER_NAMES)}")
    unknown = [name for name in eval_cfg.scorers if name not in SCORER_NAMES]
    if unknown:
        raise ConfigError(f"eval.scorers: unknown scorers {unknown}; expected some of {list(SCORER_NAMES)}")


def resolve_model(name: str, location: str) -> str:
    """``eval.models.<name>`` as the actors should get it: a URL or hub id as is, a local
    diffusers directory as an absolute path (Ray workers may run in another directory)."""
    from spin_ray.diffusion import is_hub_id

    if "://" in location or is_hub_id(location):
        return location
    path = Path(location).expanduser()
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"eval.models.{name}: {location} is not a diffusers pipeline directory "
                          "(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return str(path.resolve())


def scorer_kwargs(options: Mapping[str, str], device: str, batch_size: int) -> dict[str, Any]:
    """A scorer's loader keywords: ``device`` and ``batch_size`` defaults, then ``options``
    (``eval.scorer_options.<name>``) with numeric strings as numbers (the config holds strings)."""
    kwargs: dict[str, Any] = {"device": device, "batch_size": batch_size}
    kwargs.update({key: _number_or_text(value) for key, value in options.items()})
    return kwargs


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


# ----------------------------------------------------------------------------- Ray Data actors


@dataclass(frozen=True)
class ImageSpec:
    """What an EvalImageGenerator needs; picklable."""

    model: str
    """Local diffusers directory, hub id, or fsspec URL of a published model directory."""
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    local_files_only: bool = False
    """For a hub id: never download (``model.local_files_only``); local directories never download."""
    device: str = "auto"


class EvalImageGenerator:
    """Ray Data callable class holding one model: prompt rows in, rows + ``image`` (PNG) out.

    Row i is sampled by DDIM with classifier-free guidance from the noise of its ``seed``
    (so it does not depend on the batch) and decoded by the VAE to a
    ``resolution`` x ``resolution`` RGB image. float16 on CUDA, float32 on CPU; the UNet goes
    through the generators' fast path (:func:`spin_ray.fast_path.prepare_unet_for_inference`).
    """

    def __init__(self, spec: ImageSpec):
        import torch

        from spin_ray.diffusion import load_components, pick_device
        from spin_ray.fast_path import prepare_unet_for_inference

        self.spec = spec
        self.device = pick_device(spec.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.components = load_components(_local_model(spec.model), local_files_only=spec.local_files_only,
                                          device=self.device, dtype=dtype)
        prepare_unet_for_inference(self.components.unet, self.device, dtype=dtype)
        self.latent_shape = self.components.latent_shape(spec.resolution)
        with torch.inference_mode():
            self.negative_embeds = self._embed([""])

    def _embed(self, prompts: list[str]):
        """Prompts -> (B, 77, D) text embeddings."""
        from spin_ray.diffusion import encode_prompt_ids, tokenize

        ids = tokenize(self.components.tokenizer, prompts).to(self.device)
        return encode_prompt_ids(self.components.text_encoder, ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from spin_ray.diffusion import decode_latents, sample_latents, to_pil

        prompts = [str(p) for p in batch["prompt"]]
        with torch.inference_mode():
            embeds = self._embed(prompts)
            latents = sample_latents(
                self.components.unet, self.components.scheduler, embeds,
                self.negative_embeds.expand(len(prompts), -1, -1), [int(s) for s in batch["seed"]],
                num_inference_steps=self.spec.num_inference_steps, guidance_scale=self.spec.guidance_scale,
                latent_shape=self.latent_shape,
            )
            images = [image for start in range(0, len(prompts), DECODE_CHUNK)
                      for image in to_pil(decode_latents(self.components.vae, latents[start:start + DECODE_CHUNK]))]
        out = {name: np.asarray(batch[name]) for name in ROW_COLUMNS}
        out["prompt"] = np.asarray(prompts, dtype=object)
        out[IMAGE_COLUMN] = np.asarray([_png(image) for image in images], dtype=object)
        return out


@dataclass(frozen=True)
class ScorerSpec:
    """What a ScorerActor needs; picklable."""

    scorers: tuple[str, ...]
    paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict[str, str]] = field(default_factory=dict)
    batch_size: int = 8
    grid_prompts: int = GRID_PROMPTS
    device: str = "cpu"
    """The scorers' default ``device`` (``cuda`` when the actors get GPUs)."""


class ScorerActor:
    """Ray Data callable class holding every scorer: image rows in, one float32 column per
    scorer out. The PNG bytes are dropped (emptied) except image 0 of the first
    ``grid_prompts`` prompts, which the report's image grid shows."""

    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        self.scorers = {
            name: load_scorer(name, path=spec.paths.get(name),
                              **scorer_kwargs(spec.options.get(name, {}), spec.device, spec.batch_size))
            for name in spec.scorers
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        images = [Image.open(io.BytesIO(bytes(raw))).convert("RGB") for raw in batch[IMAGE_COLUMN]]
        out = {name: np.asarray(batch[name]) for name in ROW_COLUMNS}
        out["prompt"] = np.asarray(prompts, dtype=object)
        for name, scorer in self.scorers.items():
            out[name] = np.asarray(scorer.score(images, prompts), dtype=np.float32).reshape(len(images))
        keep = (np.asarray(batch["image_index"]) == 0) & (np.asarray(batch["prompt_index"]) < self.spec.grid_prompts)
        out[IMAGE_COLUMN] = np.asarray([bytes(raw) if k else b"" for raw, k in zip(batch[IMAGE_COLUMN], keep,
                                                                                     strict=True)], dtype=object)
        return out


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _local_model(model: str) -> str:
    """A model in a run dir on object storage (``s3://.../iter_1/model``) is downloaded on the
    node that loads it: a driver-side copy would not exist on the other nodes. A file lock
    lets the node's first actor download it and the others reuse that copy (concurrent
    downloads would replace the directory while another actor reads it)."""
    if "://" not in model:
        return model
    from filelock import FileLock

    parent, leaf = model.rstrip("/").rsplit("/", 1)
    lock = user_cache_dir("locks") / f"model_{hashlib.sha256(model.encode()).hexdigest()[:16]}.lock"
    with FileLock(str(lock)):
        return RunDir(parent).local_copy(leaf)


def generate_and_score(model: str, prompts: Sequence[str], cfg: Config) -> pa.Table:
    """Run the Ray Data pipeline for one model and one prompt set.

    Returns one row per image (P x N rows, any order): ``prompt_index``, ``prompt``,
    ``image_index``, ``seed``, ``image`` (PNG bytes or empty) and one float32 column per scorer.
    """
    import ray
    import ray.data

    e = cfg.eval
    rows = prompt_rows(prompts, e.num_images_per_prompt, e.seed)
    # One block per batch, so that every actor of the pool gets work.
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / e.batch_size)))
    stage = {
        "compute": ray.data.ActorPoolStrategy(size=e.num_actors),
        "num_gpus": e.gpus_per_actor or None,
        "batch_size": e.batch_size,
        "resources": _label(cfg.cluster.generation_node_label),
    }
    image_spec = ImageSpec(model=model, resolution=cfg.model.resolution, num_inference_steps=e.num_inference_steps,
                           guidance_scale=e.guidance_scale, local_files_only=cfg.model.local_files_only)
    scorer_spec = ScorerSpec(scorers=tuple(e.scorers), paths=dict(e.scorer_paths), options=dict(e.scorer_options),
                             batch_size=e.batch_size, device="cuda" if e.gpus_per_actor > 0 else "cpu")
    images = dataset.map_batches(EvalImageGenerator, fn_constructor_args=(image_spec,), **stage)
    scored = images.map_batches(ScorerActor, fn_constructor_args=(scorer_spec,), **stage)
    return pa.concat_tables(ray.get(scored.to_arrow_refs()))


def _label(name: str | None) -> dict[str, float] | None:
    # A tiny share of a node type's custom resource pins the actors to that node type.
    return {name: 0.001} if name else None


# ----------------------------------------------------------------------------- caching


def scores_fingerprint(cfg: Config, model: str, prompts: Sequence[str]) -> dict[str, Any]:
    """Everything a model's stored scores depend on (JSON types only, compared after a JSON round trip)."""
    e = cfg.eval
    return {
        "model": model,
        "model_version": _model_version(model),
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest(),
        "num_prompts": len(prompts),
        "num_images_per_prompt": e.num_images_per_prompt,
        "seed": e.seed,
        "num_inference_steps": e.num_inference_steps,
        "guidance_scale": e.guidance_scale,
        "resolution": cfg.model.resolution,
        "scorers": list(e.scorers),
        "scorer_paths": {name: e.scorer_paths.get(name) for name in e.scorers},
        "scorer_options": {name: e.scorer_options.get(name, {}) for name in e.scorers},
    }


def _model_version(model: str) -> str | None:
    """The publish id in a model directory's DONE (a model retrained in place gets a new one)."""
    try:
        if "://" in model:
            parent, leaf = model.rstrip("/").rsplit("/", 1)
            run = RunDir(parent)
            return run.read_done(leaf).get("publish_id") if run.is_done(leaf) else None
        done = Path(model).expanduser() / "DONE"
        return json.loads(done.read_text()).get("publish_id") if done.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def model_scores(cfg: Config, rundir: RunDir, rel: str, model: str, prompts: Sequence[str]) -> pa.Table:
    """The scored rows of ``model`` on ``prompts``: from ``rel`` when its DONE matches
    :func:`scores_fingerprint`, else generated, stored in ``rel`` and marked done."""
    fingerprint = json.loads(json.dumps(scores_fingerprint(cfg, model, prompts)))
    if rundir.is_done(rel):
        if rundir.read_done(rel).get("fingerprint") == fingerprint:
            from spin_ray.safe_parquet import read_table_checked  # refuses extension-typed columns

            with rundir.fs.open(rundir.fs_path(f"{rel}/{SCORES_FILE}"), "rb") as handle:
                table = read_table_checked(handle, where=rundir.path(f"{rel}/{SCORES_FILE}"))
            print(f"[eval] {rel}: stored scores reused ({table.num_rows} images; same settings and model version)",
                  flush=True)
            return table
        log.warning("%s: stored scores were made with other settings or another model version; redoing them",
                    rundir.path(rel))
        rundir.fs.rm(rundir.fs_path(rel), recursive=True)
    rundir.remove_incomplete(rel)
    started = time.time()
    table = generate_and_score(model, prompts, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SCORES_FILE
        pq.write_table(table, local)
        rundir.upload_file(local, f"{rel}/{SCORES_FILE}")
    seconds = time.time() - started
    rundir.mark_done(rel, {"fingerprint": fingerprint, "num_rows": table.num_rows, "seconds": seconds})
    print(f"[eval] {rel}: {table.num_rows} images generated and scored in {seconds:.1f}s", flush=True)
    return table


# ----------------------------------------------------------------------------- orchestration


def evaluate_models(cfg: Config, rundir: RunDir, models: Mapping[str, str]) -> dict[str, SummaryTable]:
    """Evaluate the models of a self-play run and write ``<run_dir>/report/``.

    Args:
        models: name -> model directory, in report order (``base``, ``sft``, ``iter_1``, ...).

    Returns:
        prompt set name -> model -> metric -> Summary (the best-of-N table).
    """
    return _evaluate(cfg, rundir, {name: _published_location(rundir, name, path) for name, path in models.items()})


def _published_location(rundir: RunDir, name: str, path: str) -> str:
    """Where the actors find a self-play model: on object storage, a run's own models as their
    URL, so the actors on every node fetch them (``path`` is a copy on the driver's node only);
    a local directory as an absolute path (Ray workers may run in another directory)."""
    if not rundir.is_local:
        match = _ITERATION.match(name)
        stage = f"iter_{match.group(1)}" if match else ("baseline_sft" if name == "sft" else None)
        if stage and rundir.is_done(stage):
            return rundir.path(stage, "model")
    local = Path(path).expanduser()
    return str(local.resolve()) if "://" not in path and local.exists() else path


def run_evaluation(cfg: Config) -> dict[str, SummaryTable]:
    """``jobs/evaluate.py``: evaluate ``eval.models`` on ``eval.prompts`` into ``cfg.run_dir``.

    Returns prompt set name -> model -> metric -> Summary; the reports are in
    ``<run_dir>/report/`` (one prompt set) or ``<run_dir>/report/<set>/`` (several).
    """
    from spin_ray.ray_session import ensure_ray

    check_models(cfg.eval.models)
    check_eval_config(cfg.eval)
    models = {name: resolve_model(name, location) for name, location in cfg.eval.models.items()}
    rundir = RunDir(cfg.run_dir)
    rundir.write_run_config(dump_config(cfg))
    ensure_ray(cfg.cluster.address)
    return _evaluate(cfg, rundir, models)


def _evaluate(cfg: Config, rundir: RunDir, models: dict[str, str]) -> dict[str, SummaryTable]:
    check_models(models)
    check_eval_config(cfg.eval)
    paths = prompt_set_paths(cfg.eval.prompts)
    nested = len(paths) > 1
    results = {}
    for name, path in zip(prompt_set_names(paths), paths, strict=True):
        prompts = load_prompts(path, cfg.eval.max_prompts, cfg.eval.max_prompt_file_bytes)
        eval_rel = f"{EVAL_DIR}/{name}" if nested else EVAL_DIR
        tables = {model: model_scores(cfg, rundir, f"{eval_rel}/{model}", location, prompts)
                  for model, location in models.items()}
        report_rel = f"{REPORT_DIR}/{name}" if nested else REPORT_DIR
        results[name] = write_prompt_set_report(cfg.eval, rundir, report_rel, path, prompts, tables, models,
                                                cfg.model.resolution)
    return results
