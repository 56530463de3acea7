"""The toy base model theta_0: a tiny SD-shaped pipeline, pretrained on a shifted toy world.

Like SD-1.5 for Pick-a-Pic, it should be a plausible but imperfect starting point. It has
SD's classes (AutoencoderKL, UNet2DConditionModel, CLIP text encoder and tokenizer, DDIM)
and is built in two short phases from :func:`spin_ray.tiny.build_tiny_pipeline`:

1. the VAE learns to reconstruct correct toy renderings (so decoded images mean something),
   and its ``scaling_factor`` is set so the latents have unit variance, as SD's 0.18215 does;
2. the UNet learns to denoise latents of the *shifted* world (:func:`render_shifted`:
   colours and shapes often wrong, washed out, blurred) with 10% of prompts dropped to the
   empty prompt, so classifier-free guidance works.

The package ships the result (``assets/base_model``, built by ``python -m
spin_ray.toy.base_model``); other resolutions are built on first use and cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ASSET_DIR = Path(__file__).parent / "assets" / "base_model"
ASSET_RESOLUTION = 32
VERSION = "v1"
BUILD_SEED = 0
VAE_SCALE_FACTOR = 4
"""32x32 images, 8x8x4 latents: enough for coloured shapes, and cheap on a laptop CPU."""
VAE_STEPS = 1500
UNET_STEPS = 1000
SHIFT = 0.6
CONDITION_DROPOUT = 0.1


def ensure_toy_base_model(resolution: int = ASSET_RESOLUTION) -> Path:
    """The toy base model's diffusers directory: the shipped one or a cached build."""
    if resolution == ASSET_RESOLUTION and (ASSET_DIR / "model_index.json").exists():
        return ASSET_DIR
    cache = Path(os.environ.get("SPIN_RAY_CACHE", "~/.cache/spin_ray")).expanduser()
    target = cache / f"toy_base_{resolution}px_{VERSION}"
    if not (target / "model_index.json").exists():
        print(f"building the toy base model for {resolution}px images in {target} (once)", flush=True)
        build_toy_base_model(target, resolution=resolution)
    return target


def build_toy_base_model(out_dir: str | Path, *, resolution: int = ASSET_RESOLUTION, seed: int = BUILD_SEED,
                         vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS, shift: float = SHIFT,
                         batch_size: int = 32) -> Path:
    """Build and save the toy base model (written to a temp dir, then renamed into place)."""
    from spin_ray.tiny import build_tiny_pipeline

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    pipe = build_tiny_pipeline(seed=seed, sample_size=resolution // VAE_SCALE_FACTOR, vae_scale_factor=VAE_SCALE_FACTOR)
    started = time.time()
    _train_vae(pipe.vae, resolution=resolution, seed=seed, steps=vae_steps, batch_size=batch_size)
    print(f"toy base: VAE trained in {time.time() - started:.0f}s", flush=True)
    _train_unet(pipe, resolution=resolution, seed=seed, steps=unet_steps, shift=shift, batch_size=batch_size)
    print(f"toy base: UNet trained, {time.time() - started:.0f}s in all", flush=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _image_batch(rows) -> tuple[list[str], torch.Tensor]:
    from spin_ray.diffusion import image_to_tensor

    prompts = [prompt for prompt, _ in rows]
    pixels = torch.stack([image_to_tensor(image, image.size[0]) for _, image in rows])
    return prompts, pixels


def _train_vae(vae, *, resolution: int, seed: int, steps: int, batch_size: int) -> None:
    from spin_ray.toy.world import shifted_rows

    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        _, pixels = _image_batch(shifted_rows(batch_size, seed=seed * 100_003 + step, resolution=resolution))
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"toy base: VAE step {step} reconstruction loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        _, pixels = _image_batch(shifted_rows(256, seed=seed + 7, resolution=resolution))
        latents = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _train_unet(pipe, *, resolution: int, seed: int, steps: int, shift: float, batch_size: int) -> None:
    from spin_ray.diffusion import encode_images, encode_prompt_ids, tokenize
    from spin_ray.toy.world import shifted_rows
    from spin_ray.train_step import PairBatch, sft_batch_loss

    unet = pipe.unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        prompts, pixels = _image_batch(
            shifted_rows(batch_size, seed=seed * 200_003 + step, resolution=resolution, shift=shift))
        prompts = ["" if rng.random() < CONDITION_DROPOUT else p for p in prompts]
        with torch.no_grad():
            latents = encode_images(pipe.vae, pixels)
            embeds = encode_prompt_ids(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
        seeds = torch.as_tensor(rng.integers(0, 2**62, size=batch_size), dtype=torch.int64)
        batch = PairBatch(latents_real=latents, latents_syn=latents, prompt_embeds=embeds, noise_seed=seeds)
        loss = sft_batch_loss(unet, pipe.scheduler, batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"toy base: UNet step {step} denoising loss {loss.item():.4f}", flush=True)
    unet.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the toy base model shipped in spin_ray/toy/assets.")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--resolution", type=int, default=ASSET_RESOLUTION)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    args = parser.parse_args()
    build_toy_base_model(args.out, resolution=args.resolution, vae_steps=args.vae_steps,
                         unet_steps=args.unet_steps)


if __name__ == "__main__":
    main()
