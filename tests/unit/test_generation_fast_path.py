"""The fast path is wired into the opponent generator and the trainer's model loading, and
keeps their results: the prepared opponent samples what the plain UNet samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from spin_ray.config import ConfigError, load_config
from spin_ray.diffusion import load_components, sample_latents
from spin_ray.generation import SAMPLING_STREAM, GeneratorSpec, OpponentGenerator, derive_seed
from spin_ray.train_loop import TrainPlan, load_models

CPU = torch.device("cpu")


def spec(model_path, **changes) -> GeneratorSpec:
    values = dict(model_path=str(model_path), iteration=1, run_seed=0, num_inference_steps=2, guidance_scale=3.0,
                  eta=0.0, precompute_reference=False, shared_noise=True, opponents_dir=None, device="cpu")
    return GeneratorSpec(**(values | changes))


def is_channels_last(unet) -> bool:
    weight = unet.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_generator_prepares_its_unet(tiny_pipeline_dir):
    unet = OpponentGenerator(spec(tiny_pipeline_dir)).components.unet
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert not is_channels_last(unet)  # channels_last is for CUDA only
    assert getattr(unet, "_compiled_call_impl", None) is None


def test_evaluation_generator_prepares_its_unet(tiny_pipeline_dir, monkeypatch):
    import spin_ray.fast_path
    from spin_ray.eval.scoring import EvalImageGenerator, ImageSpec

    prepared = []
    real_prepare = spin_ray.fast_path.prepare_unet_for_inference

    def recording_prepare(unet, device, **kwargs):
        prepared.append((unet, torch.device(device), kwargs["dtype"]))
        return real_prepare(unet, device, **kwargs)

    monkeypatch.setattr(spin_ray.fast_path, "prepare_unet_for_inference", recording_prepare)
    generator = EvalImageGenerator(ImageSpec(model=str(tiny_pipeline_dir), resolution=128, num_inference_steps=2,
                                             guidance_scale=2.0, device="cpu"))
    unet = generator.components.unet
    assert prepared == [(unet, CPU, torch.float32)]
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_generator_compile_flag_compiles_the_unet(tiny_pipeline_dir):
    unet = OpponentGenerator(spec(tiny_pipeline_dir, compile=True)).components.unet
    assert getattr(unet, "_compiled_call_impl", None) is not None  # nn.Module.compile()'s marker (lazy)


def test_prepared_generator_samples_what_the_plain_unet_samples(tiny_pipeline_dir):
    generator = OpponentGenerator(spec(tiny_pipeline_dir))
    plain = load_components(str(tiny_pipeline_dir), local_files_only=True)
    plain.unet.set_attn_processor(AttnProcessor())  # diffusers' plain (non-SDPA) attention
    rng = np.random.default_rng(0)
    batch = {
        "sample_id": np.arange(2, dtype=np.int64),
        "prompt": np.asarray(["a", "b"], dtype=object),
        "prompt_embeds": rng.standard_normal((2, 77, plain.unet.config.cross_attention_dim)).astype(np.float32),
        "latents_real": np.zeros((2, 4, 16, 16), dtype=np.float32),
    }
    got = generator(batch)["latents_syn"]
    seeds = [derive_seed(0, 1, i, SAMPLING_STREAM) for i in range(2)]
    expected = sample_latents(plain.unet, plain.scheduler, torch.as_tensor(batch["prompt_embeds"]),
                              generator.negative_embeds, seeds, num_inference_steps=2, guidance_scale=3.0,
                              latent_shape=(4, 16, 16))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_generator_takes_read_only_batches_without_a_numpy_warning(tiny_pipeline_dir, monkeypatch):
    """Ray Data hands out read-only views of the object store; torch warns when a tensor would
    share memory with one (issue 14), so the generator must not build such a tensor. torch warns
    once per process, so the arrays handed to torch are checked too."""
    import warnings

    generator = OpponentGenerator(spec(tiny_pipeline_dir))
    as_tensor, given = torch.as_tensor, []

    def recording_as_tensor(data, *args, **kwargs):
        if isinstance(data, np.ndarray):
            given.append(data.flags.writeable)
        return as_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", recording_as_tensor)
    batch = {
        "sample_id": np.arange(1, dtype=np.int64),
        "prompt_embeds": np.zeros((1, 77, generator.components.unet.config.cross_attention_dim), dtype=np.float32),
        "latents_real": np.zeros((1, 4, 16, 16), dtype=np.float32),
    }
    for values in batch.values():
        values.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generator(batch)
    assert out["latents_syn"].shape == (1, 4, 16, 16)
    assert given and all(given)


def train_plan(model_path, **changes) -> TrainPlan:
    values = dict(init_model_path=str(model_path), loss_type="spin", online_reference=True, beta=2000.0, lr=1e-5,
                  steps=1, batch_size=1, gradient_accumulation_steps=1, weight_decay=1e-2, warmup_steps=0,
                  lr_schedule="linear", max_grad_norm=1.0, mixed_precision="auto", gradient_checkpointing=True,
                  checkpoint_every=0, log_every=1, max_nonfinite_steps=5, shared_noise=True,
                  timestep_weighting="none", seed=0)
    return TrainPlan(**(values | changes))


def test_trainer_loads_theta_and_theta_k_through_the_fast_path(tiny_pipeline_dir):
    unet, ref_unet, scheduler = load_models(train_plan(tiny_pipeline_dir), CPU)
    assert unet.training and unet.is_gradient_checkpointing
    assert next(unet.parameters()).dtype == torch.float32 and all(p.requires_grad for p in unet.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert not ref_unet.training and not any(p.requires_grad for p in ref_unet.parameters())
    assert next(ref_unet.parameters()).dtype == torch.float32  # bf16 weights on CUDA only
    assert not is_channels_last(unet) and not is_channels_last(ref_unet)
    assert getattr(unet, "_compiled_call_impl", None) is None
    assert scheduler.alphas_cumprod.device.type == "cpu"


def test_trainer_without_online_reference_holds_one_unet(tiny_pipeline_dir):
    _, ref_unet, _ = load_models(train_plan(tiny_pipeline_dir, online_reference=False), CPU)
    assert ref_unet is None


def test_trainer_compiles_when_the_plan_asks(tiny_pipeline_dir):
    plan = dataclasses.replace(train_plan(tiny_pipeline_dir), compile=True)
    unet, ref_unet, _ = load_models(plan, CPU)
    assert getattr(unet, "_compiled_call_impl", None) is not None
    assert getattr(ref_unet, "_compiled_call_impl", None) is not None


def test_compile_config_fields_default_off_and_take_booleans_only():
    cfg = load_config(None, ["generation.compile=true"])
    assert cfg.generation.compile is True and cfg.train.compile is False
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=yes please"])


@pytest.mark.gpu
def test_generator_on_gpu_runs_bf16_channels_last(tiny_pipeline_dir):
    generator = OpponentGenerator(spec(tiny_pipeline_dir, device="cuda", precompute_reference=True))
    unet = generator.components.unet
    assert next(unet.parameters()).dtype == torch.bfloat16 and is_channels_last(unet)
    batch = {
        "sample_id": np.arange(2, dtype=np.int64),
        "prompt": np.asarray(["a", "b"], dtype=object),
        "prompt_embeds": np.zeros((2, 77, unet.config.cross_attention_dim), dtype=np.float32),
        "latents_real": np.zeros((2, 4, 16, 16), dtype=np.float32),
    }
    out = generator(batch)
    assert out["latents_syn"].dtype == np.float32 and np.isfinite(out["latents_syn"]).all()
    assert np.isfinite(out["ref_mse_real"]).all() and np.isfinite(out["ref_mse_syn"]).all()


def test_the_compile_switches_reach_the_training_plan_and_the_generator_spec(tmp_path):
    from spin_ray.config import load_config
    from spin_ray.rundir import RunDir
    from spin_ray.stage_plans import generator_spec, train_plan

    for train_compile, gen_compile in [(True, False), (False, True)]:
        cfg = load_config(None, [f"train.compile={str(train_compile).lower()}",
                                 f"generation.compile={str(gen_compile).lower()}"])
        assert train_plan(cfg, "/model", 1, "spin").compile is train_compile
        assert generator_spec(cfg, RunDir(str(tmp_path)), "opponents", "/model", 1).compile is gen_compile
