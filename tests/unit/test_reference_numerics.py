"""Numerics parity of the reference (issue 16 item 6; :mod:`spin_ray.numerics`).

At the first step of an iteration theta == theta_k, so the policy's errors (the trainer) and
theta_k's (computed by the generation actor, ``loss.reference: precomputed``, or by the
trainer's frozen copy, ``online``) must agree, or beta/2 (1000 here) turns their rounding
difference into the logits. Both run through :mod:`spin_ray.numerics`: float32 weights, the
trainer's autocast, the same kernels. Checked on the CPU in float32 and under bf16 autocast
(the trainer's ``train.mixed_precision: bf16``), for the same rows and noise.

Tolerance: per-sample errors agree to 1e-6 relative (the generator's and the trainer's batches
are the same rows in the same batch here; across batch shapes float32 kernels reorder sums at
about 1e-7 relative), and the first step's mean |logit| at beta = 2000 is below
:data:`FIRST_LOGIT_TOLERANCE`. Without parity (bf16 autocast in the trainer, float32 in the
generator, as before) the logits are orders of magnitude above it: the last test measures that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import make_plan

from spin_ray.diffusion import encode_prompt_ids, load_components, tokenize
from spin_ray.generation import GeneratorSpec, OpponentGenerator
from spin_ray.loss import spin_loss
from spin_ray.numerics import reference_pair_errors, training_numerics
from spin_ray.pair_schema import PAIR_COLUMNS, pair_batch
from spin_ray.train_loop import Optimization, StepRunner, TrainState, load_models, run_steps
from spin_ray.train_step import pair_errors, spin_batch_loss

CPU = torch.device("cpu")
BETA = 2000.0
FIRST_LOGIT_TOLERANCE = 1e-3
"""mean |logit| at theta == theta_k, beta = 2000: beta/2 times an MSE difference of 1e-6 of an MSE near 1."""


@pytest.fixture(scope="module")
def real_rows(tiny_pipeline_dir):
    """Four sample rows as the sample table holds them (prompt embeddings in float16)."""
    comps = load_components(str(tiny_pipeline_dir), local_files_only=True)
    prompts = ["a red circle", "a blue square", "a green triangle", "a small star"]
    with torch.no_grad():
        embeds = encode_prompt_ids(comps.text_encoder, tokenize(comps.tokenizer, prompts))
    latents = torch.randn((4, *comps.latent_shape(128)), generator=torch.Generator().manual_seed(5))
    return {"sample_id": np.arange(4, dtype=np.int64) + 10, "prompt_embeds": embeds.numpy().astype(np.float16),
            "latents_real": latents.numpy()}


def generate(model_dir, rows, mixed_precision: str, **changes) -> dict:
    spec = GeneratorSpec(model_path=str(model_dir), iteration=1, run_seed=0, num_inference_steps=2,
                         guidance_scale=2.0, eta=0.0, precompute_reference=True, shared_noise=False,
                         opponents_dir=None, mixed_precision=mixed_precision, **changes)
    return OpponentGenerator(spec)(dict(rows))


def as_columns(generated: dict) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(np.asarray(generated[name])) for name in PAIR_COLUMNS}


@pytest.mark.parametrize("mixed_precision", ["no", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: 10-20 s
def test_precomputed_errors_equal_the_trainers_and_the_first_logits_are_zero(tiny_pipeline_dir, real_rows,
                                                                              mixed_precision):
    generated = generate(tiny_pipeline_dir, real_rows, mixed_precision)
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), online_reference=True, mixed_precision=mixed_precision,
                     shared_noise=False, beta=BETA)
    theta, theta_k, scheduler = load_models(plan, CPU)
    runner = StepRunner(plan, theta, theta_k, scheduler, CPU)
    assert runner.numerics == training_numerics(mixed_precision, CPU)
    assert (runner.numerics.autocast_dtype is torch.bfloat16) == (mixed_precision == "bf16")
    batch = pair_batch(as_columns(generated), online_reference=False)
    with runner.numerics.autocast(), torch.no_grad():  # the trainer's step: StepRunner.forward_backward's context
        policy_real, policy_syn, _ = pair_errors(theta, scheduler, batch.latents_real, batch.latents_syn,
                                                 batch.prompt_embeds, batch.noise_seed, shared_noise=False)
    online_real, online_syn = reference_pair_errors(theta_k, scheduler, batch.latents_real, batch.latents_syn,
                                                    batch.prompt_embeds, batch.noise_seed, shared_noise=False,
                                                    numerics=runner.numerics)
    # The generator's errors are the trainer's own (theta == theta_k), sample by sample, and its online copy's.
    for precomputed, trainer in [(generated["ref_mse_real"], policy_real), (generated["ref_mse_syn"], policy_syn),
                                 (generated["ref_mse_real"], online_real), (generated["ref_mse_syn"], online_syn)]:
        torch.testing.assert_close(torch.as_tensor(precomputed), trainer.float(), rtol=1e-6, atol=0)
    first = spin_loss(policy_real, policy_syn, batch.ref_mse_real, batch.ref_mse_syn, beta=BETA)
    assert first.logits_abs_mean.item() < FIRST_LOGIT_TOLERANCE
    print(f"{mixed_precision}: first mean |logit| {first.logits_abs_mean.item():.3g}")


def test_the_first_optimizer_steps_mean_abs_logit_is_reported(tiny_pipeline_dir, real_rows):
    """``first_logit_abs``: the mean |logit| of optimizer step 1 (two micro-batches here), in every
    report after it and in the checkpoint's state; theta == theta_k there, so near 0."""
    generated = generate(tiny_pipeline_dir, real_rows, "no")
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), mixed_precision="no", shared_noise=False, beta=BETA,
                     steps=2, batch_size=1, gradient_accumulation_steps=2, log_every=2, checkpoint_every=0,
                     lr=1e-2, warmup_steps=0)
    theta, _, scheduler = load_models(plan, CPU)
    runner = StepRunner(plan, theta, None, scheduler, CPU)
    seen: list[float] = []

    class Recording:
        def forward_backward(self, columns):
            metrics = runner.forward_backward(columns)
            seen.append(metrics["logits_abs_mean"])
            return metrics

    columns = as_columns(generated)
    micro_batches = [{name: value[i:i + 1] for name, value in columns.items()} for i in range(4)]
    reports: list[dict] = []
    state = run_steps(plan, TrainState(), micro_batches, Recording(), Optimization.for_plan(theta, plan),
                      report=lambda metrics, checkpoint: reports.append(metrics))
    first = (seen[0] + seen[1]) / 2
    assert state.first_logit_abs == pytest.approx(first, rel=1e-9) and first < FIRST_LOGIT_TOLERANCE
    assert [r["first_logit_abs"] for r in reports] == [state.first_logit_abs]
    assert seen[2] > 10 * FIRST_LOGIT_TOLERANCE  # the second step's theta has moved: the metric is the first's
    assert TrainState.from_json(state.to_json()).first_logit_abs == state.first_logit_abs


def test_without_parity_the_first_logits_would_be_far_from_zero(tiny_pipeline_dir, real_rows):
    """The check above can fail: theta_k's errors in float32 (the generator before this change, on
    the CPU) against the trainer's bf16 autocast give logits far above the tolerance."""
    generated = generate(tiny_pipeline_dir, real_rows, "no")  # float32 errors
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), mixed_precision="bf16", shared_noise=False, beta=BETA)
    theta, _, scheduler = load_models(plan, CPU)
    batch = pair_batch(as_columns(generated), online_reference=False)
    with training_numerics("bf16", CPU).autocast(), torch.no_grad():
        mismatched = spin_batch_loss(theta, scheduler, batch, beta=BETA, shared_noise=False)
    print(f"without parity: first mean |logit| {mismatched.logits_abs_mean.item():.3g}")
    assert mismatched.logits_abs_mean.item() > 100 * FIRST_LOGIT_TOLERANCE
    # and the shared function reproduces the generator's float32 errors exactly from float32 numerics
    r_real, _ = reference_pair_errors(theta.eval(), scheduler, batch.latents_real, batch.latents_syn,
                                      batch.prompt_embeds, batch.noise_seed, shared_noise=False,
                                      numerics=training_numerics("no", CPU))
    torch.testing.assert_close(r_real, torch.as_tensor(generated["ref_mse_real"]), rtol=1e-6, atol=0)
