"""The embedded default, shortened: `python jobs/self_play.py` on the toy world, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_ray.toy.base_model import ASSET_DIR

REPO = Path(__file__).resolve().parents[2]

SHORT = [
    "self_play.iterations=2", "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
    "generation.num_inference_steps=4", "generation.batch_size=16",
    "eval.max_prompts=4", "eval.num_images_per_prompt=1", "eval.num_inference_steps=4",
]


@pytest.mark.slow
@pytest.mark.skipif(not (ASSET_DIR / "model_index.json").exists(), reason="toy base model not built")
def test_shortened_default_run_writes_the_report(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "self_play.py"), f"run_dir={run_dir}", *SHORT],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rel in ["prepared", "baseline_sft", "iter_1", "iter_2"]:
        assert (run_dir / rel / "DONE").exists(), rel
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    summaries = metrics["summaries"]
    assert set(summaries) == {"base", "sft", "iter_1", "iter_2"}
    for model, row in summaries.items():
        assert 0.0 <= row["toy"]["mean"] <= 1.0, model
        assert 0.0 <= row["toy"]["median"] <= 1.0, model
    assert metrics["baseline"] == "base"
    assert set(metrics["win_rates"]) >= {"sft", "iter_1", "iter_2"}
    report_files = {p.name for p in (run_dir / "report").iterdir()}
    assert {"report.md", "image_grid.png", "toy_over_iterations.png"} <= report_files
