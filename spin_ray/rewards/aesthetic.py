"""LAION improved aesthetic predictor (Schuhmann et al.): a linear head on CLIP ViT-L/14.

Weights: a CLIP ViT-L/14 directory as published in ``openai/clip-vit-large-patch14``
(a transformers ``CLIPModel``; only its image embedding is used) and the head
``sac+logos+ava1-l14-linearMSE.pth`` (a state dict of :class:`RewardMLP`).

score(image) = MLP(e / ||e||), e = the projected CLIP image embedding (768-d); the prompt is
not used. SD-1.5 images score ~5.8.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from spin_ray.rewards.common import (
    BatchedScorer,
    check_loading_info,
    load_state_dict_strict,
    read_state_dict,
    require_dir,
    require_file,
    torch_dtype,
)
from spin_ray.rewards.mlp_head import RewardMLP

NAME = "aesthetic"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticScorer(BatchedScorer):
    """Scores images with the LAION aesthetic head on CLIP image embeddings (prompts are checked
    for pairing with the images but not used)."""

    name = NAME

    def __init__(
        self,
        clip: CLIPModel,
        image_processor: CLIPImageProcessor,
        head: RewardMLP,
        device: str,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.clip = clip.eval()
        self.image_processor = image_processor
        self.head = head.eval()
        super().__init__(device, dtype, batch_size)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        # transformers 5 returns an output object; the projected embedding is pooler_output.
        embedding = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        # The head was trained on L2-normalised float32 embeddings.
        return self.head(F.normalize(embedding.float(), dim=-1))


def load_aesthetic(
    clip_path: str | Path,
    head_path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
) -> AestheticScorer:
    """Load the aesthetic predictor from local files.

    Args:
        clip_path: CLIP ViT-L/14 directory (``openai/clip-vit-large-patch14`` layout: config.json,
            weights, preprocessor_config.json).
        head_path: ``sac+logos+ava1-l14-linearMSE.pth``.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the CLIP tower (the head runs in float32).
        batch_size: images per forward pass.
    """
    clip_dir = require_dir(clip_path, NAME, "a CLIP ViT-L/14 directory (openai/clip-vit-large-patch14)")
    head_file = require_file(head_path, NAME, f"the LAION aesthetic head {HEAD_FILE}")
    # Bandit B615 (hub download without a pinned revision) does not apply: clip_dir is local (require_dir).
    clip, loading_info = CLIPModel.from_pretrained(clip_dir, dtype=torch_dtype(dtype), output_loading_info=True)  # nosec B615
    check_loading_info(loading_info, clip_dir, NAME, "a CLIPModel checkpoint (openai/clip-vit-large-patch14)")
    head = RewardMLP(clip.config.projection_dim)
    load_state_dict_strict(
        head,
        read_state_dict(head_file, NAME),
        head_file,
        NAME,
        f"the aesthetic MLP head {clip.config.projection_dim}->1024->128->64->16->1",
    )
    return AestheticScorer(
        clip.to(device),
        CLIPImageProcessor.from_pretrained(clip_dir),  # nosec B615
        head.to(device),
        device,
        torch_dtype(dtype),
        batch_size,
    )
