"""The shipped toy base model theta_0 draws the prompt (a floor a blob-drawing model fails),
and the build that makes it runs end to end and loads through diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from spin_ray.toy.base_model import (
    ASSET_DIR,
    ASSET_RESOLUTION,
    BuildRecipe,
    build_toy_base_model,
    finetune_phase,
    finetune_pretrained,
    pretrain_phase,
)
from spin_ray.toy.reward import ToyScorer
from spin_ray.toy.world import validation_prompts

BASE_FLOOR = 0.15
"""The issue's lower bound for theta_0's mean toy reward; the old blob-drawing base scored 0.01."""
FLOOR_PROMPTS = 16


def _generate(pipe: StableDiffusionPipeline, prompts: list[str], seed: int) -> list:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=20, guidance_scale=1.0, generator=generator,
                height=ASSET_RESOLUTION, width=ASSET_RESOLUTION).images


@pytest.fixture(scope="module")
def shipped() -> StableDiffusionPipeline:
    if not (ASSET_DIR / "model_index.json").exists():
        pytest.fail(f"the toy base model is not in {ASSET_DIR}; build it with python -m spin_ray.toy.base_model")
    return StableDiffusionPipeline.from_pretrained(str(ASSET_DIR), safety_checker=None, local_files_only=True,
                                                   use_safetensors=True)


def test_shipped_base_is_sd_shaped(shipped):
    assert isinstance(shipped.unet, UNet2DConditionModel)
    assert isinstance(shipped.vae, AutoencoderKL)
    assert isinstance(shipped.text_encoder, CLIPTextModel)
    assert isinstance(shipped.tokenizer, CLIPTokenizer)
    assert isinstance(shipped.scheduler, DDIMScheduler)
    size = sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file())
    assert size < 20 << 20, f"the shipped toy base model is {size / 2**20:.1f} MiB; keep it under 20 MiB"


def test_shipped_base_draws_the_prompts(shipped):
    """Held-out prompts, fixed seeds: the mean toy reward stays above the floor."""
    prompts = validation_prompts()[:FLOOR_PROMPTS]
    images = _generate(shipped, prompts, seed=0)
    scores = ToyScorer().score(images, prompts)
    assert float(np.mean(scores)) >= BASE_FLOOR, scores


def test_build_runs_and_loads_through_diffusers(tmp_path):
    """A very short build through the real code path: the saved directory is a pipeline."""
    recipe = BuildRecipe(vae_steps=2, denoiser_steps=2, finetune_steps=2, batch_size=4, vae_batch_size=4,
                         pool_size=8)
    out = build_toy_base_model(tmp_path / "base", resolution=16, recipe=recipe)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, local_files_only=True,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red circle on a blue background"], num_inference_steps=2, height=16, width=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
    # The latents were rescaled to unit variance (SD's own factor would be 0.18215).
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)


def test_phase_three_alone_fine_tunes_a_saved_pipeline(tmp_path):
    """``--finetune-only``: phase 3 on a saved pipeline changes its UNet and saves a pipeline."""
    recipe = BuildRecipe(vae_steps=1, denoiser_steps=1, finetune_steps=3, batch_size=4, vae_batch_size=4,
                         pool_size=8)
    before = build_toy_base_model(tmp_path / "before", resolution=16, recipe=recipe)
    after = finetune_pretrained(before, tmp_path / "after", resolution=16, recipe=recipe)
    load = lambda path: StableDiffusionPipeline.from_pretrained(  # noqa: E731
        str(path), safety_checker=None, local_files_only=True, use_safetensors=True)
    old, new = load(before).unet.state_dict(), load(after).unet.state_dict()
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[name], new[name]) for name in old)


def test_phases_draw_from_different_worlds_and_streams():
    """Phase 2 learns the blurred, washed-out world; phase 3 the crisp one, from its own seeds."""
    recipe = BuildRecipe()
    pretrain, finetune = pretrain_phase(recipe), finetune_phase(recipe)
    assert pretrain.low_level and not finetune.low_level
    assert pretrain.seed != finetune.seed
    assert (pretrain.steps, pretrain.lr, pretrain.shift) == (recipe.denoiser_steps, recipe.denoiser_lr, recipe.shift)
    assert (finetune.steps, finetune.lr, finetune.shift) == (
        recipe.finetune_steps, recipe.finetune_lr, recipe.finetune_shift)
