"""Scorers on tiny random models of each published architecture, saved in the published layout
and reloaded through the production loaders (no hub access, no real weights except the
LAION aesthetic head from ../shared/weights when it is there)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spin_ray.rewards import SCORER_NAMES, Scorer, load_scorer
from spin_ray.rewards.common import WeightsError
from spin_ray.rewards.mlp_head import RewardMLP

SHARED_WEIGHTS = Path(__file__).parents[2] / ".." / "shared" / "weights"
AESTHETIC_HEAD = SHARED_WEIGHTS / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cat", "a red car on a road", "an astronaut riding a horse", "a bowl of fruit"]
IMAGE_SIDE = 32  # the tiny towers' input size: images of this size need no resizing


def make_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # Mixed sizes and modes: the scorers resize/crop and convert to RGB themselves.
    varied = make_images([(40, 48), (64, 64), (32, 50), (33, 33)])
    varied[3] = varied[3].convert("RGBA")
    return varied


# ----------------------------------------------------------------------------- tiny builders


def write_clip_tokenizer_files(directory: Path) -> None:
    """The real CLIP BPE (open_clip ships it) as vocab.json + merges.txt, the HF layout."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_clip_config(projection_dim: int):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": IMAGE_SIDE,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=projection_dim,
    )


def tiny_clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> Path:
    """A tiny PickScore_v1-style CLIPModel directory with CLIP-ViT-H-14-style processor files."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(projection_dim=16)).save_pretrained(directory)
    write_clip_tokenizer_files(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer", model_max_length=77)
    CLIPProcessor(image_processor=tiny_clip_image_processor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


HPS_TEST_ARCH = "spin-ray-test-tiny-hps"


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory) -> Path:
    """A tiny open_clip ViT in HPS_v2_compressed.pt's format ({'state_dict': ...})."""
    import open_clip

    directory = tmp_path_factory.mktemp("hps")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE_SIDE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    config_file = directory / f"{HPS_TEST_ARCH}.json"  # open_clip names the architecture after the file
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.create_model(HPS_TEST_ARCH, pretrained=None)
    path = directory / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CLIPModel (projection_dim 768, the head's input) and a random head state dict."""
    from transformers import CLIPModel

    directory = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(projection_dim=768)).save_pretrained(directory / "clip-vit-large-patch14")
    tiny_clip_image_processor().save_pretrained(directory / "clip-vit-large-patch14")
    head = RewardMLP(768)
    torch.save(head.state_dict(), directory / "sac+logos+ava1-l14-linearMSE.pth")
    return directory / "clip-vit-large-patch14", directory / "sac+logos+ava1-l14-linearMSE.pth"


TINY_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 40,
    "encoder_width": 32,
    "add_cross_attention": True,
}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "of", "photo", "cat", "red", "car", "on", "road",
              "an", "astronaut", "riding", "horse", "bowl", "fruit", ","]


def tiny_blip_vision_config():
    from transformers import BlipVisionConfig

    return BlipVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIDE, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
    )


class ImageRewardReference:
    """The tiny towers the ImageReward.pt test file is written from.

    The ViT is timm's VisionTransformer, whose parameter names are those of BLIP's ViT, so the
    file is written without the production key mapping and checks it independently.
    """

    def __init__(self) -> None:
        import timm.models.vision_transformer as vit
        from transformers import BlipTextConfig, BlipTextModel

        torch.manual_seed(0)
        self.vit = vit.VisionTransformer(
            img_size=IMAGE_SIDE, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
            qkv_bias=True, num_classes=0, global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ).eval()
        text_config = BlipTextConfig(
            vocab_size=TINY_MED_CONFIG["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32, is_decoder=True,
        )
        self.text = BlipTextModel(text_config, add_pooling_layer=False).eval()
        self.head = RewardMLP(32).eval()
        for parameter in self.head.parameters():  # the default init leaves the score near constant
            torch.nn.init.normal_(parameter, std=0.3)

    def checkpoint(self) -> dict[str, torch.Tensor]:
        state = {f"blip.visual_encoder.{k}": v for k, v in self.vit.state_dict().items()}
        state |= {f"blip.text_encoder.{k}": v for k, v in self.text.state_dict().items()}
        state |= {f"mlp.{k}": v for k, v in self.head.state_dict().items()}
        # Present in the published file, unused by the reward.
        state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)
        state["blip.vision_proj.weight"] = torch.zeros(256, 32)
        state["blip.text_proj.weight"] = torch.zeros(256, 32)
        return state


@pytest.fixture(scope="module")
def image_reward_reference() -> ImageRewardReference:
    return ImageRewardReference()


@pytest.fixture(scope="module")
def image_reward_dir(tmp_path_factory, image_reward_reference) -> Path:
    directory = tmp_path_factory.mktemp("imagereward")
    torch.save(image_reward_reference.checkpoint(), directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    (directory / "bert-base-uncased").mkdir()
    (directory / "bert-base-uncased" / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return directory


@pytest.fixture(scope="module")
def scorers(pickscore_dir, hps_file, aesthetic_files, image_reward_dir) -> dict[str, Scorer]:
    clip_path, head_path = aesthetic_files
    return {
        "pickscore": load_scorer("pickscore", model_path=pickscore_dir, batch_size=3),
        "hpsv2": load_scorer("hpsv2", weights_path=hps_file, model_name=HPS_TEST_ARCH, batch_size=3),
        "aesthetic": load_scorer("aesthetic", clip_path=clip_path, head_path=head_path, batch_size=3),
        "imagereward": load_scorer(
            "imagereward", path=image_reward_dir, vision_config=tiny_blip_vision_config(), batch_size=3
        ),
    }


# ----------------------------------------------------------------------------- shared contract

BUILT = ["pickscore", "hpsv2", "aesthetic", "imagereward"]


@pytest.mark.parametrize("name", BUILT)
def test_scores_are_float32_one_per_image_and_deterministic(scorers, images, name):
    scorer = scorers[name]
    assert isinstance(scorer, Scorer)
    assert scorer.name == name
    first = scorer.score(images, PROMPTS)
    assert first.shape == (len(images),)
    assert first.dtype == np.float32
    assert np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, scorer.score(images, PROMPTS))
    assert np.ptp(first) > 0, "random towers should tell random images apart"


@pytest.mark.parametrize("name", BUILT)
def test_scores_do_not_depend_on_batch_size(scorers, images, name):
    scorer = scorers[name]
    batched = scorer.score(images, PROMPTS)  # batch_size 3: one full and one partial batch
    scorer.batch_size = 1
    try:
        one_by_one = scorer.score(images, PROMPTS)
    finally:
        scorer.batch_size = 3
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BUILT)
def test_scorer_rejects_unpaired_inputs(scorers, images, name):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorers[name].score(images, PROMPTS[:2])
    assert scorers[name].score([], []).shape == (0,)


def test_directory_shorthand_matches_explicit_paths(scorers, pickscore_dir, hps_file, aesthetic_files, images):
    reference = {name: scorers[name].score(images, PROMPTS) for name in ("pickscore", "hpsv2", "aesthetic")}
    shorthand = {
        "pickscore": load_scorer("pickscore", path=pickscore_dir),
        "hpsv2": load_scorer("hpsv2", path=hps_file.parent, model_name=HPS_TEST_ARCH),  # finds HPS_v2_compressed.pt
        "aesthetic": load_scorer("aesthetic", path=aesthetic_files[0].parent),
    }
    for name, scorer in shorthand.items():
        np.testing.assert_allclose(scorer.score(images, PROMPTS), reference[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes no path"):
        load_scorer("toy", path=pickscore_dir)


def test_importing_the_package_does_not_import_the_model_libraries():
    code = "import sys, spin_ray.rewards; sys.exit(int(any(m in sys.modules for m in ('transformers', 'open_clip'))))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_unknown_scorer_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="pickscore"):
        load_scorer("clipscore")
    assert set(SCORER_NAMES) == {"pickscore", "hpsv2", "aesthetic", "imagereward", "toy"}


def test_bad_dtype_option_is_named(pickscore_dir):
    with pytest.raises(ValueError, match="dtype option 'fp8'"):
        load_scorer("pickscore", model_path=pickscore_dir, dtype="fp8")


@pytest.mark.skipif(importlib.util.find_spec("spin_ray.toy.reward") is None, reason="spin_ray/toy/reward.py not written yet")
def test_toy_scorer_is_registered():
    from spin_ray.toy.reward import ToyScorer

    assert isinstance(load_scorer("toy"), ToyScorer)
    # The options the evaluation passes to every scorer are accepted.
    toy = load_scorer("toy", device="cuda", dtype="bfloat16", batch_size=4)
    assert isinstance(toy, Scorer) and toy.name == "toy"
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    scores = toy.score(make_images([(32, 32), (32, 32)]), prompts)
    assert scores.shape == (2,) and scores.dtype == np.float32


# ----------------------------------------------------------------------------- formulas by hand


def normalise(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def mlp_by_hand(head_state: dict[str, torch.Tensor], features: np.ndarray, prefix: str = "") -> np.ndarray:
    """The head has no activations: five affine maps in a row (dropout is off at inference)."""
    out = features.astype(np.float64)
    for index in (0, 2, 4, 6, 7):
        weight = head_state[f"{prefix}layers.{index}.weight"].double().numpy()
        bias = head_state[f"{prefix}layers.{index}.bias"].double().numpy()
        out = out @ weight.T + bias
    return out[:, 0]


def test_pickscore_is_scaled_cosine_of_clip_embeddings(scorers, pickscore_dir, images):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    processor = CLIPProcessor.from_pretrained(pickscore_dir)
    with torch.no_grad():
        pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text_emb = np.concatenate([
            model.get_text_features(**processor(text=[prompt], return_tensors="pt")).pooler_output.numpy()
            for prompt in PROMPTS
        ])
    expected = np.exp(model.logit_scale.item()) * np.sum(normalise(image_emb) * normalise(text_emb), axis=-1)
    np.testing.assert_allclose(scorers["pickscore"].score(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)


def test_hps_is_raw_cosine_of_open_clip_embeddings(scorers, hps_file, images):
    import open_clip

    from spin_ray.rewards.hps import hps_preprocess

    preprocess = hps_preprocess(IMAGE_SIDE)
    model = open_clip.create_model(HPS_TEST_ARCH, pretrained=None)
    model.load_state_dict(torch.load(hps_file, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(HPS_TEST_ARCH)
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images])).numpy()
        text_emb = model.encode_text(tokenizer(PROMPTS)).numpy()
    expected = np.sum(normalise(image_emb) * normalise(text_emb), axis=-1)
    scores = scorers["hpsv2"].score(images, PROMPTS)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)


def test_hps_preprocess_scales_the_longest_side_and_pads_with_black():
    from spin_ray.rewards.hps import hps_preprocess

    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    white = Image.new("RGB", (64, 32), (255, 255, 255))  # 2:1 -> 32x16 content, 8 black rows above and below
    pixels = hps_preprocess(IMAGE_SIDE)(white).numpy()
    assert pixels.shape == (3, IMAGE_SIDE, IMAGE_SIDE)
    black, full = -mean / std, (1 - mean) / std
    np.testing.assert_allclose(pixels[:, :8, :], np.broadcast_to(black[:, None, None], (3, 8, 32)), atol=1e-5)
    np.testing.assert_allclose(pixels[:, 24:, :], np.broadcast_to(black[:, None, None], (3, 8, 32)), atol=1e-5)
    np.testing.assert_allclose(pixels[:, 10:22, 2:30], np.broadcast_to(full[:, None, None], (3, 12, 28)), atol=1e-3)


def test_aesthetic_is_linear_head_on_normalised_clip_embedding(scorers, aesthetic_files, images):
    from transformers import CLIPModel

    clip_path, head_path = aesthetic_files
    model = CLIPModel.from_pretrained(clip_path).eval()
    with torch.no_grad():
        pixels = tiny_clip_image_processor()(images=[im.convert("RGB") for im in images], return_tensors="pt")
        embedding = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output.numpy()
    expected = mlp_by_hand(torch.load(head_path, weights_only=True), normalise(embedding))
    scores = scorers["aesthetic"].score(images, PROMPTS)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    # The prompt plays no part in the aesthetic score.
    np.testing.assert_array_equal(scores, scorers["aesthetic"].score(images, ["x"] * len(images)))


def blip_pixels_by_hand(images: list[Image.Image]) -> torch.Tensor:
    """ImageReward's transform for images already IMAGE_SIDE square: to [0, 1], BLIP mean/std."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    arrays = [(np.asarray(image, dtype=np.float64) / 255.0 - mean) / std for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)).float()


def test_image_reward_formula_against_reference_towers(scorers, image_reward_reference, image_reward_dir):
    from transformers import BertTokenizer

    square = make_images([(IMAGE_SIDE, IMAGE_SIDE)] * 4, seed=3)
    reference = image_reward_reference
    tokenizer = BertTokenizer.from_pretrained(image_reward_dir / "bert-base-uncased")
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = reference.vit.forward_features(blip_pixels_by_hand(square))  # BLIP's visual_encoder
        hidden = reference.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state[:, 0, :].numpy()
    raw = mlp_by_hand(reference.head.state_dict(), hidden)
    expected = (raw - 0.16717362830052426) / 1.0333394966054072
    np.testing.assert_allclose(scorers["imagereward"].score(square, PROMPTS), expected, rtol=1e-4, atol=1e-4)


def test_image_reward_text_is_truncated_to_35_tokens(scorers):
    tokens = scorers["imagereward"].tokenizer(["cat " * 100], padding="max_length", truncation=True, max_length=35)
    assert len(tokens["input_ids"][0]) == 35
    long_prompt = ["a photo of a cat " + "red car " * 40]
    image = make_images([(IMAGE_SIDE, IMAGE_SIDE)], seed=5)
    longer = ["a photo of a cat " + "red car " * 60]
    np.testing.assert_array_equal(
        scorers["imagereward"].score(image, long_prompt), scorers["imagereward"].score(image, longer)
    )


# ----------------------------------------------------------------------------- published layouts


def test_image_reward_key_mapping_covers_the_full_size_vit():
    """Every BlipVisionModel parameter of ViT-L/16 has a BLIP (timm-layout) name, one to one."""
    import timm.models.vision_transformer as vit
    from transformers import BlipVisionModel

    from spin_ray.rewards.image_reward import (
        blip_vit_key_to_transformers,
        image_reward_vision_config,
        transformers_key_to_blip_vit,
    )

    with torch.device("meta"):
        ours = BlipVisionModel(image_reward_vision_config()).state_dict()
        blip = vit.VisionTransformer(
            img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, qkv_bias=True,
            num_classes=0, global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ).state_dict()
    assert {transformers_key_to_blip_vit(k) for k in ours} == set(blip)
    assert {blip_vit_key_to_transformers(k) for k in blip} == set(ours)
    assert all(ours[blip_vit_key_to_transformers(k)].shape == v.shape for k, v in blip.items())


def test_image_reward_text_keys_are_blip_med_bert_names():
    """Names of BLIP's med.py BertModel (what ImageReward.pt holds) exist in BlipTextModel as they are."""
    from transformers import BlipTextConfig, BlipTextModel

    with torch.device("meta"):
        keys = set(BlipTextModel(BlipTextConfig(encoder_hidden_size=1024, is_decoder=True), add_pooling_layer=False)
                   .state_dict())
    for name in [
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias", "encoder.layer.11.crossattention.self.key.weight",
        "encoder.layer.11.crossattention.output.dense.bias", "encoder.layer.3.intermediate.dense.weight",
        "encoder.layer.3.output.dense.weight", "encoder.layer.3.output.LayerNorm.weight",
    ]:
        assert name in keys
    assert keys and not any(key.startswith("pooler") for key in keys)


@pytest.mark.skipif(not AESTHETIC_HEAD.is_file(), reason="../shared/weights is not available")
def test_aesthetic_loads_the_published_laion_head(aesthetic_files, images):
    clip_path, _ = aesthetic_files
    scorer = load_scorer("aesthetic", clip_path=clip_path, head_path=AESTHETIC_HEAD)
    published = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)  # saved from cuda:0
    for key, value in published.items():
        torch.testing.assert_close(scorer.head.state_dict()[key], value.float())
    scores = scorer.score(images, PROMPTS)
    assert scores.shape == (len(images),) and scores.dtype == np.float32 and np.all(np.isfinite(scores))


# ----------------------------------------------------------------------------- wrong files


def test_missing_files_are_named(tmp_path, pickscore_dir, aesthetic_files):
    clip_path, _ = aesthetic_files
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_scorer("hpsv2", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_scorer("aesthetic", clip_path=clip_path, head_path=tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        load_scorer("imagereward", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):
        load_scorer("pickscore", model_path=tmp_path / "absent")


def test_clip_directory_with_a_missing_weight_is_named(tmp_path, aesthetic_files):
    import shutil

    from safetensors.torch import load_file, save_file

    clip_path, head_path = aesthetic_files
    broken = tmp_path / "clip-vit-large-patch14"
    shutil.copytree(clip_path, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"clip-vit-large-patch14 does not match .*missing keys \[visual_projection\.weight\]"):
        load_scorer("aesthetic", clip_path=broken, head_path=head_path)


def test_hps_file_with_a_missing_key_is_named(tmp_path, hps_file):
    state = torch.load(hps_file, weights_only=True)["state_dict"]
    del state["visual.proj"]
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save(state, path)  # also the plain-state-dict form
    with pytest.raises(WeightsError, match=r"HPS_v2\.1_compressed\.pt.*missing keys \[visual\.proj\]"):
        load_scorer("hpsv2", path=tmp_path, model_name=HPS_TEST_ARCH)


def test_aesthetic_head_of_wrong_width_is_named(tmp_path, aesthetic_files):
    clip_path, _ = aesthetic_files
    path = tmp_path / "head.pth"
    torch.save(RewardMLP(512).state_dict(), path)
    with pytest.raises(WeightsError, match=r"head\.pth.*layers\.0\.weight: file \(1024, 512\) vs expected \(1024, 768\)"):
        load_scorer("aesthetic", clip_path=clip_path, head_path=path)


def test_image_reward_missing_key_is_named_in_the_files_layout(tmp_path, image_reward_dir, image_reward_reference):
    state = image_reward_reference.checkpoint()
    del state["blip.visual_encoder.blocks.1.attn.proj.weight"]
    path = tmp_path / "ImageReward.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"ImageReward\.pt.*missing keys \[blip\.visual_encoder\.blocks\.1\.attn\.proj\.weight\]"):
        load_scorer(
            "imagereward", path=image_reward_dir, weights_path=path, vision_config=tiny_blip_vision_config()
        )


def test_image_reward_config_that_does_not_fit_the_file_is_named(image_reward_dir):
    # The file holds a 32-wide ViT; this config asks for a 64-wide one.
    from transformers import BlipVisionConfig

    wide = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=IMAGE_SIDE, patch_size=16, layer_norm_eps=1e-6)
    with pytest.raises(WeightsError, match=r"ImageReward\.pt.*shape mismatch.*blip\.visual_encoder\.blocks\.0\.attn\.proj\.bias: file \(32,\) vs expected \(64,\)"):
        load_scorer("imagereward", path=image_reward_dir, vision_config=wide)


def test_image_reward_unexpected_key_is_named(tmp_path, image_reward_dir, image_reward_reference):
    state = image_reward_reference.checkpoint()
    state["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(WeightsError, match=r"unexpected keys \[blip\.itm_head\.weight\]"):
        load_scorer("imagereward", path=image_reward_dir, weights_path=tmp_path / "ImageReward.pt",
                    vision_config=tiny_blip_vision_config())


def test_bfloat16_towers_still_return_float32_close_to_float32(scorers, image_reward_dir, images):
    low = load_scorer("imagereward", path=image_reward_dir, vision_config=tiny_blip_vision_config(), dtype="bfloat16")
    scores = low.score(images, PROMPTS)
    assert scores.dtype == np.float32
    reference = scorers["imagereward"].score(images, PROMPTS)
    np.testing.assert_allclose(scores, reference, rtol=0.05, atol=0.05 * np.abs(reference).max())
