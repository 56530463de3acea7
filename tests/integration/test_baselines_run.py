"""End to end: a tiny run with both baselines, ``self_play.baselines=[sft,dpo]``, then one iteration."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_self_play import RESOLUTION, tiny_overrides, unet_weights

from spin_ray.config import load_config
from spin_ray.rundir import RunDir
from spin_ray.toy.world import write_pickapic_parquet


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=40, seed=1,
                                  resolution=RESOLUTION)


@pytest.mark.slow
def test_a_run_trains_sft_and_dpo_baselines_before_the_iterations(ray_local, tiny_pipeline_dir, toy_parquet,
                                                                 tmp_path):
    from spin_ray.self_play import run

    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(
        tiny_pipeline_dir, toy_parquet, run_dir, **{
            "self_play.iterations": 1, "self_play.baselines": "[sft,dpo]", "train.steps": 2, "train.num_workers": 1,
            "train.checkpoint_every": 0, "generation.num_inference_steps": 2,
            "baselines.dpo.steps": 3, "baselines.dpo.beta": 500.0, "baselines.dpo.batch_size": 2}))
    result = run(cfg)

    assert list(result.models) == ["base", "sft", "dpo", "iter_1"]
    for rel in ["prepared", "baseline_sft", "baseline_dpo", "iter_1"]:
        assert (run_dir / rel / "DONE").exists(), rel
    assert result.models["dpo"] == str(run_dir / "baseline_dpo" / "model")
    prepared = RunDir(run_dir).read_done("prepared")
    assert prepared["loser_latents"] is True and prepared["ties_dropped"] >= 1  # the toy data has ties
    table = pq.read_table(run_dir / "prepared" / "data")
    assert table.column("latents_lose").length() == prepared["n_rows"]
    assert not np.array_equal(np.stack(table.column("latents_lose").to_numpy(zero_copy_only=False)[0]),
                              np.stack(table.column("latents_real").to_numpy(zero_copy_only=False)[0]))

    base, dpo = unet_weights(tiny_pipeline_dir), unet_weights(result.models["dpo"])
    assert any(not torch.equal(base[k], dpo[k]) for k in base), "the DPO baseline did not change theta_0"
    metrics = json.loads((run_dir / "baseline_dpo" / "metrics.json").read_text())
    assert (metrics["loss_type"], metrics["steps"], metrics["beta"], metrics["n_samples"]) == ("dpo", 3, 500.0, 6)
    last = metrics["history"][-1]
    for key in ["loss", "implicit_acc", "reward_win", "reward_lose", "margin"]:
        assert np.isfinite(last[key]), key
    assert metrics["history"][0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # theta == theta_0 at the start
    assert not (run_dir / "baseline_dpo" / "opponents").exists()
