"""spin_ray.prepare: the Encoder actor stores each row's own image latents and prompt embedding.

The actor is called directly on a Ray Data-style batch (no Ray). The expected values are
computed row by row, straight from the diffusers/transformers modules of a separate load of
the same tiny pipeline: pixels by hand from the PNG, the VAE's posterior mean times its
scaling factor, and the CLIP text encoder's last hidden state of the 77-token padded prompt.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from spin_ray.prepare import Encoder, EncoderSpec

RESOLUTION = 128  # the shared tiny pipeline's image size: latents (4, 16, 16), no resize needed
PROMPTS = ["a red circle on a blue background", "two green squares", "a yellow triangle above a black star"]
ROW_IDS = [7, 3, 11]


def random_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def latent_by_hand(vae, png: bytes) -> np.ndarray:
    """One image alone: uint8 -> [-1, 1] (already RESOLUTION square), the posterior mean, scaled."""
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0
    return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)[0].numpy()


@torch.no_grad()
def embedding_by_hand(tokenizer, text_encoder, prompt: str) -> np.ndarray:
    """One prompt alone: padded to 77 tokens as Stable Diffusion does, last hidden state."""
    ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state[0].numpy()


@pytest.fixture
def encoded(tiny_pipeline_dir):
    images = [random_png(seed) for seed in range(len(PROMPTS))]
    batch = {
        "row_id": np.asarray(ROW_IDS, dtype=np.int64),
        "prompt": np.asarray(PROMPTS, dtype=object),
        "image": np.asarray(images, dtype=object),
    }
    encoder = Encoder(EncoderSpec(str(tiny_pipeline_dir), resolution=RESOLUTION, device="cpu"))
    return images, encoder(batch)


def test_encoder_output_columns_keep_the_rows_ids_and_prompts_in_order(encoded):
    _, out = encoded
    assert set(out) == {"row_id", "prompt", "prompt_embeds", "latents_real"}
    assert out["row_id"].dtype == np.int64 and out["row_id"].tolist() == ROW_IDS
    assert out["prompt"].tolist() == PROMPTS
    assert out["latents_real"].dtype == np.float32 and out["latents_real"].shape == (3, 4, 16, 16)
    assert out["prompt_embeds"].dtype == np.float16 and out["prompt_embeds"].shape[:2] == (3, 77)


def test_encoder_stores_each_rows_own_image_latents_and_prompt_embedding(encoded, tiny_components):
    images, out = encoded
    vae, tokenizer, text_encoder = tiny_components.vae, tiny_components.tokenizer, tiny_components.text_encoder
    for i, (png, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        np.testing.assert_allclose(out["latents_real"][i], latent_by_hand(vae, png), rtol=1e-4, atol=1e-5,
                                   err_msg=f"row {i}: latents_real")
        # stored as float16: compare against the float16 rounding of the float32 embedding
        expected = embedding_by_hand(tokenizer, text_encoder, prompt).astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(out["prompt_embeds"][i].astype(np.float32), expected, rtol=2e-3, atol=2e-3,
                                   err_msg=f"row {i}: prompt_embeds")
    # The rows really differ, so a row holding another row's latents or embedding would show above.
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(out["latents_real"][i] - out["latents_real"][j]).max() > 1e-2
            assert np.abs(out["prompt_embeds"][i].astype(np.float32)
                          - out["prompt_embeds"][j].astype(np.float32)).max() > 1e-2
