"""Preparation: (prompt, image) rows -> the cached "real" table of latents and embeddings.

Runs once per run as Ray Data stages: the SFT reader, then an actor pool holding the
frozen VAE and text encoder. The result is written to ``<run_dir>/prepared/`` as parquet
and marked done, so later iterations and reruns reuse it (docs/DESIGN.md section 3.1).

Output columns (:mod:`spin_ray.pair_schema`): ``row_id`` int64, ``prompt`` str,
``prompt_embeds`` (L, D) float16 (half the bytes; cast back to float32 by the consumers),
``latents_real`` (C, h, w) float32; with ``image_lose`` in the input rows (a Diffusion-DPO
baseline: :func:`spin_ray.data.read_sft_dataset` ``with_loser``) also ``latents_lose`` (C, h, w)
float32, the Pick-a-Pic loser's latent. Without a DPO baseline the loser is never read or encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spin_ray.data.stats import LOSER_COLUMN
from spin_ray.diffusion import (
    encode_images,
    encode_prompt_ids,
    image_to_tensor,
    load_components,
    pick_device,
    tokenize,
)
from spin_ray.input_limits import decode_image


@dataclass(frozen=True)
class EncoderSpec:
    """What an Encoder actor needs; picklable."""

    model_path: str
    resolution: int
    device: str = "auto"


class Encoder:
    """Ray Data callable class: ``prompt``, ``image`` (bytes), ``row_id`` -> real table rows."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.device = pick_device(spec.device)
        self.components = load_components(spec.model_path, local_files_only=True, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        pixels = torch.stack([
            # decode_image: the same pixel cap as the reader's check, in case rows come from elsewhere
            image_to_tensor(decode_image(bytes(raw)), self.spec.resolution) for raw in batch["image"]
        ]).to(self.device)
        with torch.inference_mode():
            latents = encode_images(self.components.vae, pixels)
            ids = tokenize(self.components.tokenizer, prompts).to(self.device)
            embeds = encode_prompt_ids(self.components.text_encoder, ids)
        out = {
            "row_id": np.asarray(batch["row_id"], dtype=np.int64),
            "prompt": np.asarray(prompts, dtype=object),
            "prompt_embeds": embeds.to(torch.float16).cpu().numpy(),
            "latents_real": latents.float().cpu().numpy(),
        }
        if LOSER_COLUMN in batch:
            out["latents_lose"] = self._encode(batch[LOSER_COLUMN])
        return out

    def _encode(self, images) -> np.ndarray:
        """VAE latents (B, C, h, w) float32 of encoded image bytes."""
        pixels = torch.stack([image_to_tensor(decode_image(bytes(raw)), self.spec.resolution) for raw in images])
        with torch.inference_mode():
            return encode_images(self.components.vae, pixels.to(self.device)).float().cpu().numpy()


def prepare_real_table(sft_rows, spec: EncoderSpec, *, batch_size: int, num_actors: int,
                       gpus_per_actor: float, resources: dict[str, float] | None = None):
    """Ray Data pipeline: SFT rows -> encoded real table (lazy ``ray.data.Dataset``)."""
    import ray.data

    return sft_rows.map_batches(
        Encoder,
        fn_constructor_args=(spec,),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_gpus=gpus_per_actor or None,
        resources=resources or None,
    )
