"""A tiny, randomly initialised Stable Diffusion pipeline, built fully offline.

It has SD 1.5's shape where it matters to the code (4 latent channels, latents 1/8 of the
image side, a CLIP tokenizer with SD's real token ids and 77 positions, the SD 1.5 DDIM
schedule) and is small enough for tests on a CPU: with ``sample_size=16`` the latents are
16x16 and the images 128x128.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = 49152 - 256 - 2  # as open_clip's SimpleTokenizer reads its BPE file
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

TINY_CROSS_ATTENTION_DIM = 32
TINY_VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)
"""Four VAE blocks give SD's scale factor 2**3 = 8 and cost no more than two wide ones."""


def build_clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write the CLIP BPE tokenizer (SD 1.5's, same token ids) to ``out_dir`` from the BPE
    table open_clip ships, and load it with ``CLIPTokenizer.from_pretrained``.

    vocab.json: 256 byte symbols, the same with ``</w>``, one entry per merge, then the
    start/end tokens (49,408 in all); merges.txt: ``#version: 0.2`` and 48,894 merges.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as bpe_file:
        lines = bpe_file.read().split("\n")
    merges = lines[1 : _CLIP_NUM_MERGES + 1]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [_BOS, _EOS]
    token_ids = {token: i for i, token in enumerate(vocab)}
    (out_dir / "vocab.json").write_text(json.dumps(token_ids, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5 ignores vocab_file= and, without model_max_length, pads to a huge length.
    # Bandit B615 (hub download without a pinned revision) does not apply: out_dir was just written.
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=CLIP_CONTEXT_LENGTH)  # nosec B615
    tokenizer.save_pretrained(str(out_dir))  # records model_max_length for later loads
    return tokenizer


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16, vae_scale_factor: int = 8) -> StableDiffusionPipeline:
    """A random tiny SD pipeline: latents (4, sample_size, sample_size), images
    ``vae_scale_factor`` (8 as in SD; 2 or 4 for the toy world's small images) times larger.

    Deterministic: the same seed gives the same weights; the global torch RNG is left as
    it was. Sizes follow diffusers' ``get_dummy_components`` tests, with one layer per block.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(sample_size)
        vae = _tiny_vae(sample_size * vae_scale_factor, _vae_blocks(vae_scale_factor))
        text_encoder = _tiny_text_encoder()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = build_clip_tokenizer(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd15_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(out_dir: str | Path, **kwargs: int) -> Path:
    """Build :func:`build_tiny_pipeline` (``kwargs`` go to it) and save it in diffusers
    format with safetensors weights; returns ``out_dir``."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(**kwargs).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def sd15_ddim_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's noise schedule."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _tiny_unet(sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
    )


def _vae_blocks(vae_scale_factor: int) -> int:
    blocks = vae_scale_factor.bit_length()  # each block after the first halves the side
    if vae_scale_factor < 1 or 2 ** (blocks - 1) != vae_scale_factor or blocks > len(TINY_VAE_BLOCK_OUT_CHANNELS):
        raise ValueError(f"vae_scale_factor: expected 1, 2, 4 or 8, got {vae_scale_factor}")
    return blocks


def _tiny_vae(image_size: int, blocks: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=TINY_VAE_BLOCK_OUT_CHANNELS[:blocks],
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=8,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        hidden_size=TINY_CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=TINY_CROSS_ATTENTION_DIM,
        layer_norm_eps=1e-5,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    return CLIPTextModel(config)
