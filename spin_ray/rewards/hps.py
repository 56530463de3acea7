"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Weights: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (a state dict of the
open_clip model, plain or wrapped as ``{"state_dict": ...}``). The ``hpsv2`` package is
broken as shipped, so the model is built with open_clip directly.

score(image, prompt) = cos(image_embedding, text_embedding), the raw cosine that HPSv2
reports (~0.27 for SD-1.5 images). Images are preprocessed as HPSv2's scoring code does
(its ``light_augmentation`` transform): longest side scaled to the model's input size,
padded with black to a square, CLIP normalisation; not open_clip's shortest-side crop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from spin_ray.rewards.common import (
    BatchedScorer,
    load_state_dict_strict,
    read_state_dict,
    require_file,
    torch_dtype,
)

NAME = "hpsv2"
OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def hps_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """HPSv2's evaluation transform: image -> (3, image_size, image_size) float tensor.

    To [0, 1], scale the longest side to ``image_size`` (bicubic on the tensor), pad the short
    side with black (pad // 2 before, the rest after), normalise with the CLIP mean/std.
    ``antialias=False`` is what HPSv2's code got from the torchvision of its time (the tensor
    default before 0.17); the published scores were computed that way.
    """

    def preprocess(image: Image.Image) -> torch.Tensor:
        pixels = TF.to_tensor(image.convert("RGB"))
        height, width = pixels.shape[1:]
        scale = image_size / max(height, width)
        new_height, new_width = round(height * scale), round(width * scale)
        if (new_height, new_width) != (height, width):
            pixels = TF.resize(pixels, [new_height, new_width], InterpolationMode.BICUBIC, antialias=False)
        pad_height, pad_width = image_size - new_height, image_size - new_width
        padding = [pad_width // 2, pad_height // 2, pad_width - pad_width // 2, pad_height - pad_height // 2]
        return TF.normalize(TF.pad(pixels, padding, fill=0.0), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)

    return preprocess


class HPSv2Scorer(BatchedScorer):
    """Scores (image, prompt) pairs with an HPSv2 open_clip model."""

    name = NAME

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        super().__init__(device, dtype, batch_size)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        image_emb = self.model.encode_image(pixels, normalize=True).float()
        text_emb = self.model.encode_text(tokens, normalize=True).float()
        return (image_emb * text_emb).sum(dim=-1)


def load_hpsv2(
    weights_path: str | Path,
    model_name: str = "ViT-H-14",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
) -> HPSv2Scorer:
    """Load HPSv2 from a local ``HPS_v2*_compressed.pt``.

    Args:
        weights_path: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``.
        model_name: open_clip architecture the file was trained on (``ViT-H-14`` for the
            published files; any name in ``open_clip.list_models()``).
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: (image, prompt) pairs per forward pass.
    """
    if model_name not in open_clip.list_models():  # a hub name (hf-hub:...) would download files
        raise ValueError(f"{NAME}: model_name {model_name!r} is not in open_clip.list_models(); "
                         f"hub and path names (hf-hub:..., local-dir:...) are refused (docs/SECURITY.md)")
    path = require_file(weights_path, NAME, f"HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (open_clip {model_name})")
    torch_type = torch_dtype(dtype)
    # open_clip's precision modes keep the layers that need float32 (LayerNorm) in float32.
    model = open_clip.create_model(model_name, pretrained=None, precision=OPEN_CLIP_PRECISION[torch_type], device=device)
    load_state_dict_strict(model, read_state_dict(path, NAME), path, NAME, f"the open_clip {model_name} state dict")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
    return HPSv2Scorer(
        model, hps_preprocess(image_size), open_clip.get_tokenizer(model_name), device, torch_type, batch_size
    )
