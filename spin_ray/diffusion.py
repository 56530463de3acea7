"""The Stable Diffusion model layer: load and save pipelines, noise, predict, sample (the
image and prompt encoding lives in :mod:`spin_ray.encoding`, re-exported here).

Plain PyTorch + diffusers, no Ray. Every function takes only the model parts it uses, so the
generation actors, the preparation stage and the trainer can each hold just what they need.

Notation (SPIN-Diffusion, arXiv 2402.10210, section 3 and appendix C): a clean latent x_0,
noise eps ~ N(0, I), a training timestep t, the noised latent
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 3.1), and the model's prediction
eps_theta(x_t, c, t) for the prompt embedding c.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from spin_ray.encoding import (  # noqa: F401  (the model layer's names, as its callers import them)
    decode_latents,
    encode_images,
    encode_prompt_ids,
    image_to_tensor,
    to_pil,
    tokenize,
)
from spin_ray.errors import ModelDirError, ModelError

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""Subfolders a diffusers Stable Diffusion directory must have (plus ``model_index.json``)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline that spin-ray uses (no safety checker)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @property
    def latent_channels(self) -> int:
        """C of a latent (4 for SD 1.x)."""
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side (8 for SD 1.x and for the tiny pipeline)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, resolution: int) -> int:
        """Latent side h = w for square images of ``resolution`` pixels."""
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE scale factor {self.vae_scale_factor}"
            )
        return resolution // self.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of one latent for square images of ``resolution`` pixels."""
        side = self.latent_size(resolution)
        return (self.latent_channels, side, side)


# ----------------------------------------------------------------------------- load / save


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """Load a Stable Diffusion pipeline from a local diffusers directory or a hub id.

    Weights are read as safetensors only; no remote code runs; the safety checker is not
    loaded. The VAE and text encoder are frozen (eval, ``requires_grad=False``); the UNet is
    returned as loaded (eval mode, trainable parameters). The scheduler is a
    :class:`DDIMScheduler` built from the pipeline's scheduler config.
    """
    source = _local_pipeline_dir(pretrained) or pretrained
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            revision=revision,
            local_files_only=local_files_only,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load Stable Diffusion pipeline {pretrained!r} (revision {revision}): {err}"
        ) from err
    components = SDComponents(
        unet=_place(pipe.unet, device, dtype),
        vae=_place(pipe.vae, device, dtype),
        text_encoder=_place(pipe.text_encoder, device, dtype),
        tokenizer=pipe.tokenizer,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
    )
    for frozen in (components.vae, components.text_encoder):
        frozen.eval()
        frozen.requires_grad_(False)
    return components


def download_pipeline(pretrained: str, *, revision: str | None = None, local_files_only: bool = False) -> str:
    """The local directory of a pipeline: ``pretrained`` itself if it is a local path, else
    the hub cache folder of that hub id after fetching its safetensors files (without the
    safety checker), so several processes can then load it with ``local_files_only=True``."""
    local = _local_pipeline_dir(pretrained)
    if local:
        return local
    try:
        folder = StableDiffusionPipeline.download(
            pretrained,
            revision=revision,
            local_files_only=local_files_only,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot fetch Stable Diffusion pipeline {pretrained!r} (revision {revision}): {err}"
        ) from err
    return str(folder)


def load_unet(
    path_or_id: str,
    subfolder: str | None = "unet",
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet2DConditionModel:
    """Load a UNet alone: from ``<path_or_id>/<subfolder>``, or from a bare UNet directory
    (one holding ``config.json`` itself) when that subfolder does not exist locally."""
    if _is_local(path_or_id):
        root = Path(path_or_id).expanduser()
        path_or_id, subfolder = str(root), _local_unet_subfolder(root, subfolder)
    unet = UNet2DConditionModel.from_pretrained(
        path_or_id,
        subfolder=subfolder,
        revision=revision,
        local_files_only=local_files_only,
        use_safetensors=True,
    )
    return _place(unet, device, dtype)


def _local_unet_subfolder(root: Path, subfolder: str | None) -> str | None:
    """``subfolder`` if ``root/subfolder`` holds a UNet config, else None if ``root`` does."""
    for candidate in ([subfolder] if subfolder else []) + [None]:
        config_file = root / (candidate or "") / "config.json"
        if config_file.is_file():
            class_name = json.loads(config_file.read_text()).get("_class_name")
            if class_name != UNet2DConditionModel.__name__:
                raise ValueError(f"{config_file}: describes a {class_name}, expected a UNet2DConditionModel")
            return candidate
    where = root / subfolder if subfolder else root
    raise ModelDirError(
        f"{where}: no UNet here (expected {where / 'config.json'} and safetensors weights)"
    )


def save_pipeline(
    components: SDComponents, out_dir: str | Path, unet: UNet2DConditionModel | None = None
) -> Path:
    """Write a complete diffusers pipeline directory (safetensors) with ``unet`` (default:
    ``components.unet``), loadable by plain ``StableDiffusionPipeline.from_pretrained``."""
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device``; cast only when needed (diffusers warns on every dtype cast)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module


def is_hub_id(location: str) -> bool:
    """Whether ``location`` names a model on the Hugging Face hub rather than a local directory:
    it is no existing path and has the form ``org/name`` (letters, digits, ``_``, ``.``, ``-``;
    no ``..`` or ``--``, as the hub requires). A bare name (``my-model``), a deeper path
    (``runs/x/model``) or one starting with ``.``, ``~`` or ``/`` is a local path, so a missing
    one is reported as a missing directory rather than as a failed download. The loaders here
    and the evaluation's model check (:func:`spin_ray.eval.checks.resolve_model`) both use it."""
    if not _HUB_ID.match(location) or ".." in location or "--" in location:
        return False
    return not Path(location).expanduser().exists()


def _is_local(pretrained: str) -> bool:
    """A path that exists, or that cannot be a hub id, is a local directory."""
    return not is_hub_id(pretrained)


def _local_pipeline_dir(pretrained: str) -> str | None:
    """``pretrained`` as a checked local pipeline directory, or None when it is a hub id."""
    if not _is_local(pretrained):
        return None
    root = Path(pretrained).expanduser()
    _check_pipeline_dir(root)
    return str(root)


def _check_pipeline_dir(root: Path) -> None:
    """Fail early, naming the path and the missing part, instead of diffusers' hub errors."""
    folders = ", ".join(name + "/" for name in PIPELINE_COMPONENTS)
    expected = f"a diffusers Stable Diffusion directory with model_index.json and {folders}"
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such directory (expected {expected})")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelDirError(f"{index_file}: missing (expected {expected})")
    index = json.loads(index_file.read_text())
    for name in PIPELINE_COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None or not (root / name).is_dir():
            raise ModelDirError(f"{root}: missing component '{name}/' (expected {expected})")
    from spin_ray.model_files import check_safetensors_only  # pickle weights are never loaded

    check_safetensors_only(root)


# ----------------------------------------------------------------------------- training noise


@dataclass(frozen=True)
class RowNoise:
    """The per-row random draw of the SPIN loss (eq. 4.9 / C.5): one t and eps per sample.

    noise_real: (B, C, h, w) eps for the real branch.
    noise_syn:  (B, C, h, w) eps' for the synthetic branch; the same tensor as noise_real
                when drawn with ``shared_noise=True`` (common random numbers).
    timesteps:  (B,) int64 training timesteps t in [0, num_train_timesteps).
    """

    noise_real: torch.Tensor
    noise_syn: torch.Tensor
    timesteps: torch.Tensor


def row_noise_and_timesteps(
    seeds: Sequence[int],
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    device: str | torch.device = "cpu",
    *,
    shared_noise: bool = True,
) -> RowNoise:
    """Draw (t, eps, eps') for each row from a CPU ``torch.Generator`` seeded with that
    row's seed, so the generation side (computing theta_k's errors) and the trainer get
    bitwise the same draw from the same seed, on any device and in any batch.

    Per row the draw order is fixed: t, then eps, then (only if not shared) eps'. Seeds for
    this draw should differ from the seeds of :func:`sample_latents`, or eps would correlate
    with the opponent's initial noise.
    """
    timesteps, noise_real, noise_syn = [], [], []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        noise_real.append(torch.randn(latent_shape, generator=generator))
        if not shared_noise:
            noise_syn.append(torch.randn(latent_shape, generator=generator))
    real = torch.stack(noise_real).to(device)
    return RowNoise(
        noise_real=real,
        noise_syn=real if shared_noise else torch.stack(noise_syn).to(device),
        timesteps=torch.cat(timesteps).to(device),
    )


def noisy_latents(
    scheduler: DDIMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 3.1); all (B, C, h, w), t (B,)."""
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(
    scheduler: DDIMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to output (B, C, h, w), by ``scheduler.config.prediction_type``:
    eps (``epsilon``, SD 1.5), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (``v_prediction``),
    or x_0 (``sample``)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"scheduler.config.prediction_type: {prediction_type!r} is not one of "
        "'epsilon', 'v_prediction', 'sample'"
    )


def predict_noise(
    unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
) -> torch.Tensor:
    """The UNet output eps_theta(x_t, c, t) (B, C, h, w) for x_t (B, C, h, w), t (B,) and
    c (B, 77, D); it is v or x_0 for such schedulers (compare with :func:`training_target`).
    Works on a DDP- or compile-wrapped UNet; inputs are cast to the UNet's dtype."""
    dtype = next(unet.parameters()).dtype
    return unet(noisy.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)).sample


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    latent_shape: tuple[int, int, int],
    on_step=None,
) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance -> latents (B, C, h, w) float32, not decoded.

    prompt_embeds: (B, 77, D); negative_embeds: (B, 77, D) or (1, 77, D) (the empty prompt),
    unused and may be None when ``guidance_scale == 1``. Row i starts from noise drawn with
    ``torch.Generator().manual_seed(seeds[i])`` on the CPU (and, with ``eta > 0``, draws its
    DDIM step noise from that generator too), so a row's result does not depend on which
    other rows share its batch (up to float rounding: batched kernels may sum in a different
    order, about 1e-6 relative in float32). Guidance runs the unconditional and the conditional branch
    in one UNet batch: eps = eps_uncond + s (eps_cond - eps_uncond).

    Runs under ``no_grad`` rather than ``inference_mode``: the latents feed the trainer's
    autograd graph, which rejects inference tensors. A private scheduler copy keeps the
    caller's scheduler state untouched, so concurrent calls cannot interfere.

    ``on_step(index, t, t_prev, latents, cond_pred)``, if given, sees every step before it is
    taken: the state x_t (B, C, h, w) float32 at the sampler's ``index``-th timestep t, the
    previous timestep t_prev that the step goes to (negative at the last step) and the
    conditional prediction (B, C, h, w) float32 (:mod:`spin_ray.trajectory` records one step per row).
    """
    batch = prompt_embeds.shape[0]
    if len(seeds) != batch:
        raise ValueError(f"seeds: got {len(seeds)} seeds for {batch} prompt embeddings; expected one per row")
    use_guidance = guidance_scale != 1.0
    device = unet.device
    dtype = unet.dtype
    cond = prompt_embeds.to(device=device, dtype=dtype)
    if use_guidance:
        cond = torch.cat([_negative_batch(negative_embeds, batch, cond), cond])

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps, device=device)
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    latents = _row_normal(generators, latent_shape, device) * sampler.init_noise_sigma
    for index, t in enumerate(sampler.timesteps):
        model_input = torch.cat([latents, latents]) if use_guidance else latents
        model_input = sampler.scale_model_input(model_input, t).to(dtype)
        prediction = unet(model_input, t, encoder_hidden_states=cond).sample.float()
        if use_guidance:
            uncond_pred, cond_pred = prediction.chunk(2)
            prediction = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
        if on_step is not None:
            on_step(index, int(t), int(t) - sampler.config.num_train_timesteps // sampler.num_inference_steps,
                    latents, cond_pred if use_guidance else prediction)
        step_noise = _row_normal(generators, latent_shape, device) if eta > 0 else None
        latents = sampler.step(prediction, t, latents, eta=eta, variance_noise=step_noise).prev_sample
    return latents


def _negative_batch(negative_embeds: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
    if negative_embeds is None:
        raise ValueError(
            "negative_embeds: required when guidance_scale != 1 (use the empty prompt's embedding)"
        )
    if negative_embeds.shape[0] not in (1, batch) or negative_embeds.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"negative_embeds: shape {tuple(negative_embeds.shape)}, "
            f"expected (1 or {batch}, {like.shape[1]}, {like.shape[2]})"
        )
    return negative_embeds.to(device=like.device, dtype=like.dtype).expand(batch, -1, -1)


def _row_normal(
    generators: Sequence[torch.Generator], shape: tuple[int, int, int], device: str | torch.device
) -> torch.Tensor:
    """One N(0, I) draw of ``shape`` per row from that row's CPU generator -> (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
