"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Weights: the ``yuvalkirstain/PickScore_v1`` directory (transformers ``CLIPModel``); its
processor files (tokenizer + image processor) are those of ``laion/CLIP-ViT-H-14``, which
may live in the same directory or in ``processor_path``.

score(image, prompt) = exp(logit_scale) * cos(text_embedding, image_embedding), as in the
PickScore reference inference code (~21-22 for SD-1.5 images).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from spin_ray.rewards.common import (
    BatchedScorer,
    check_loading_info,
    require_dir,
    torch_dtype,
)

NAME = "pickscore"
MAX_TEXT_TOKENS = 77


class PickScoreScorer(BatchedScorer):
    """Scores (image, prompt) pairs with a PickScore CLIP model."""

    name = NAME

    def __init__(
        self, model: CLIPModel, processor: CLIPProcessor, device: str, dtype: torch.dtype, batch_size: int
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        super().__init__(device, dtype, batch_size)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.processor(
            text=prompts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        image_out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        text_out = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        )
        # transformers 5 returns output objects; the projected embedding is pooler_output.
        image_emb = F.normalize(image_out.pooler_output.float(), dim=-1)
        text_emb = F.normalize(text_out.pooler_output.float(), dim=-1)
        return self.model.logit_scale.float().exp() * (image_emb * text_emb).sum(dim=-1)


def load_pickscore(
    model_path: str | Path,
    processor_path: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
) -> PickScoreScorer:
    """Load PickScore from local directories.

    Args:
        model_path: directory of ``yuvalkirstain/PickScore_v1`` (config.json + weights).
        processor_path: directory with the ``laion/CLIP-ViT-H-14`` processor files
            (tokenizer + preprocessor_config.json); defaults to ``model_path``.
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the CLIP towers.
        batch_size: (image, prompt) pairs per forward pass.
    """
    model_dir = require_dir(model_path, NAME, "the yuvalkirstain/PickScore_v1 CLIPModel directory")
    processor_dir = require_dir(
        processor_path or model_dir, NAME, "the laion/CLIP-ViT-H-14 processor files (tokenizer, preprocessor_config.json)"
    )
    # Bandit B615 (hub download without a pinned revision) does not apply: both are local
    # directories (require_dir).
    model, loading_info = CLIPModel.from_pretrained(model_dir, dtype=torch_dtype(dtype), output_loading_info=True)  # nosec B615
    check_loading_info(loading_info, model_dir, NAME, "a CLIPModel checkpoint (PickScore_v1)")
    processor = CLIPProcessor.from_pretrained(processor_dir)  # nosec B615
    return PickScoreScorer(model.to(device), processor, device, torch_dtype(dtype), batch_size)
