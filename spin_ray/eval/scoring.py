"""The generate-and-score pipeline: N images per prompt from one model, every scorer on each.

The paper's protocol (SPIN-Diffusion, Yuan et al. 2024, Sec. 5): each model generates
``eval.num_images_per_prompt`` images per prompt from the same seeds, and every scorer scores
every image. Per (prompt set, model), one Ray Data pipeline::

    prompt rows (prompt_index, prompt, image_index, seed)             spin_ray.eval.rows
      --map_batches(EvalImageGenerator: the model, DDIM + CFG, VAE decode)--> + image (PNG bytes)
      --map_batches(ScorerActor: every scorer in eval.scorers)--> + one float32 column per scorer
      --> driver: one pyarrow table, one row per image

Every actor process imports this module: torch and diffusers (:mod:`spin_ray.diffusion`) are
imported where they are used, since a scorer actor needs neither.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from spin_ray.config import Config
from spin_ray.eval.rows import GRID_PROMPTS, IMAGE_COLUMN, ROW_COLUMNS, png_bytes, prompt_rows
from spin_ray.rewards import load_scorer
from spin_ray.rundir import RunDir
from spin_ray.stage_plans import label_resources
from spin_ray.user_cache import user_cache_dir

DECODE_CHUNK = 4
"""Images per VAE decode call: a 512 px decode of a whole batch would need several GB."""


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
        out[IMAGE_COLUMN] = np.asarray([png_bytes(image) for image in images], dtype=object)
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


# ----------------------------------------------------------------------------- the pipeline


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
        "resources": label_resources(cfg.cluster.generation_node_label),
    }
    image_spec = ImageSpec(model=model, resolution=cfg.model.resolution, num_inference_steps=e.num_inference_steps,
                           guidance_scale=e.guidance_scale, local_files_only=cfg.model.local_files_only)
    scorer_spec = ScorerSpec(scorers=tuple(e.scorers), paths=dict(e.scorer_paths), options=dict(e.scorer_options),
                             batch_size=e.batch_size, device="cuda" if e.gpus_per_actor > 0 else "cpu")
    images = dataset.map_batches(EvalImageGenerator, fn_constructor_args=(image_spec,), **stage)
    scored = images.map_batches(ScorerActor, fn_constructor_args=(scorer_spec,), **stage)
    return pa.concat_tables(ray.get(scored.to_arrow_refs()))


