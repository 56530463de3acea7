"""The toy base model theta_0: a tiny SD-shaped pipeline, pretrained on a shifted toy world.

Like SD-1.5 before Pick-a-Pic fine-tuning, theta_0 must be plausible but imperfect: in most
images it draws a recognisable shape on a background, with systematic errors that the real
data can correct. It has SD's classes (AutoencoderKL, UNet2DConditionModel, CLIP text
encoder and tokenizer, DDIM) and is built in three phases:

1. the VAE learns to reconstruct toy renderings, correct and shifted (so decoded images mean
   something and the real data can be encoded), and its ``scaling_factor`` is set so the
   latents have unit variance, as SD's 0.18215 does;
2. the UNet **and the text encoder** learn together to denoise latents of the *shifted*
   world (:func:`spin_ray.toy.world.render_shifted`: colours and shapes sometimes wrong,
   washed out, blurred, noisy), with 10% of prompts dropped to the empty prompt so
   classifier-free guidance works. Training the text encoder is what makes the prompt
   grammar learnable: a frozen random encoder gave a model that drew blobs. The saved
   weights are an exponential moving average of the training weights (as diffusion models
   are usually published), which draws cleaner shapes than the last step's weights;
3. both are fine-tuned on a *crisp* shifted world (``render_shifted(..., low_level=False)`` at
   ``finetune_shift``: colours wrong in half the images and shapes in a quarter, but drawn
   sharply). Without this phase every sample of theta_0 is blurred, washed out and noisy and
   no real image is, so SPIN's implicit classifier separates real from synthetic by those
   prompt-independent flaws within a few steps and learns nothing about the prompt (measured:
   no gain over three iterations); with it, what tells theta_0's images from the data is
   mostly what the prompt asks for, which is what self-play is meant to correct.

All phases draw their images from a fixed pool rendered once (rendering and VAE-encoding
every step would cost more than the UNet). They share the trainer's optimizer step
(:func:`spin_ray.train_loop.optimizer_step`: clipping, the schedule, a non-finite step
skipped) but not its loop: :func:`~spin_ray.train_loop.run_steps` trains theta's UNet on
streamed pair batches with reports and checkpoints to resume from, while these loops train
a VAE, or a UNet with its text encoder, on their own losses over an in-memory pool, update
an EMA after every step, and rebuild in minutes rather than resume. The package ships the result
(``assets/base_model``, built by ``python -m spin_ray.toy.base_model``); other resolutions
are built on first use and cached.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spin_ray.file_modes import dir_mode
from spin_ray.train_loop import Optimization, optimizer_step

ASSET_DIR = Path(__file__).parent / "assets" / "base_model"
ASSET_RESOLUTION = 32
VERSION = "v3"
VAE_SCALE_FACTOR = 4
"""32x32 images, 8x8x4 latents: enough for coloured shapes, and cheap on a laptop CPU."""
VAE_BLOCK_OUT_CHANNELS = (16, 32, 64)
"""Three blocks (scale factor 4), narrow at full resolution where each channel costs most."""
CONDITION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class BuildRecipe:
    """Everything the build depends on; the shipped assets record the values they used."""

    seed: int = 0
    vae_steps: int = 1200
    vae_lr: float = 2e-3
    vae_batch_size: int = 64
    denoiser_steps: int = 4000
    denoiser_lr: float = 2e-3
    batch_size: int = 128
    pool_size: int = 8192
    """Images rendered once per phase and sampled from (with replacement) every step."""
    shift: float = 0.6
    """How far the base model's pretraining world is off (see ``render_shifted``)."""
    finetune_steps: int = 800
    finetune_lr: float = 3e-4
    finetune_shift: float = 1.0
    """The fine-tuning world: colours and shapes wrong as often as ``render_shifted`` at this
    shift, but drawn crisply (no blur, wash-out or noise); see phase 3 in the module docstring."""
    ema_decay: float = 0.995


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


def build_toy_base_model(out_dir: str | Path, *, resolution: int = ASSET_RESOLUTION,
                         recipe: BuildRecipe | None = None) -> Path:
    """Build and save the toy base model (written to a temp dir, then renamed into place)."""
    from spin_ray.tiny import build_tiny_pipeline

    recipe = recipe or BuildRecipe()
    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    pipe = build_tiny_pipeline(seed=recipe.seed, sample_size=resolution // VAE_SCALE_FACTOR,
                               vae_scale_factor=VAE_SCALE_FACTOR)
    pipe.vae = _toy_vae(resolution)
    started = time.time()
    _train_vae(pipe.vae, resolution=resolution, recipe=recipe)
    print(f"toy base: VAE trained in {time.time() - started:.0f}s", flush=True)
    _train_denoiser(pipe, resolution=resolution, recipe=recipe, phase=pretrain_phase(recipe))
    print(f"toy base: UNet and text encoder pretrained, {time.time() - started:.0f}s in all", flush=True)
    _train_denoiser(pipe, resolution=resolution, recipe=recipe, phase=finetune_phase(recipe))
    print(f"toy base: fine-tuned on the crisp world, {time.time() - started:.0f}s in all", flush=True)
    return _save(pipe, out_dir)


def finetune_pretrained(pretrained_dir: str | Path, out_dir: str | Path, *, resolution: int = ASSET_RESOLUTION,
                        recipe: BuildRecipe | None = None) -> Path:
    """Phase 3 alone, on a pipeline saved after phases 1 and 2 of the same recipe.

    Phase 3 draws from its own seeded streams, so this gives what the full build gives (up to
    float rounding) in minutes instead of an hour.
    """
    from diffusers import StableDiffusionPipeline

    recipe = recipe or BuildRecipe()
    pipe = StableDiffusionPipeline.from_pretrained(str(pretrained_dir), safety_checker=None, use_safetensors=True)
    _train_denoiser(pipe, resolution=resolution, recipe=recipe, phase=finetune_phase(recipe))
    return _save(pipe, Path(out_dir))


def _save(pipe, out_dir: Path) -> Path:
    """Save ``pipe`` to a temp dir next to ``out_dir``, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700; the renamed result is an ordinary shared folder
    pipe.save_pretrained(tmp, safe_serialization=True)
    _forget_source_paths(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _forget_source_paths(saved: Path) -> None:
    """Drop ``_name_or_path`` from the saved configs: a pipeline loaded for phase 3 records the
    builder's local directory there, which means nothing on another machine."""
    import json

    for config in saved.rglob("*.json"):
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _toy_vae(resolution: int):
    from diffusers import AutoencoderKL

    blocks = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        sample_size=resolution, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, norm_num_groups=8,
    )


def render_pool(size: int, *, seed: int, resolution: int, shift: float,
                low_level: bool = True) -> tuple[list[str], torch.Tensor]:
    """``size`` training prompts and their renderings (N, 3, R, R) in [-1, 1]; ``shift`` and
    ``low_level`` as in :func:`spin_ray.toy.world.render_shifted` (shift 0 = the true world)."""
    from spin_ray.diffusion import image_to_tensor
    from spin_ray.toy.world import shifted_rows

    rows = shifted_rows(size, seed=seed, resolution=resolution, shift=shift, low_level=low_level)
    return [prompt for prompt, _ in rows], torch.stack([image_to_tensor(image, resolution) for _, image in rows])


def _cosine_schedule(optimizer, steps: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)


def _train_vae(vae, *, resolution: int, recipe: BuildRecipe) -> None:
    """Reconstruction (L1 + MSE, a tiny KL) on correct and shifted renderings, half each."""
    half = recipe.pool_size // 2
    _, true_pixels = render_pool(half, seed=recipe.seed * 7 + 1, resolution=resolution, shift=0.0)
    _, shifted_pixels = render_pool(half, seed=recipe.seed * 7 + 2, resolution=resolution, shift=recipe.shift)
    pool = torch.cat([true_pixels, shifted_pixels])
    generator = torch.Generator().manual_seed(recipe.seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    optim = Optimization(vae, optimizer, _cosine_schedule(optimizer, recipe.vae_steps))
    for step in range(recipe.vae_steps):
        pixels = pool[torch.randint(len(pool), (recipe.vae_batch_size,), generator=generator)]
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        error = recon - pixels
        loss = error.abs().mean() + error.square().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer_step(optim, max_grad_norm=0.0)  # no clipping
        if step % 100 == 0:
            print(f"toy base: VAE step {step} reconstruction loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(pool[:512]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


@dataclass(frozen=True)
class DenoiserPhase:
    """One phase of denoiser training: its steps, peak lr, world and random streams."""

    steps: int
    lr: float
    shift: float
    low_level: bool
    seed: int


def pretrain_phase(recipe: BuildRecipe) -> DenoiserPhase:
    """Phase 2: the shifted world with its blur, wash-out and noise."""
    return DenoiserPhase(recipe.denoiser_steps, recipe.denoiser_lr, recipe.shift, True, recipe.seed)


def finetune_phase(recipe: BuildRecipe) -> DenoiserPhase:
    """Phase 3: crisp images, still with wrong colours and shapes."""
    return DenoiserPhase(recipe.finetune_steps, recipe.finetune_lr, recipe.finetune_shift, False, recipe.seed + 2)


def _train_denoiser(pipe, *, resolution: int, recipe: BuildRecipe, phase: DenoiserPhase) -> None:
    """The UNet and the text encoder, jointly, on ``phase``'s world (eps-prediction MSE)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from spin_ray.diffusion import encode_images, tokenize

    prompts, pixels = render_pool(recipe.pool_size, seed=phase.seed * 7 + 3, resolution=resolution,
                                  shift=phase.shift, low_level=phase.low_level)
    latents = torch.cat([encode_images(pipe.vae, chunk) for chunk in pixels.split(512)])
    token_ids = tokenize(pipe.tokenizer, prompts)
    empty_ids = tokenize(pipe.tokenizer, [""])
    models = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder}).train().requires_grad_(True)
    ema = AveragedModel(models, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW([
        {"params": pipe.unet.parameters(), "weight_decay": 1e-2},
        {"params": pipe.text_encoder.parameters(), "weight_decay": 0.0},  # most token rows never train
    ], lr=phase.lr)
    optim = Optimization(models, optimizer, _cosine_schedule(optimizer, phase.steps))
    generator = torch.Generator().manual_seed(phase.seed + 1)
    drop = random.Random(phase.seed)
    scheduler = pipe.scheduler
    for step in range(phase.steps):
        index = torch.randint(len(latents), (recipe.batch_size,), generator=generator)
        ids = torch.stack([empty_ids[0] if drop.random() < CONDITION_DROPOUT else token_ids[i] for i in index])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        embeds = pipe.text_encoder(ids).last_hidden_state
        pred = pipe.unet(scheduler.add_noise(x0, noise, timesteps), timesteps, embeds).sample
        loss = (_min_snr_weight(scheduler, timesteps) * (pred - noise).square().mean(dim=(1, 2, 3))).mean()
        loss.backward()
        optimizer_step(optim, max_grad_norm=1.0)
        ema.update_parameters(models)
        if step % 100 == 0:
            print(f"toy base: denoiser step {step} loss {loss.item():.4f}", flush=True)
    models.load_state_dict(ema.module.state_dict())
    models.eval().requires_grad_(False)


def _min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) for eps-prediction: min(SNR_t, gamma) / SNR_t.

    Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (ICCV 2023):
    the nearly noise-free timesteps stop dominating the gradient, which converges several
    times faster; the build's CPU budget is what matters here.
    """
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def main() -> None:
    defaults = BuildRecipe()
    parser = argparse.ArgumentParser(description="Build the toy base model shipped in spin_ray/toy/assets.")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--resolution", type=int, default=ASSET_RESOLUTION)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--denoiser-steps", type=int, default=defaults.denoiser_steps)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--finetune-only", type=Path, default=None, metavar="PRETRAINED_DIR",
                        help="run only phase 3 on a pipeline saved after phases 1-2 of the same recipe")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = BuildRecipe(vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps, pool_size=args.pool_size,
                         finetune_steps=args.finetune_steps)
    if args.finetune_only:
        finetune_pretrained(args.finetune_only, args.out, resolution=args.resolution, recipe=recipe)
    else:
        build_toy_base_model(args.out, resolution=args.resolution, recipe=recipe)


if __name__ == "__main__":
    main()
