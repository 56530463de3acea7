"""End to end: a tiny self-play run with ``loss.synthetic_states=reverse`` (eq. C.5)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_self_play import RESOLUTION, tiny_overrides, unet_weights

from spin_ray.config import load_config
from spin_ray.pair_schema import REVERSE_COLUMNS
from spin_ray.toy.world import write_pickapic_parquet


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=12, seed=1,
                                  resolution=RESOLUTION)


@pytest.mark.slow
def test_a_run_trains_on_theta_ks_own_reverse_states(ray_local, tiny_pipeline_dir, toy_parquet, tmp_path):
    from spin_ray.self_play import run

    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(
        tiny_pipeline_dir, toy_parquet, run_dir, **{
            "self_play.iterations": 1, "self_play.baselines": "[]", "train.steps": 2, "train.num_workers": 1,
            "train.checkpoint_every": 0, "generation.num_inference_steps": 3, "loss.synthetic_states": "reverse",
            "loss.timestep_weighting": "h2"}))
    result = run(cfg)

    assert (run_dir / "iter_1" / "DONE").exists()
    base, theta_1 = unet_weights(tiny_pipeline_dir), unet_weights(result.models["iter_1"])
    assert any(not torch.equal(base[k], theta_1[k]) for k in base), "iteration 1 did not change theta"
    opponents = pq.read_table(sorted((run_dir / "iter_1" / "opponents").glob("*.parquet"))).to_pydict()
    assert set(REVERSE_COLUMNS) <= set(opponents)
    assert set(opponents["timestep_syn"]) <= {1, 334, 667}  # the 3-step sampler's timesteps
    assert np.abs(opponents["ref_mse_syn"]).max() < 1e-6  # theta_k's own term vanishes
    metrics = json.loads((run_dir / "iter_1" / "metrics.json").read_text())
    assert metrics["history"][0]["first_logit_abs"] < 1e-2  # theta == theta_k at the first step
    assert np.isfinite(metrics["history"][-1]["loss"])
