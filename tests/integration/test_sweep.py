"""Ray Tune sweeps end to end on the toy world: per-iteration grid search and population-based self-play.

Every trial is tiny (2 steps of 4 pairs, 4 DDIM steps, 4 prompts x 2 images) but runs the real
path: a Tune trial that builds and fits its TorchTrainer, then scores its model with the
evaluation pipeline. Most of the time goes to starting Ray actors, so the tests keep the number
of trials to what they check.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from spin_ray.toy.world import write_pickapic_parquet

RESOLUTION = 128  # the shared tiny pipeline: 16x16 latents, images 8x larger
OVERFLOWING_BETA = 1.0e39
"""Above float32's largest value (3.4e38): a trial with it fails at its first step (torch
refuses the value; were it taken, no step would be finite and ``train.max_nonfinite_steps: 1`` stops it)."""


def sweep_config(tmp_path: Path, tiny_pipeline_dir: Path, data_path: Path, sweep: dict) -> Path:
    """A sweep YAML that keeps every trial tiny: 2 steps of 4 pairs, 4 DDIM steps, 4 prompts x 2 images."""
    import yaml

    values = {
        "run_dir": str(tmp_path / "run"), "seed": 3,
        "model": {"pretrained": str(tiny_pipeline_dir), "resolution": RESOLUTION},
        "data": {"path": str(data_path), "format": "pickapic", "prepare_batch_size": 8},
        "generation": {"num_inference_steps": 4, "guidance_scale": 2.0, "batch_size": 4},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "num_workers": 1, "log_every": 1,
                  "max_nonfinite_steps": 1},
        "self_play": {"iterations": 2},
        "eval": {"enabled": False, "prompts": "toy", "selection_prompts": "toy_selection", "max_prompts": 4,
                 "scorers": ["toy"],
                 "num_images_per_prompt": 2, "num_inference_steps": 4, "guidance_scale": 2.0, "batch_size": 8},
        "sweep": {"metric": "toy", "max_concurrent_trials": 1, **sweep},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory) -> Path:
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=12, seed=1,
                                  resolution=RESOLUTION)


def unet_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", use_safetensors=True).state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_started_from_its_opponent(stage: Path, opponent_weights: dict[str, torch.Tensor]) -> None:
    """The stage trained from, and against, a model with ``opponent_weights``: the recorded
    opponent has those weights, and the first step's SPIN loss is log 2 (theta == theta_k)."""
    metrics = read_json(stage / "metrics.json")
    assert same_weights(unet_weights(metrics["opponent"]), opponent_weights)
    first = next(record for record in metrics["history"] if record["step"] == 1)
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-4), first


@pytest.mark.slow
def test_grid_over_beta_picks_the_winner_survives_a_failed_trial_and_resumes(ray_local, tiny_pipeline_dir,
                                                                            toy_parquet, tmp_path):
    from spin_ray.sweep import load_sweep, run_sweep

    # Two grid points: beta 2000, and the schedule [5000, then a beta that overflows float32],
    # so iteration 1 is a 2-point grid over beta and in iteration 2 the second trial fails.
    path = sweep_config(tmp_path, tiny_pipeline_dir, toy_parquet,
                        {"mode": "grid", "space": {"loss.beta": {"grid": [2000, [5000, OVERFLOWING_BETA]]}}})
    cfg, sweep = load_sweep(path)
    result = run_sweep(cfg, sweep)
    run = tmp_path / "run"

    # Iteration 1: two trials, one per beta, both trained from theta_0 on one shared set of opponents.
    iter_1 = run / "sweep" / "iter_1"
    scores = {p.parent.name: read_json(p) for p in iter_1.glob("trial_*/score.json")}
    assert sorted(s["beta"] for s in scores.values()) == [2000.0, 5000.0]
    assert all(s["opponent"] == "base" for s in scores.values())
    assert (iter_1 / "opponents" / "DONE").exists()
    assert not list(iter_1.glob("trial_*/opponents")), "a trial generated its own opponents"
    trial_weights = {name: unet_weights(iter_1 / name / "model") for name in scores}
    best = max(scores, key=lambda name: scores[name]["score"])
    other = next(name for name in scores if name != best)
    assert not same_weights(trial_weights[best], trial_weights[other]), "the two betas trained the same model"
    assert scores[best]["score"] > scores[other]["score"], "the metric cannot tell the trials apart"

    # The winner is the trial with the higher held-out toy score, and its model is theta_1.
    winner = read_json(iter_1 / "winner.json")
    assert f"trial_{winner['trial_id']}" == best and winner["score"] == scores[best]["score"]
    theta_1 = unet_weights(run / "iter_1" / "model")
    assert same_weights(theta_1, trial_weights[best]) and not same_weights(theta_1, trial_weights[other])
    table = (iter_1 / "trials.md").read_text()
    assert f"| {winner['trial_id']} |" in table and "**winner**" in table and "5000" in table
    assert (iter_1 / "beta_vs_metric.png").stat().st_size > 1000

    # Iteration 2 started from the winner: its trial played against theta_1 and began from its weights.
    iter_2 = run / "sweep" / "iter_2"
    survivors = list(iter_2.glob("trial_*/score.json"))
    assert len(survivors) == 1 and read_json(survivors[0])["opponent"] == "iter_1/model"
    survivor = survivors[0].parent
    assert_started_from_its_opponent(survivor, trial_weights[best])
    assert not same_weights(unet_weights(survivor / "model"), theta_1), "iteration 2 did not train"

    # The overflowing trial failed; the sweep went on and published the other one.
    rows = {row["trial_id"]: row for row in read_json(iter_2 / "winner.json")["trials"]}
    failed = [row for row in rows.values() if row["error"]]
    assert len(rows) == 2 and len(failed) == 1 and failed[0]["beta"] == OVERFLOWING_BETA
    assert failed[0]["error"] and failed[0]["score"] is None and failed[0]["model"] is None
    assert f"| {failed[0]['trial_id']} |" in (iter_2 / "trials.md").read_text()
    assert "failed: " in (iter_2 / "trials.md").read_text()
    assert survivor.name == f"trial_{result.winners[2].trial_id}"
    assert same_weights(unet_weights(result.models["iter_2"]), unet_weights(survivor / "model"))
    assert (run / "iter_2" / "DONE").exists()

    # A driver that died before publishing iteration 2: rerunning with --resume resumes. Iteration 1 is kept,
    # iteration 2's Tune experiment is restored (the finished trial is not trained again, the
    # failed one is retried and fails again) and the same winner is published.
    publish_id = read_json(run / "iter_1" / "model" / "DONE")["publish_id"]
    survivor_done = (survivor / "DONE").read_text()
    shutil.rmtree(run / "iter_2")
    (iter_2 / "winner.json").unlink()
    again = run_sweep(cfg, sweep, resume=True)
    assert read_json(run / "iter_1" / "model" / "DONE")["publish_id"] == publish_id
    assert (survivor / "DONE").read_text() == survivor_done
    assert again.winners[2].trial_id == result.winners[2].trial_id
    assert same_weights(unet_weights(run / "iter_2" / "model"), unet_weights(survivor / "model"))
    assert len(read_json(iter_2 / "winner.json")["trials"]) == 2


@pytest.mark.slow
def test_pbt_clones_the_winner_which_becomes_the_next_opponent(ray_local, tiny_pipeline_dir, toy_parquet, tmp_path):
    from spin_ray.rundir import RunDir
    from spin_ray.sweep import load_sweep, pbt_rows, run_sweep

    path = sweep_config(tmp_path, tiny_pipeline_dir, toy_parquet,
                        {"mode": "pbt", "space": {"loss.beta": {"grid": [2000, 5000]},
                                                  "train.lr": {"choice": [1e-3]}},
                         "perturbation_interval": 1, "quantile_fraction": 0.5})
    cfg, sweep = load_sweep(path)
    result = run_sweep(cfg, sweep)
    run = tmp_path / "run"

    rows = pbt_rows(RunDir(run))
    assert sorted(rows) == [1, 2] and len(rows[1]) == 2 and len(rows[2]) == 2
    best_1 = max(rows[1], key=lambda row: row.score)
    worst_1 = min(rows[1], key=lambda row: row.score)
    assert best_1.score > worst_1.score
    winner_theta_1 = unet_weights(run / best_1.model)
    assert not same_weights(winner_theta_1, unet_weights(run / worst_1.model))

    # The exploit: the worse trial's iteration 2 played against, and started from, the better trial's theta_1.
    assert (run / "sweep" / "pbt" / "tune" / f"pbt_policy_{worst_1.trial_id}.txt").exists(), "no exploit logged"
    cloned = next(row for row in rows[2] if row.trial_id == worst_1.trial_id)
    assert cloned.opponent == best_1.model
    stage = run / cloned.model.rsplit("/", 1)[0]
    assert read_json(stage / "lineage.json")["opponent"] == best_1.model
    assert_started_from_its_opponent(stage, winner_theta_1)

    # The published chain: theta_1 is the winner's, theta_2 the final winner's, trained against theta_1.
    assert same_weights(unet_weights(run / "iter_1" / "model"), winner_theta_1)
    final = result.winners[2]
    assert final.opponent == best_1.model
    assert same_weights(unet_weights(run / "iter_2" / "model"), unet_weights(run / final.model))
    for k in (1, 2):
        assert (run / "sweep" / f"iter_{k}" / "trials.md").exists()
        assert (run / "sweep" / f"iter_{k}" / "beta_vs_metric.png").exists()
