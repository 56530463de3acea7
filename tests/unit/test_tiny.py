"""The offline CLIP tokenizer and the tiny Stable Diffusion pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPTokenizer

from spin_ray.tiny import build_clip_tokenizer, build_tiny_pipeline, save_tiny_pipeline

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4k, TRENDING on artstation!!",
    "naïve café — déjà vu, 1234 tokens' test",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip_tokenizer")
    build_clip_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-L-14")


def test_tokenizer_files_have_clip_sizes(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    merges = (tokenizer_dir / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_reloads_with_77_positions(tokenizer_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    assert tokenizer.pad_token_id == 49407


def test_token_ids_are_clips_known_ids(tokenizer_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    # Token ids of SD 1.5's tokenizer (openai/clip-vit-large-patch14) for this prompt.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_match_open_clip(
    tokenizer_dir: Path, open_clip_tokenizer: open_clip.tokenizer.SimpleTokenizer, prompt: str
) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip_tokenizer([prompt])[0].tolist()
    end = theirs.index(49407) + 1
    # open_clip pads with 0, SD's tokenizer with <|endoftext|>: compare up to the end token.
    assert ours[:end] == theirs[:end]
    assert ours[end:] == [49407] * (77 - end)


def test_long_prompt_is_truncated_to_77_with_end_token(tokenizer_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_tiny_pipeline_is_sd_shaped() -> None:
    pipe = build_tiny_pipeline(seed=0, sample_size=8)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size == 8
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length == 77
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (scheduler.num_train_timesteps, scheduler.steps_offset) == (1000, 1)
    assert scheduler.clip_sample is False and scheduler.set_alpha_to_one is False
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def _state(pipe: object) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{key}": value
        for part in ("unet", "vae", "text_encoder")
        for key, value in getattr(pipe, part).state_dict().items()
    }


def test_tiny_pipeline_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second, other = (build_tiny_pipeline(seed=s, sample_size=8) for s in (0, 0, 1))
    assert torch.equal(torch.rand(3), expected_next)
    a, b, c = _state(first), _state(second), _state(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["unet.conv_in.weight"], c["unet.conv_in.weight"])
    assert not torch.equal(
        a["text_encoder.embeddings.token_embedding.weight"],
        c["text_encoder.embeddings.token_embedding.weight"],
    )


def test_saved_tiny_pipeline_uses_safetensors_only(tiny_pipeline_dir: Path) -> None:
    for part in ("unet", "vae", "text_encoder"):
        assert list((tiny_pipeline_dir / part).glob("*.safetensors")), part
    assert not list(tiny_pipeline_dir.rglob("*.bin"))
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]


def test_save_tiny_pipeline_returns_its_dir(tmp_path: Path) -> None:
    out = save_tiny_pipeline(tmp_path / "p", seed=3, sample_size=8)
    assert out == tmp_path / "p"
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 8
