"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 + a BERT text encoder that cross-attends to the
image, followed by a linear MLP head on the text encoder's first ([CLS]) token.

Weights as published in ``THUDM/ImageReward``: ``ImageReward.pt`` (a state dict with
``blip.visual_encoder.*`` in the BLIP/timm ViT layout, ``blip.text_encoder.*`` in the BLIP
``med.py`` BERT layout, and ``mlp.layers.*``), ``med_config.json`` (the BERT config), and
the ``bert-base-uncased`` tokenizer files. The ``image-reward`` package does not import with
current transformers, so the towers are transformers' BLIP classes (the ones
``BlipForImageTextRetrieval`` uses) and this module renames the ViT keys; the BERT keys of
``med.py`` and ``BlipTextModel`` are identical.

score(image, prompt) = (MLP(h_[CLS]) - 0.16717362830052426) / 1.0333394966054072, the
reference normalisation (~0.8 for SD-1.5 images with best-of-5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from spin_ray.rewards.common import (
    BatchedScorer,
    check_state_dict,
    read_state_dict,
    require_dir,
    require_file,
    torch_dtype,
)
from spin_ray.rewards.mlp_head import RewardMLP

NAME = "imagereward"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
HEAD_PREFIX = "mlp."
# Contrastive projections of BLIP pre-training and the BERT position-id buffer: in the file,
# unused for the reward.
IGNORED_KEY = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")

# (BLIP/timm ViT name, transformers BlipVisionModel name); ``{i}`` is the block index.
VISION_RENAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
    ("norm.", "post_layernorm."),
)


def _rename(key: str, source: str, target: str) -> str | None:
    """Rewrite the prefix ``source`` of ``key`` as ``target`` (``{i}`` matches a block index)."""
    pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)")
    match = re.match(pattern, key)
    if match is None:
        return None
    return target.replace("{i}", match.groupdict().get("i") or "") + key[match.end() :]


def blip_vit_key_to_transformers(key: str) -> str:
    """``blocks.3.attn.proj.weight`` -> ``encoder.layers.3.self_attn.projection.weight``;
    unknown keys are returned unchanged (and then reported as unexpected)."""
    for source, target in VISION_RENAMES:
        renamed = _rename(key, source, target)
        if renamed is not None:
            return renamed
    return key


def transformers_key_to_blip_vit(key: str) -> str:
    """Inverse of :func:`blip_vit_key_to_transformers`."""
    for source, target in VISION_RENAMES:
        renamed = _rename(key, target, source)
        if renamed is not None:
            return renamed
    return key


def image_reward_vision_config() -> BlipVisionConfig:
    """BLIP ViT-L/16 at 224 px as ImageReward builds it (``create_vit('large', 224)``)."""
    return BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def text_config_from_med(med_config_path: Path, encoder_hidden_size: int) -> BlipTextConfig:
    """Translate BLIP's ``med_config.json`` (a BERT config) into a :class:`BlipTextConfig`.

    Cross-attention keys/values take the vision width, as BLIP sets ``encoder_width``
    to the ViT width in code (the json's own ``encoder_width`` is overridden there too).
    ``is_decoder=True`` only makes transformers build the cross-attention layers; the
    forward pass runs bidirectionally (``is_decoder=False``), as BLIP's ``multimodal`` mode.
    """
    try:
        med = json.loads(med_config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{NAME}: cannot read {med_config_path} as JSON: {error}") from error
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [key for key in required if key not in med]
    if absent:
        raise ValueError(f"{NAME}: {med_config_path} lacks {absent}; expected BLIP's med_config.json (a BERT config)")
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        intermediate_size=med["intermediate_size"],
        hidden_act=med.get("hidden_act", "gelu"),
        max_position_embeddings=med.get("max_position_embeddings", 512),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=encoder_hidden_size,
        is_decoder=True,
    )


def load_tokenizer(tokenizer_path: Path, vocab_size: int) -> BertTokenizer:
    """bert-base-uncased plus the two tokens BLIP adds (``[DEC]`` as bos, ``[ENC]``)."""
    # Bandit B615 does not apply (tokenizer_path is a local directory, require_dir), nor B105
    # ([DEC] is a token, not a password).
    tokenizer = BertTokenizer.from_pretrained(tokenizer_path)  # nosec B615
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # nosec B105
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{NAME}: tokenizer {tokenizer_path} has {len(tokenizer)} tokens but med_config vocab_size is "
            f"{vocab_size}; expected the bert-base-uncased tokenizer files"
        )
    return tokenizer


def blip_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """ImageReward's transform: bicubic resize of the short side, centre crop, BLIP normalisation."""
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(BLIP_MEAN, BLIP_STD),
        ]
    )


class ImageRewardScorer(BatchedScorer):
    """Scores (image, prompt) pairs with ImageReward."""

    name = NAME

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: RewardMLP,
        tokenizer: BertTokenizer,
        device: str,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.vision = vision.eval()
        self.text = text.eval()
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.preprocess = blip_preprocess(vision.config.image_size)
        super().__init__(device, dtype, batch_size)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D_vision)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device)
        text_out = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        features = text_out.last_hidden_state[:, 0, :].float()  # the [CLS] token, (B, D_text)
        return (self.head(features) - REWARD_MEAN) / REWARD_STD


def load_image_reward(
    weights_path: str | Path,
    med_config_path: str | Path,
    tokenizer_path: str | Path,
    vision_config: BlipVisionConfig | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
) -> ImageRewardScorer:
    """Load ImageReward from local files.

    Args:
        weights_path: ``ImageReward.pt``.
        med_config_path: ``med_config.json`` (published next to ImageReward.pt).
        tokenizer_path: directory with the ``bert-base-uncased`` tokenizer files (vocab.txt, ...).
        vision_config: the ViT's shape; default :func:`image_reward_vision_config` (ViT-L/16, 224 px).
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the towers (the head runs in float32).
        batch_size: (image, prompt) pairs per forward pass.
    """
    weights_file = require_file(weights_path, NAME, "ImageReward.pt (THUDM/ImageReward)")
    med_file = require_file(med_config_path, NAME, "med_config.json (THUDM/ImageReward)")
    tokenizer_dir = require_dir(tokenizer_path, NAME, "the bert-base-uncased tokenizer files (vocab.txt)")
    vision_config = vision_config or image_reward_vision_config()
    text_config = text_config_from_med(med_file, encoder_hidden_size=vision_config.hidden_size)

    vision = BlipVisionModel(vision_config)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    head = RewardMLP(text_config.hidden_size)
    _load_checkpoint(weights_file, vision, text, head)

    torch_type = torch_dtype(dtype)
    return ImageRewardScorer(
        vision.to(device, torch_type),
        text.to(device, torch_type),
        head.to(device),
        load_tokenizer(tokenizer_dir, text_config.vocab_size),
        device,
        torch_type,
        batch_size,
    )


def _load_checkpoint(path: Path, vision: BlipVisionModel, text: BlipTextModel, head: RewardMLP) -> None:
    """Check ``ImageReward.pt`` against the three modules (in the file's own key names), then load."""
    state = {key: value for key, value in read_state_dict(path, NAME).items() if not IGNORED_KEY.search(key)}
    expected = {
        **{VISION_PREFIX + transformers_key_to_blip_vit(k): v.shape for k, v in vision.state_dict().items()},
        **{TEXT_PREFIX + k: v.shape for k, v in text.state_dict().items()},
        **{HEAD_PREFIX + k: v.shape for k, v in head.state_dict().items()},
    }
    check_state_dict(expected, state, path, NAME, "the ImageReward checkpoint layout for this med_config/vision_config")
    vision.load_state_dict(
        {blip_vit_key_to_transformers(k.removeprefix(VISION_PREFIX)): v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    )
    text.load_state_dict({k.removeprefix(TEXT_PREFIX): v for k, v in state.items() if k.startswith(TEXT_PREFIX)})
    head.load_state_dict({k.removeprefix(HEAD_PREFIX): v for k, v in state.items() if k.startswith(HEAD_PREFIX)})
