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


@pytest.mark.slow
def test_checkpoints_scored_during_training_publish_the_best_and_plot_the_curves(ray_local, tmp_path, monkeypatch):
    """``baselines.sft.eval_every=2, keep=best`` on the toy world: the SFT baseline's checkpoints
    at steps 2, 4, 6 are scored on the selection prompts, the best is published (its weights, not
    the others'), the curve file and the report's figure are written; iteration 1 (train.eval_every
    0) publishes its last checkpoint as before. Each scoring is a Ray Data pipeline (~10 s on an
    idle 2-core machine), so the iterations' curves are left to the unit tests."""
    from safetensors.torch import load_file

    from spin_ray import checkpoint_selection
    from spin_ray.self_play import run

    data = write_pickapic_parquet(tmp_path / "train.parquet", n_rows=24, seed=1, resolution=32)
    scored: dict[int, dict[str, torch.Tensor]] = {}
    score_checkpoint = checkpoint_selection.score_checkpoint

    def score_and_keep_weights(cfg, rundir, stage, step, prompts):  # the chosen one is moved away later
        if stage == "baseline_sft":
            scored[step] = load_file(f"{rundir.path(rundir.stage_checkpoint(stage, step))}/unet/"
                                     "diffusion_pytorch_model.safetensors")
        return score_checkpoint(cfg, rundir, stage, step, prompts)

    monkeypatch.setattr(checkpoint_selection, "score_checkpoint", score_and_keep_weights)
    run_dir = tmp_path / "run"
    values = {"run_dir": str(run_dir), "seed": 2, "model.pretrained": "toy", "model.resolution": 32,
              "data.path": str(data), "data.format": "pickapic", "generation.num_inference_steps": 2,
              "generation.batch_size": 8, "self_play.iterations": 1, "self_play.baselines": "[sft]",
              "train.steps": 2, "train.batch_size": 4, "train.lr": 2e-3, "train.warmup_steps": 0,
              "train.log_every": 1, "baselines.sft.eval_every": 2, "baselines.sft.steps": 6,
              "baselines.sft.keep": "best",
              "eval.enabled": True, "eval.prompts": "toy", "eval.selection_prompts": "toy_selection",
              "eval.scorers": "[toy]", "eval.max_prompts": 4, "eval.num_images_per_prompt": 2,
              "eval.num_inference_steps": 4, "eval.guidance_scale": 1.0}
    result = run(load_config(None, [f"{key}={value}" for key, value in values.items()]))

    curve = json.loads((run_dir / "baseline_sft" / "selection_curve.json").read_text())
    points = curve["points"]
    assert [p["step"] for p in points] == [2, 4, 6] and sorted(scored) == [2, 4, 6]
    for point in points:
        assert 0.0 <= point["toy"] <= 1.0 and point["average"] == point["toy"] and np.isfinite(point["loss"])
    best = max(points, key=lambda p: p["average"])["step"]  # steps ascend: max() keeps the earliest of ties
    assert curve["published_step"] == best and curve["keep"] == "best"
    published = load_file(run_dir / "baseline_sft" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(published[k], scored[best][k]) for k in published)
    others = [step for step in scored if step != best]
    assert all(any(not torch.equal(published[k], scored[s][k]) for k in published) for s in others)
    assert RunDir(run_dir).read_done("baseline_sft")["published_step"] == best
    metrics = json.loads((run_dir / "baseline_sft" / "metrics.json").read_text())
    assert metrics["selection"]["published_step"] == best
    assert not (run_dir / "baseline_sft" / "checkpoints").exists()  # deleted once the stage is done
    assert (run_dir / "baseline_sft" / "checkpoint_eval" / "step_000004" / "DONE").exists()

    assert not (run_dir / "iter_1" / "selection_curve.json").exists()
    assert RunDir(run_dir).read_done("iter_1")["published_step"] == 2
    assert result.models["sft"] == str(run_dir / "baseline_sft" / "model")
    assert (run_dir / "report" / "selection_curves.png").stat().st_size > 0
    assert "![selection_curves.png](selection_curves.png)" in (run_dir / "report" / "report.md").read_text()
