"""The diffusion model layer on the tiny pipeline, loaded through the production loader."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from spin_ray.diffusion import (
    SDComponents,
    decode_latents,
    download_pipeline,
    encode_images,
    encode_prompt_ids,
    image_to_tensor,
    is_hub_id,
    load_components,
    load_unet,
    noisy_latents,
    predict_noise,
    row_noise_and_timesteps,
    sample_latents,
    save_pipeline,
    to_pil,
    tokenize,
    training_target,
)
from spin_ray.tiny import build_tiny_pipeline, sd15_ddim_scheduler

RESOLUTION = 128  # the shared tiny pipeline: 16x16 latents, VAE factor 8
LATENT_SHAPE = (4, 16, 16)
STEPS = 3


def _embeds(components: SDComponents, prompts: list[str]) -> torch.Tensor:
    return encode_prompt_ids(components.text_encoder, tokenize(components.tokenizer, prompts))


def _sample(components: SDComponents, prompts: list[str], seeds: list[int], **kwargs: float) -> torch.Tensor:
    options = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "latent_shape": LATENT_SHAPE} | kwargs
    negative = _embeds(components, [""])
    return sample_latents(
        components.unet, components.scheduler, _embeds(components, prompts), negative, seeds, **options
    )


# ----------------------------------------------------------------------------- load / save


def test_load_components_matches_built_weights_and_freezes_encoders(tiny_components: SDComponents) -> None:
    built = build_tiny_pipeline(seed=0, sample_size=16)
    for part in ("unet", "vae", "text_encoder"):
        loaded = getattr(tiny_components, part).state_dict()
        expected = getattr(built, part).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), part
    for frozen in (tiny_components.vae, tiny_components.text_encoder):
        assert not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in tiny_components.unet.parameters())
    assert isinstance(tiny_components.scheduler, DDIMScheduler)
    assert tiny_components.scheduler.config.beta_schedule == "scaled_linear"


def test_geometry(tiny_components: SDComponents) -> None:
    assert tiny_components.latent_channels == 4
    assert tiny_components.vae_scale_factor == 8
    assert tiny_components.latent_size(RESOLUTION) == 16
    assert tiny_components.latent_shape(RESOLUTION) == LATENT_SHAPE
    with pytest.raises(ValueError, match="resolution 100 is not a multiple of the VAE scale factor 8"):
        tiny_components.latent_size(100)


def test_save_pipeline_round_trip_with_a_new_unet(tiny_components: SDComponents, tmp_path: Path) -> None:
    unet = build_tiny_pipeline(seed=7, sample_size=16).unet
    out = save_pipeline(tiny_components, tmp_path / "theta_1", unet=unet)
    assert not list(out.rglob("*.bin"))

    reloaded = load_components(str(out), local_files_only=True)
    expected = unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.unet.state_dict().items())
    vae = tiny_components.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in reloaded.vae.state_dict().items())

    pipe = StableDiffusionPipeline.from_pretrained(out)  # plain diffusers, no spin-ray involved
    assert pipe.safety_checker is None
    image = pipe("a red cube", num_inference_steps=2, guidance_scale=3.0, output_type="pil").images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


def test_load_unet_from_pipeline_dir_and_from_unet_dir(
    tiny_pipeline_dir: Path, tiny_components: SDComponents
) -> None:
    expected = tiny_components.unet.state_dict()
    for source in (tiny_pipeline_dir, tiny_pipeline_dir / "unet"):
        unet = load_unet(str(source), local_files_only=True)
        assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())


def test_load_unet_names_what_is_wrong(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    vae_config = tiny_pipeline_dir / "vae" / "config.json"
    expected = f"{vae_config}: describes a AutoencoderKL, expected a UNet2DConditionModel"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_unet(str(tiny_pipeline_dir / "vae"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'unet'}: no UNet here")):
        load_unet(str(tmp_path), local_files_only=True)


def test_missing_component_is_named(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no_unet"
    shutil.copytree(
        tiny_pipeline_dir, broken, ignore=lambda d, names: ["unet"] if d == str(tiny_pipeline_dir) else []
    )
    with pytest.raises(FileNotFoundError, match=re.escape(f"{broken}: missing component 'unet/'")):
        load_components(str(broken), local_files_only=True)


def test_missing_dir_and_missing_index_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such directory")):
        load_components(str(tmp_path / "nowhere"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'model_index.json'}: missing")):
        load_components(str(tmp_path), local_files_only=True)


def test_download_pipeline_returns_local_dirs_and_names_a_missing_hub_id(tiny_pipeline_dir: Path) -> None:
    assert download_pipeline(str(tiny_pipeline_dir)) == str(tiny_pipeline_dir)
    with pytest.raises(OSError, match="cannot fetch Stable Diffusion pipeline 'nobody-here/no-such-model'"):
        download_pipeline("nobody-here/no-such-model", local_files_only=True)


@pytest.mark.parametrize(("location", "hub"), [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", True),
    ("CompVis/stable-diffusion-v1-4", True),
    ("org_1/model.v2", True),
    # The loaders took a bare name for a hub id and the evaluation did not: now neither does.
    ("my-model", False),
    ("sd15", False),
    # Paths, never hub ids.
    ("runs/missing/iter_1/model", False),
    ("./org/name", False),
    ("~/org/name", False),
    ("/abs/name", False),
    ("org/..", False),
    ("org--x/name", False),
    ("s3://bucket/run/iter_1/model", False),
    ("", False),
])
def test_is_hub_id(location: str, hub: bool, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(location) is hub


def test_an_existing_directory_named_like_a_hub_id_is_local(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")


def test_a_missing_bare_name_is_a_missing_directory_not_a_failed_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="my-model: no such directory"):
        download_pipeline("my-model", local_files_only=True)


# ----------------------------------------------------------------------------- images and prompts


def _wide_image_with_red_centre(mode: str) -> Image.Image:
    """90x40: blue left and right thirds, red middle third."""
    pixels = np.zeros((40, 90, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 30:60] = (255, 0, 0)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK"])
def test_image_to_tensor_shape_range_and_centre_crop(mode: str) -> None:
    tensor = image_to_tensor(_wide_image_with_red_centre(mode), 24)
    assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    centre = tensor[:, 12, 12]
    if mode == "L":
        assert torch.allclose(centre, centre[0].expand(3))  # grey stays grey in all channels
    else:
        # The crop keeps the red middle (the blue edges are cut off).
        assert centre[0] > 0.9 and centre[2] < -0.9


def test_image_to_tensor_puts_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (33, 17), (0, 0, 0, 0))
    assert torch.allclose(image_to_tensor(rgba, 8), torch.ones(3, 8, 8))
    palette = Image.new("P", (20, 31), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert torch.allclose(image_to_tensor(palette, 8), torch.ones(3, 8, 8))


def test_image_to_tensor_tall_odd_size() -> None:
    tensor = image_to_tensor(Image.new("L", (7, 101), 0), 16)
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor, -torch.ones(3, 16, 16))


def test_tokenize_and_encode_prompts(tiny_components: SDComponents) -> None:
    ids = tokenize(tiny_components.tokenizer, ["a cat", "cat " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407]
    embeds = encode_prompt_ids(tiny_components.text_encoder, ids)
    assert embeds.shape == (2, 77, 32) and embeds.dtype == torch.float32
    assert not embeds.requires_grad
    assert not torch.equal(embeds[0], embeds[1])


def test_encode_decode_shapes_and_determinism(tiny_components: SDComponents) -> None:
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = encode_images(tiny_components.vae, pixels)
    assert latents.shape == (2, *LATENT_SHAPE)
    assert torch.equal(latents, encode_images(tiny_components.vae, pixels))  # mean, not a sample
    unscaled = tiny_components.vae.encode(pixels).latent_dist.mean
    assert torch.allclose(latents, unscaled * tiny_components.vae.config.scaling_factor)
    images = decode_latents(tiny_components.vae, latents)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert images.min() >= 0.0 and images.max() <= 1.0
    pil = to_pil(images)
    assert [(p.mode, p.size) for p in pil] == [("RGB", (RESOLUTION, RESOLUTION))] * 2
    assert np.array_equal(np.asarray(pil[1]), (images[1].permute(1, 2, 0) * 255).round().byte().numpy())


# ----------------------------------------------------------------------------- training noise


def test_row_noise_is_reproducible_per_row() -> None:
    first = row_noise_and_timesteps([11, 22, 33], LATENT_SHAPE, 1000)
    again = row_noise_and_timesteps([11, 22, 33], LATENT_SHAPE, 1000)
    alone = row_noise_and_timesteps([22], LATENT_SHAPE, 1000)
    assert first.noise_real.shape == (3, *LATENT_SHAPE) and first.timesteps.shape == (3,)
    assert first.timesteps.dtype == torch.int64
    assert ((first.timesteps >= 0) & (first.timesteps < 1000)).all()
    assert torch.equal(first.noise_real, again.noise_real) and torch.equal(first.timesteps, again.timesteps)
    assert torch.equal(first.noise_real[1], alone.noise_real[0]) and first.timesteps[1] == alone.timesteps[0]
    assert not torch.equal(first.noise_real[0], first.noise_real[1])


def test_row_noise_shared_and_independent() -> None:
    shared = row_noise_and_timesteps([5, 6], LATENT_SHAPE, 1000, shared_noise=True)
    independent = row_noise_and_timesteps([5, 6], LATENT_SHAPE, 1000, shared_noise=False)
    assert torch.equal(shared.noise_syn, shared.noise_real)
    # The flag changes only the synthetic draw: t and eps stay the same.
    assert torch.equal(independent.noise_real, shared.noise_real)
    assert torch.equal(independent.timesteps, shared.timesteps)
    assert not torch.allclose(independent.noise_syn, independent.noise_real)
    assert abs(float(independent.noise_syn.std()) - 1.0) < 0.1


def test_row_noise_timesteps_cover_the_range() -> None:
    draw = row_noise_and_timesteps(range(400), (1, 1, 1), 10)
    assert set(draw.timesteps.tolist()) == set(range(10))


def test_noisy_latents_and_targets_follow_the_forward_process() -> None:
    scheduler = sd15_ddim_scheduler()
    latents, noise = torch.randn(2, *LATENT_SHAPE), torch.randn(2, *LATENT_SHAPE)
    timesteps = torch.tensor([0, 999])
    abar = scheduler.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    noisy = noisy_latents(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    assert torch.equal(training_target(scheduler, latents, noise, timesteps), noise)
    v_scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    torch.testing.assert_close(
        training_target(v_scheduler, latents, noise, timesteps),
        abar.sqrt() * noise - (1 - abar).sqrt() * latents,
    )
    bad = DDIMScheduler.from_config(scheduler.config, prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type: 'flow'"):
        training_target(bad, latents, noise, timesteps)


def test_predict_noise_shape_and_gradient(tiny_components: SDComponents) -> None:
    noisy = torch.randn(3, *LATENT_SHAPE)
    embeds = _embeds(tiny_components, ["a", "b", "c"])
    prediction = predict_noise(tiny_components.unet, noisy, torch.tensor([1, 500, 999]), embeds)
    assert prediction.shape == noisy.shape
    prediction.square().mean().backward()
    assert tiny_components.unet.conv_out.weight.grad is not None


# ----------------------------------------------------------------------------- sampling


def test_sampling_shape_determinism_and_row_independence(tiny_components: SDComponents) -> None:
    prompts, seeds = ["a red cube", "a blue ball", "a green tree"], [10, 20, 30]
    batch = _sample(tiny_components, prompts, seeds)
    assert batch.shape == (3, *LATENT_SHAPE) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    assert torch.equal(batch, _sample(tiny_components, prompts, seeds))
    alone = _sample(tiny_components, prompts[1:2], seeds[1:2])
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[0], _sample(tiny_components, prompts[:1], [11])[0])


def test_sampling_matches_diffusers_pipeline(tiny_components: SDComponents) -> None:
    prompt_embeds = _embeds(tiny_components, ["a red cube", "a blue ball"])
    negative = _embeds(tiny_components, ["", ""])
    seeds = [3, 4]
    ours = sample_latents(
        tiny_components.unet,
        tiny_components.scheduler,
        prompt_embeds,
        negative,
        seeds,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        latent_shape=LATENT_SHAPE,
    )
    initial = torch.stack(
        [torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    pipe = StableDiffusionPipeline(
        **{
            part: getattr(tiny_components, part)
            for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        },
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        latents=initial,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_guidance_changes_the_result_and_one_skips_the_negative(tiny_components: SDComponents) -> None:
    guided = _sample(tiny_components, ["a red cube"], [1], guidance_scale=7.5)
    unguided = _sample(tiny_components, ["a red cube"], [1], guidance_scale=1.0)
    assert (guided - unguided).abs().max() > 1e-2
    no_negative = sample_latents(
        tiny_components.unet,
        tiny_components.scheduler,
        _embeds(tiny_components, ["a red cube"]),
        None,
        [1],
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        latent_shape=LATENT_SHAPE,
    )
    assert torch.equal(no_negative, unguided)


def test_eta_noise_is_per_row(tiny_components: SDComponents) -> None:
    stochastic = _sample(tiny_components, ["x", "y"], [1, 2], eta=1.0)
    alone = _sample(tiny_components, ["y"], [2], eta=1.0)
    torch.testing.assert_close(alone[0], stochastic[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stochastic, _sample(tiny_components, ["x", "y"], [1, 2], eta=0.0))


def test_sampling_leaves_the_callers_scheduler_alone(tiny_components: SDComponents) -> None:
    scheduler = tiny_components.scheduler
    scheduler.set_timesteps(7)
    before = scheduler.timesteps.clone()
    _sample(tiny_components, ["a"], [0])
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 7


def test_sampling_rejects_bad_inputs(tiny_components: SDComponents) -> None:
    embeds = _embeds(tiny_components, ["a", "b"])
    common = {"num_inference_steps": 2, "latent_shape": LATENT_SHAPE}
    with pytest.raises(ValueError, match="seeds: got 1 seeds for 2"):
        sample_latents(
            tiny_components.unet, tiny_components.scheduler, embeds, None, [1], guidance_scale=1.0, **common
        )
    with pytest.raises(ValueError, match="negative_embeds: required"):
        sample_latents(
            tiny_components.unet,
            tiny_components.scheduler,
            embeds,
            None,
            [1, 2],
            guidance_scale=2.0,
            **common,
        )
    with pytest.raises(ValueError, match=r"negative_embeds: shape \(3, 77, 32\)"):
        sample_latents(
            tiny_components.unet,
            tiny_components.scheduler,
            embeds,
            torch.zeros(3, 77, 32),
            [1, 2],
            guidance_scale=2.0,
            **common,
        )


@pytest.mark.gpu
def test_cuda_bf16_sampling_and_device_independent_draws(tiny_pipeline_dir: Path) -> None:
    on_cpu = row_noise_and_timesteps([1, 2], LATENT_SHAPE, 1000, shared_noise=False)
    on_gpu = row_noise_and_timesteps([1, 2], LATENT_SHAPE, 1000, "cuda", shared_noise=False)
    assert torch.equal(on_gpu.noise_real.cpu(), on_cpu.noise_real)
    assert torch.equal(on_gpu.noise_syn.cpu(), on_cpu.noise_syn)
    assert torch.equal(on_gpu.timesteps.cpu(), on_cpu.timesteps)
    components = load_components(
        str(tiny_pipeline_dir), local_files_only=True, device="cuda", dtype=torch.bfloat16
    )
    latents = _sample(components, ["a red cube", "a blue ball"], [1, 2])
    assert latents.device.type == "cuda" and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    images = decode_latents(components.vae, latents)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
