"""CUDA training in bf16 on the tiny pipeline (``make test-gpu``; skipped without a CUDA device).

What runs only on a GPU in production: the step runner's bf16 autocast, theta_k's bf16 weights,
the generation actors' bf16 reference errors, the noise drawn on the CPU and moved to the GPU,
and tensors of one step living on two devices (the schedule's alphas on the CPU, timesteps on
the GPU). Tolerances, stated where they are used:

- bf16 against float32: a bf16 UNet forward carries ~3 significant digits; a per-sample MSE
  averages 1024 squared errors, so it lands within 2 % of the float32 one (REL_BF16).
- the generator's precomputed errors against the trainer's own online ones: both bf16 theta_k on
  the same GPU, but the generator rounds the latents (and so the noise) to bf16 while the trainer
  keeps them in float32 under autocast: within 2 % as well (REL_BF16).
- noise draws: bitwise equal (drawn on the CPU by design, then moved).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from train_helpers import make_plan, pair_rows, weights

from spin_ray.diffusion import (
    _row_normal,
    encode_prompt_ids,
    load_components,
    row_noise_and_timesteps,
    tokenize,
)
from spin_ray.generation import GeneratorSpec, OpponentGenerator
from spin_ray.loss import h2_weight
from spin_ray.pair_schema import pair_batch
from spin_ray.train_loop import Optimization, StepRunner, TrainState, load_models, run_steps
from spin_ray.train_step import pair_errors

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
REL_BF16 = 2e-2
LATENT_SHAPE = (4, 16, 16)


def _on(device: torch.device, columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in columns.items()}


def test_noise_draws_are_identical_on_cpu_and_cuda():
    seeds = [3, 1_000_003, 2**62 + 5]
    on_cpu = row_noise_and_timesteps(seeds, LATENT_SHAPE, 1000, shared_noise=False)
    on_gpu = row_noise_and_timesteps(seeds, LATENT_SHAPE, 1000, CUDA, shared_noise=False)
    for name in ("noise_real", "noise_syn", "timesteps"):
        assert getattr(on_gpu, name).device.type == "cuda", name
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name
    # The sampler's initial noise: one CPU generator per row, moved to the device.
    cpu_rows = _row_normal([torch.Generator().manual_seed(s) for s in seeds], LATENT_SHAPE, "cpu")
    gpu_rows = _row_normal([torch.Generator().manual_seed(s) for s in seeds], LATENT_SHAPE, CUDA)
    assert gpu_rows.device.type == "cuda" and torch.equal(gpu_rows.cpu(), cpu_rows)


def test_h2_weight_with_the_schedule_on_the_cpu_and_timesteps_on_the_gpu():
    abar = torch.linspace(0.999, 0.01, 1000)
    timesteps = torch.tensor([0, 10, 500, 999])
    on_cpu = h2_weight(abar, timesteps)
    on_gpu = h2_weight(abar, timesteps.to(CUDA))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_load_models_on_cuda_gives_float32_theta_and_bf16_theta_k(tiny_pipeline_dir):
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), online_reference=True, mixed_precision="auto")
    unet, ref_unet, scheduler = load_models(plan, CUDA)
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    assert {p.device.type for p in unet.parameters()} == {"cuda"}
    assert {p.dtype for p in ref_unet.parameters()} == {torch.bfloat16}
    assert scheduler.alphas_cumprod.device.type == "cuda"
    _, ref_float32, _ = load_models(make_plan(init_model_path=str(tiny_pipeline_dir), online_reference=True,
                                              mixed_precision="no"), CUDA)
    assert {p.dtype for p in ref_float32.parameters()} == {torch.float32}


@pytest.mark.parametrize("loss_type", ["spin", "sft"])
def test_a_few_bf16_steps_on_cuda_train_theta_and_match_the_cpu_loss(tiny_pipeline_dir, loss_type):
    """Three optimizer steps of the tiny pipeline on CUDA with bf16 autocast ("auto"): the
    losses are finite, theta moves and stays float32, and the first micro-batch's loss is the
    float32 CPU loss within REL_BF16 (beta small, so the SPIN logits are not saturated)."""
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), loss_type=loss_type, mixed_precision="auto",
                     beta=20.0, steps=3, lr=1e-4, checkpoint_every=0)
    unet, ref_unet, scheduler = load_models(plan, CUDA)
    runner = StepRunner(plan, unet, ref_unet, scheduler, CUDA)
    assert runner.autocast.fast_dtype == torch.bfloat16 and runner.autocast._enabled

    components = load_components(str(tiny_pipeline_dir), local_files_only=True)
    rows = [pair_rows(components, plan.batch_size, seed=seed) for seed in (1, 2, 3)]
    cpu_plan = make_plan(init_model_path=str(tiny_pipeline_dir), loss_type=loss_type, mixed_precision="no",
                         beta=20.0)
    cpu_unet, cpu_ref, cpu_scheduler = load_models(cpu_plan, torch.device("cpu"))
    cpu_loss = StepRunner(cpu_plan, cpu_unet, cpu_ref, cpu_scheduler, torch.device("cpu")).forward_backward(rows[0])

    before = weights(unet)
    reports = []
    state = run_steps(plan, TrainState(), [_on(CUDA, r) for r in rows], runner, Optimization.for_plan(unet, plan),
                      report=lambda metrics, checkpoint: reports.append(metrics))
    assert state.step == 3 and state.nonfinite_total == 0
    assert [r["step"] for r in reports] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in reports)
    assert reports[0]["loss"] == pytest.approx(cpu_loss["loss"], rel=REL_BF16)
    after = weights(unet)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert {v.dtype for v in after.values()} == {torch.float32}


def test_precomputed_reference_errors_equal_the_trainers_own_within_tolerance(tiny_pipeline_dir):
    """The generation actor's bf16 reference errors (theta_k = the tiny pipeline, on CUDA) against
    the trainer's online ones (its bf16 theta_k under the step runner's autocast) and against
    float32 errors on the CPU; all at each row's own noise seed."""
    components = load_components(str(tiny_pipeline_dir), local_files_only=True)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    with torch.no_grad():
        embeds = encode_prompt_ids(components.text_encoder, tokenize(components.tokenizer, prompts))
    latents_real = torch.randn((4, *LATENT_SHAPE), generator=torch.Generator().manual_seed(0))
    batch = {"sample_id": np.arange(4, dtype=np.int64), "prompt": np.asarray(prompts, dtype=object),
             "prompt_embeds": embeds.numpy().astype(np.float16), "latents_real": latents_real.numpy()}
    spec = GeneratorSpec(model_path=str(tiny_pipeline_dir), iteration=1, run_seed=0, num_inference_steps=3,
                         guidance_scale=2.0, eta=0.0, precompute_reference=True, shared_noise=True,
                         opponents_dir=None, device="cuda", mixed_precision="auto")
    generated = OpponentGenerator(spec)(batch)
    columns = {name: torch.as_tensor(np.asarray(generated[name])) for name in
               ("sample_id", "noise_seed", "prompt_embeds", "latents_real", "latents_syn",
                "ref_mse_real", "ref_mse_syn")}

    plan = make_plan(init_model_path=str(tiny_pipeline_dir), online_reference=True, mixed_precision="auto")
    _, ref_unet, scheduler = load_models(plan, CUDA)
    runner = StepRunner(plan, None, ref_unet, scheduler, CUDA)
    trainer_batch = pair_batch(_on(CUDA, columns), online_reference=True)
    with torch.no_grad(), runner.autocast:
        online_real, online_syn, _ = pair_errors(ref_unet, scheduler, trainer_batch.latents_real,
                                                 trainer_batch.latents_syn, trainer_batch.prompt_embeds,
                                                 trainer_batch.noise_seed)
    cpu_batch = pair_batch(columns, online_reference=True)
    with torch.no_grad():
        cpu_real, cpu_syn, _ = pair_errors(copy.deepcopy(components.unet), components.scheduler,
                                           cpu_batch.latents_real, cpu_batch.latents_syn,
                                           cpu_batch.prompt_embeds, cpu_batch.noise_seed)
    precomputed_real, precomputed_syn = columns["ref_mse_real"], columns["ref_mse_syn"]
    assert torch.isfinite(precomputed_real).all() and torch.isfinite(precomputed_syn).all()
    torch.testing.assert_close(online_real.float().cpu(), precomputed_real, rtol=REL_BF16, atol=0.0)
    torch.testing.assert_close(online_syn.float().cpu(), precomputed_syn, rtol=REL_BF16, atol=0.0)
    torch.testing.assert_close(precomputed_real, cpu_real, rtol=REL_BF16, atol=0.0)
    torch.testing.assert_close(precomputed_syn, cpu_syn, rtol=REL_BF16, atol=0.0)
