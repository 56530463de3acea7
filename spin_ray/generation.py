"""The opponent: a Ray Data callable class holding the frozen theta_k.

For each batch of real rows it samples the opponent's synthetic latents x0' with DDIM and
classifier-free guidance (no VAE decode), and, in ``precomputed`` reference mode, the
opponent's per-sample denoising errors on the real and synthetic latents at the (t, eps)
the trainer will use (docs/DESIGN.md section 3.2). Each output batch is also written to the
iteration's ``opponents/`` directory (:mod:`spin_ray.opponents`), so a restarted iteration
does not generate it again, and a batch already there (the pipeline running again after a
training worker group was replaced, or a restarted actor redoing its batches) is read back
instead of generated.

Seeds are derived per sample from (run seed, iteration, sample id), never from the batch,
so reruns reproduce every sample whatever the batching or the number of actors.

torch, diffusers and the model code are imported when an OpponentGenerator is built, not
with this module: :mod:`spin_ray.pairs` imports it, and every Ray Data worker process that
runs one of its small row functions imports :mod:`spin_ray.pairs`. Importing torch and
diffusers there would cost each such process seconds of CPU (7 s on the 2-core development
machine) at the start of every iteration, competing with the actors and training workers
that do need them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from spin_ray.opponents import find_batch, write_batch
from spin_ray.pair_schema import dtype_of, generated_columns

SAMPLING_STREAM = 0
NOISE_STREAM = 1
TRAJECTORY_STREAM = 2
"""Which step of its own DDIM trajectory a sample keeps (``loss.synthetic_states: reverse``)."""


def derive_seed(run_seed: int, iteration: int, sample_id: int, stream: int) -> int:
    """A 63-bit seed for one sample's random stream, independent of batching."""
    state = np.random.SeedSequence([run_seed, iteration, int(sample_id), stream]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything an OpponentGenerator actor needs; picklable, so Ray can ship it."""

    model_path: str
    """Local diffusers pipeline directory of theta_k."""
    iteration: int
    run_seed: int
    num_inference_steps: int
    guidance_scale: float
    eta: float
    precompute_reference: bool
    shared_noise: bool
    opponents_dir: str | None
    """Where each output batch is also written (local path or fsspec URL); None: nowhere."""
    device: str = "auto"
    mixed_precision: str = "auto"
    """``train.mixed_precision``. Sampling: ``auto`` or ``bf16``: bf16 weights on CUDA; ``no``:
    float32; the CPU always samples in float32. theta_k's errors: the trainer's numerics
    (:func:`spin_ray.numerics.training_numerics`), whatever the sampling uses."""
    compile: bool = False
    """``torch.compile`` the opponent UNet (``generation.compile``): faster on GPU once compiled,
    but each actor spends its first batches compiling."""
    reference_compile: bool = False
    """``train.compile``: the trainer's theta is compiled, so the copy of theta_k that computes
    the reference errors is compiled too (the same kernels)."""
    synthetic_states: str = "forward"
    """``loss.synthetic_states``: ``reverse`` also records, per sample, one state of the sampling
    trajectory and theta_k's conditional prediction there (eq. C.5, :mod:`spin_ray.trajectory`)."""


class OpponentGenerator:
    """Ray Data callable class: real rows in, (real, synthetic) pair rows out.

    Input: the sample table's rows (``sample_id``, ``prompt``, ``prompt_embeds``,
    ``latents_real``, ...). Output adds :data:`~spin_ray.pair_schema.GENERATED_COLUMNS`
    (``latents_syn``, ``noise_seed``, ``ref_mse_real``/``ref_mse_syn``, NaN when the trainer
    computes the reference online, ``generated_at``; with ``reverse`` states the
    :data:`~spin_ray.pair_schema.REVERSE_COLUMNS` too), with the dtypes and shapes of
    :mod:`spin_ray.pair_schema`. A batch already in ``spec.opponents_dir`` is returned as stored.

    theta_k's errors are computed by ``error_unet`` in the trainer's numerics
    (:mod:`spin_ray.numerics`: float32 weights, the trainer's autocast and kernels). Where the
    sampler's UNet has those weights already (the CPU, or ``train.mixed_precision: no``) it is
    the same module; on CUDA with bf16 sampling it is a second, float32 copy of theta_k
    (4 bytes a parameter: 3.4 GB for SD 1.5's UNet, beside the 1.7 GB bf16 one).
    """

    def __init__(self, spec: GeneratorSpec):
        import torch

        from spin_ray.diffusion import encode_prompt_ids, load_components, load_unet, pick_device, tokenize
        from spin_ray.fast_path import prepare_unet_for_inference
        from spin_ray.numerics import prepare_reference_unet, training_numerics

        self.spec = spec
        self.device = pick_device(spec.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and spec.mixed_precision != "no" else torch.float32
        self.numerics = training_numerics(spec.mixed_precision, self.device, compile=spec.reference_compile)
        self.components = load_components(spec.model_path, local_files_only=True, device=self.device, dtype=self.dtype)
        # The fast path (spin_ray.fast_path): frozen, SDPA attention, channels_last on CUDA, optional compile.
        prepare_unet_for_inference(self.components.unet, self.device, dtype=self.dtype, compile=spec.compile)
        self.error_unet = self.components.unet
        if spec.precompute_reference and (self.dtype != self.numerics.weight_dtype
                                          or spec.compile != spec.reference_compile):
            self.error_unet = prepare_reference_unet(load_unet(spec.model_path, local_files_only=True),
                                                     self.device, self.numerics)
        with torch.inference_mode():
            ids = tokenize(self.components.tokenizer, [""]).to(self.device)
            self.negative_embeds = encode_prompt_ids(self.components.text_encoder, ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from spin_ray.diffusion import sample_latents

        spec = self.spec
        if spec.opponents_dir:
            columns = list(dict.fromkeys([*batch, *generated_columns(spec.synthetic_states)]))
            cached = find_batch(spec.opponents_dir, np.asarray(batch["sample_id"]), columns)
            if cached is not None:
                return cached
        sample_ids = [int(s) for s in batch["sample_id"]]
        # float32 prompt embeddings, as the trainer's pair_batch makes them (the sampler casts to its dtype)
        embeds = torch.as_tensor(_writable(batch["prompt_embeds"]), device=self.device).float()
        latents_real = torch.as_tensor(_writable(batch["latents_real"]), device=self.device, dtype=torch.float32)
        sampling_seeds = [derive_seed(spec.run_seed, spec.iteration, s, SAMPLING_STREAM) for s in sample_ids]
        noise_seeds = [derive_seed(spec.run_seed, spec.iteration, s, NOISE_STREAM) for s in sample_ids]
        record = self._trajectory_record(sample_ids)
        with torch.inference_mode():
            latents_syn = sample_latents(
                self.components.unet, self.components.scheduler, embeds.to(self.dtype),
                self.negative_embeds.expand(len(sample_ids), -1, -1), sampling_seeds,
                num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                eta=spec.eta, latent_shape=tuple(latents_real.shape[1:]),
                **({"on_step": record.on_step} if record is not None else {}),
            ).float()
            reverse = _reverse_states(record.complete(), self.device) if record is not None else None
            ref_real, ref_syn = self._reference_errors(latents_real, latents_syn, embeds, noise_seeds, reverse)
        generated = {"latents_syn": latents_syn.cpu().numpy(), "noise_seed": noise_seeds, "ref_mse_real": ref_real,
                     "ref_mse_syn": ref_syn, "generated_at": np.full(len(sample_ids), time.time())}
        if record is not None:
            generated.update({"latents_syn_t": record.latents_t.numpy(), "eps_syn_target": record.eps_cond.numpy(),
                              "timestep_syn": record.timesteps.numpy(),
                              "timestep_syn_prev": record.prev_timesteps.numpy()})
        out = dict(batch)
        out.update({name: np.asarray(values, dtype=dtype_of(name)) for name, values in generated.items()})
        if spec.opponents_dir:
            write_batch(spec.opponents_dir, out)
        return out

    def _trajectory_record(self, sample_ids: list[int]):
        """With ``reverse`` states, the record of each sample's drawn trajectory step; else None."""
        from spin_ray.trajectory import TrajectoryRecord, draw_steps

        spec = self.spec
        if spec.synthetic_states != "reverse":
            return None
        seeds = [derive_seed(spec.run_seed, spec.iteration, s, TRAJECTORY_STREAM) for s in sample_ids]
        return TrajectoryRecord(draw_steps(seeds, spec.num_inference_steps))

    def _reference_errors(self, latents_real, latents_syn, embeds, noise_seeds, reverse=None):
        """theta_k's (r_real, r_syn), each (B,) float32 numpy, in the trainer's numerics
        (:func:`spin_ray.numerics.reference_pair_errors`); NaN with an online reference."""
        import torch

        from spin_ray.numerics import reference_pair_errors

        if not self.spec.precompute_reference:
            nan = np.full(len(noise_seeds), np.nan, dtype=dtype_of("ref_mse_real"))
            return nan, nan.copy()
        mse_real, mse_syn = reference_pair_errors(
            self.error_unet, self.components.scheduler, latents_real, latents_syn, embeds, torch.tensor(noise_seeds),
            shared_noise=self.spec.shared_noise, numerics=self.numerics, reverse=reverse)
        return mse_real.cpu().numpy(), mse_syn.cpu().numpy()


class HistoryReference(OpponentGenerator):
    """Ray Data callable class for ``self_play.opponent_history`` > 1: opponent rows cached by
    an earlier iteration in, the same rows with the reference errors of this iteration's
    opponent (``spec.model_path``, theta_{k-1}) at each row's own ``noise_seed`` (NaN when the
    trainer computes the reference online), written to ``spec.opponents_dir`` as one file per
    batch; returns the batch's ``sample_id``. The synthetic latents stay the earlier opponent's;
    with ``reverse`` states so do the recorded state and target (the earlier opponent's
    prediction), and r_syn is this opponent's error against that target (:mod:`spin_ray.loss`)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from spin_ray.train_step import ReverseStates

        embeds = torch.as_tensor(_writable(batch["prompt_embeds"]), device=self.device).float()
        latents_real = torch.as_tensor(_writable(batch["latents_real"]), device=self.device, dtype=torch.float32)
        latents_syn = torch.as_tensor(_writable(batch["latents_syn"]), device=self.device, dtype=torch.float32)
        reverse = None
        if self.spec.synthetic_states == "reverse":
            missing = [name for name in ("latents_syn_t", "eps_syn_target", "timestep_syn", "timestep_syn_prev")
                       if name not in batch]
            if missing:
                raise ValueError(f"self_play.opponent_history with loss.synthetic_states=reverse: the earlier "
                                 f"iteration's cached opponents have no {missing[0]} (generated with "
                                 f"synthetic_states=forward)")
            reverse = ReverseStates(*(torch.as_tensor(_writable(batch[name]), device=self.device) for name in
                                      ("latents_syn_t", "eps_syn_target", "timestep_syn", "timestep_syn_prev")))
        with torch.inference_mode():
            ref_real, ref_syn = self._reference_errors(latents_real, latents_syn, embeds,
                                                       [int(s) for s in batch["noise_seed"]], reverse)
        out = dict(batch)
        out["ref_mse_real"] = np.asarray(ref_real, dtype=dtype_of("ref_mse_real"))
        out["ref_mse_syn"] = np.asarray(ref_syn, dtype=dtype_of("ref_mse_syn"))
        if self.spec.opponents_dir:
            write_batch(self.spec.opponents_dir, out)
        return {"sample_id": np.asarray(batch["sample_id"])}


def _reverse_states(record, device):
    """The recorded trajectory states as the loss's :class:`~spin_ray.train_step.ReverseStates` on ``device``."""
    from spin_ray.train_step import ReverseStates

    return ReverseStates(record.latents_t.to(device), record.eps_cond.to(device), record.timesteps.to(device),
                         record.prev_timesteps.to(device))


def _writable(values) -> np.ndarray:
    """``values`` as an array torch may share memory with: Ray hands out read-only views of the
    object store, and a tensor over one would let an in-place op write into shared memory
    (torch warns about it), so those are copied; writable arrays are used as they are."""
    array = np.asarray(values)
    return array if array.flags.writeable else array.copy()
