"""Images and prompts in and out of the Stable Diffusion model: PIL images to pixel tensors and
back, prompts to CLIP token ids and embeddings, pixels to VAE latents and back.

Part of the model layer (:mod:`spin_ray.diffusion` re-exports every name, so ``from
spin_ray.diffusion import tokenize`` keeps working); plain PyTorch + diffusers, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageOps
from transformers import CLIPTextModel, CLIPTokenizer


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image -> (3, R, R) float32 in [-1, 1]: shorter side resized to R (Lanczos),
    then centre-cropped. Transparent parts are composited on white (so RGBA/LA/P images
    with alpha do not turn black), EXIF rotation is applied."""
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> token ids (B, L) int64 with L = ``tokenizer.model_max_length`` (77 for
    CLIP), padded and truncated like Stable Diffusion."""
    length = tokenizer.model_max_length
    if length > 4096:
        raise ValueError(
            f"tokenizer.model_max_length is {length}: the tokenizer was loaded without its "
            "tokenizer_config.json; pass model_max_length=77 for CLIP"
        )
    batch = tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids.long()


@torch.no_grad()
def encode_prompt_ids(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, 77) -> prompt embeddings (B, 77, D) float32: the text encoder's last
    hidden state, as Stable Diffusion conditions its UNet."""
    input_ids = input_ids.to(text_encoder.device)
    return text_encoder(input_ids).last_hidden_state.float()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> latents x_0 (B, C, H/f, W/f) float32, scaled by
    ``vae.config.scaling_factor``.

    Uses the mean of the VAE's latent distribution rather than a sample, so preparation is
    deterministic: the same image always gives the same latent and the result can be cached.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean.float()
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) (scaled as :func:`encode_images` returns them) -> images
    (B, 3, h*f, w*f) float32 in [0, 1]."""
    shift = vae.config.get("shift_factor") or 0.0
    latents = latents.float() / vae.config.scaling_factor + shift
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0.0, 1.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [0, 1] -> B RGB PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row, mode="RGB") for row in array]
