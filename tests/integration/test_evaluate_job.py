"""End to end: the Ray Data evaluation pipeline on the tiny pipeline, and jobs/evaluate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spin_ray.config import load_config
from spin_ray.diffusion import load_components, save_pipeline
from spin_ray.eval import metrics as eval_metrics
from spin_ray.eval import rows, scoring
from spin_ray.eval import run as eval_run

REPO_ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 128  # the shared tiny pipeline: 16x16 latents, images 8x larger


@pytest.fixture(scope="module")
def perturbed_pipeline_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with noise added to its UNet: a second, different model."""
    components = load_components(str(tiny_pipeline_dir), local_files_only=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in components.unet.parameters():
            parameter.add_(0.2 * parameter.std().nan_to_num() * torch.randn(parameter.shape, generator=generator))
    return save_pipeline(components, tmp_path_factory.mktemp("perturbed") / "pipeline")


def overrides(values: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def tiny_eval_values(run_dir: Path, models: dict[str, str]) -> dict:
    return {
        "run_dir": str(run_dir), "model.resolution": RESOLUTION, "eval.models": models,
        "eval.prompts": "toy", "eval.max_prompts": 3, "eval.scorers": ["toy"],
        "eval.num_images_per_prompt": 2, "eval.num_inference_steps": 3, "eval.guidance_scale": 2.0,
        "eval.batch_size": 4, "eval.num_actors": 1,
    }


@pytest.mark.slow
def test_run_evaluation_reports_what_the_stored_scores_say(ray_local, tiny_pipeline_dir, perturbed_pipeline_dir,
                                                           tmp_path, monkeypatch):
    run_dir = tmp_path / "eval"
    models = {"base": str(tiny_pipeline_dir), "iter_1": str(perturbed_pipeline_dir)}
    cfg = load_config(None, overrides(tiny_eval_values(run_dir, models)))

    summaries = eval_run.run_evaluation(cfg)["toy"]

    tables = {name: pq.read_table(run_dir / "eval" / name / "scores.parquet").to_pydict() for name in models}
    for name, table in tables.items():
        assert (run_dir / "eval" / name / "DONE").is_file()
        cells = sorted(zip(table["prompt_index"], table["image_index"], table["seed"], strict=True))
        assert cells == [(p, i, rows.image_seed(0, p, i)) for p in range(3) for i in range(2)]  # same seeds
    assert tables["base"]["toy"] != tables["iter_1"]["toy"]  # the perturbed UNet draws other images

    scores = {name: rows.gather_scores(table, ["toy"], 3, 2) for name, table in tables.items()}
    expected = eval_metrics.evaluate_models(scores)
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    for name in models:
        best = scores[name]["toy"].max(axis=1)
        assert metrics["summaries"][name]["toy"]["mean"] == pytest.approx(float(np.mean(best)), rel=1e-6)
        assert metrics["summaries"][name]["toy"]["median"] == pytest.approx(float(np.median(best)), rel=1e-6)
        assert metrics["summaries"][name]["average"]["mean"] == pytest.approx(float(np.mean(best)), rel=1e-6)
        assert metrics["metadata"]["best_indices"][name] == expected[name].best_indices.tolist()
        assert summaries[name]["toy"].mean == pytest.approx(float(np.mean(best)), rel=1e-6)
    best_base = scores["base"]["toy"].max(axis=1)
    best_iter = scores["iter_1"]["toy"].max(axis=1)
    rate = metrics["win_rates"]["iter_1"]["toy"]
    assert metrics["baseline"] == "base" and list(metrics["win_rates"]) == ["iter_1"]
    assert rate["win_rate"] == pytest.approx(np.mean((best_iter > best_base) + 0.5 * (best_iter == best_base)))
    assert rate["num_prompts"] == 3

    grid = Image.open(run_dir / "report" / "image_grid.png")
    assert grid.size == (160 + 3 * 256, 40 + 3 * 256)  # 3 prompts x (real data + 2 models)
    assert (run_dir / "report" / "toy_over_iterations.png").is_file()
    assert "| iter_1 |" in (run_dir / "report" / "report.md").read_text()

    # A rerun with the same settings reads the stored scores: no pipeline runs.
    def no_pipeline(*args, **kwargs):
        raise AssertionError("the stored scores should have been reused")

    monkeypatch.setattr(scoring, "generate_and_score", no_pipeline)
    assert eval_run.run_evaluation(cfg)["toy"] == summaries


@pytest.mark.slow
def test_evaluate_job_runs_from_the_command_line(tiny_pipeline_dir, tmp_path):
    run_dir = tmp_path / "job"
    values = tiny_eval_values(run_dir, {"base": str(tiny_pipeline_dir)})
    values.update({"eval.max_prompts": 2, "eval.num_images_per_prompt": 1, "eval.num_inference_steps": 2})
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--config", "configs/eval_toy.yaml", *overrides(values)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert list(metrics["summaries"]) == ["base"]
    assert metrics["metadata"]["num_prompts"] == 2
    assert metrics["metadata"]["prompt_set"] == "toy"
    assert (run_dir / "config.yaml").is_file()
