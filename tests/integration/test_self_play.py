"""End to end: Ray Data generates opponents while the TorchTrainer trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel

from spin_ray.config import load_config
from spin_ray.toy.world import write_pickapic_parquet

RESOLUTION = 128  # the shared tiny pipeline: 16x16 latents, images 8x larger


def tiny_overrides(tiny_pipeline_dir: Path, data_path: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir), "seed": 3,
        "model.pretrained": str(tiny_pipeline_dir), "model.resolution": RESOLUTION,
        "data.path": str(data_path), "data.format": "pickapic", "data.prepare_batch_size": 8,
        "generation.num_inference_steps": 50, "generation.guidance_scale": 2.0, "generation.batch_size": 2,
        "train.steps": 8, "train.batch_size": 4, "train.lr": 1e-3, "train.warmup_steps": 0,
        "train.num_workers": 2, "train.log_every": 1, "train.checkpoint_every": 2,
        "self_play.iterations": 2, "eval.enabled": False,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory) -> Path:
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=20, seed=1,
                                  resolution=RESOLUTION)


def unet_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", use_safetensors=True).state_dict()


def read_opponents(iter_dir: Path):
    return pq.read_table(sorted((iter_dir / "opponents").glob("*.parquet"))).to_pydict()


@pytest.mark.slow
def test_two_iterations_stream_generation_into_training(ray_local, tiny_pipeline_dir, toy_parquet, tmp_path):
    from spin_ray.self_play import run

    cfg = load_config(None, tiny_overrides(tiny_pipeline_dir, toy_parquet, tmp_path / "run"))
    result = run(cfg)
    run_dir = tmp_path / "run"

    for rel in ["prepared", "iter_1", "iter_2"]:
        assert (run_dir / rel / "DONE").exists(), rel
    base, theta_1, theta_2 = (unet_weights(p) for p in
                              (tiny_pipeline_dir, result.models["iter_1"], result.models["iter_2"]))
    assert any(not torch.equal(base[k], theta_1[k]) for k in base), "iteration 1 did not change theta"
    assert any(not torch.equal(theta_1[k], theta_2[k]) for k in base), "iteration 2 did not change theta"

    metrics_1 = json.loads((run_dir / "iter_1" / "metrics.json").read_text())
    metrics_2 = json.loads((run_dir / "iter_2" / "metrics.json").read_text())
    assert metrics_1["opponent"] == str(tiny_pipeline_dir)
    assert metrics_2["opponent"] == result.models["iter_1"]
    n_samples = 8 * 4 * 2
    opponents = read_opponents(run_dir / "iter_1")
    assert sorted(opponents["sample_id"]) == sorted(set(opponents["sample_id"]))
    assert len(opponents["sample_id"]) == n_samples

    # Streaming: the trainer had its first pairs before the last opponent batch was generated.
    first_batch = metrics_1["history"][0]["first_batch_time"]
    assert first_batch < max(opponents["generated_at"]), "generation finished before training started"
    assert metrics_1["history"][-1]["step"] == 8
    for key in ["loss", "implicit_acc", "reward_real", "reward_syn", "margin", "lr", "samples_per_s"]:
        assert np.isfinite(metrics_1["history"][-1][key]), key
    assert_iteration_two_played_against_iteration_one(cfg, result, run_dir)


def assert_iteration_two_played_against_iteration_one(cfg, result, run_dir: Path) -> None:
    """Regenerate a few of iteration 2's opponents with theta_1 and compare them."""
    from spin_ray.generation import GeneratorSpec, OpponentGenerator

    stored = read_opponents(run_dir / "iter_2")
    prepared = pq.read_table(run_dir / "prepared" / "data").to_pydict()
    by_row = {row_id: i for i, row_id in enumerate(prepared["row_id"])}
    picks = list(range(3))
    row_index = [by_row[stored["sample_id"][i] & 0xFFFFFFFF] for i in picks]
    batch = {
        "sample_id": np.asarray([stored["sample_id"][i] for i in picks], dtype=np.int64),
        "prompt_embeds": np.stack([np.asarray(prepared["prompt_embeds"][j], dtype=np.float16) for j in row_index]),
        "latents_real": np.stack([np.asarray(prepared["latents_real"][j], dtype=np.float32) for j in row_index]),
    }
    spec = GeneratorSpec(model_path=result.models["iter_1"], iteration=2, run_seed=cfg.seed,
                         num_inference_steps=cfg.generation.num_inference_steps,
                         guidance_scale=cfg.generation.guidance_scale, eta=0.0, precompute_reference=True,
                         shared_noise=True, opponents_dir=None)
    again = OpponentGenerator(spec)(batch)
    expected = np.stack([np.asarray(stored["latents_syn"][i], dtype=np.float32) for i in picks])
    np.testing.assert_allclose(again["latents_syn"], expected, rtol=1e-4, atol=1e-5)
