"""The embedded default, shortened: `python jobs/self_play.py` on the toy world, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spin_ray.toy.base_model import ASSET_DIR

REPO = Path(__file__).resolve().parents[2]

SHORT = [
    "self_play.iterations=2", "train.lr=1e-4", "train.steps=3",  # the default's lr is a list of 3 "train.warmup_steps=1", "train.log_every=1",
    "generation.num_inference_steps=4", "generation.batch_size=16",
    "eval.max_prompts=4", "eval.num_images_per_prompt=1", "eval.num_inference_steps=4",
    "baselines.dpo.steps=3",  # the default trains the SFT and DPO baselines too
]


@pytest.mark.slow
@pytest.mark.skipif(not (ASSET_DIR / "model_index.json").exists(), reason="toy base model not built")
def test_shortened_default_run_writes_the_report(tmp_path, ray_local):  # ray_local: another Ray on the machine
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "self_play.py"), f"run_dir={run_dir}", *SHORT],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The console (issue 14), piped, while this test session's own Ray instance runs on the
    # machine: spin-ray's lines and progress, no traceback, no Ray Train controller noise.
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 120, "\n".join(console)
    assert not [line for line in console if "Traceback" in line or "Failed to query" in line], "\n".join(console)
    assert any("Ray's own output" in line for line in console)
    # Results are meant to be shared: every file and folder is readable by group and others.
    private = [p for p in [run_dir, *run_dir.rglob("*")]
               if not p.is_symlink() and (p.stat().st_mode & 0o044) != 0o044]
    assert private == [], private[:10]

    for rel in ["prepared", "baseline_sft", "baseline_dpo", "iter_1", "iter_2"]:
        assert (run_dir / rel / "DONE").exists(), rel
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    summaries = metrics["summaries"]
    assert set(summaries) == {"base", "sft", "dpo", "iter_1", "iter_2"}
    assert metrics["baseline"] == "base"
    assert set(metrics["win_rates"]) >= {"sft", "dpo", "iter_1", "iter_2"}

    # The report's numbers are those of the per-image scores the pipeline stored in
    # eval/<model>/scores.parquet, recomputed here by hand: best-of-N by the toy score (the
    # only scorer, first image on ties), then the mean and median over prompts, and the win
    # rate against base's chosen images with a tie as half a win.
    num_prompts, num_images = 4, 1  # eval.max_prompts, eval.num_images_per_prompt above
    assert metrics["metadata"]["num_prompts"] == num_prompts
    chosen = {}
    for model, row in summaries.items():
        table = pq.read_table(run_dir / "eval" / model / "scores.parquet").to_pydict()
        assert len(table["toy"]) == num_prompts * num_images, model
        grid = np.full((num_prompts, num_images), np.nan)
        grid[table["prompt_index"], table["image_index"]] = table["toy"]
        assert not np.isnan(grid).any(), model  # every (prompt, image) scored once
        best = np.argmax(grid, axis=1)
        assert metrics["metadata"]["best_indices"][model] == best.tolist(), model
        chosen[model] = grid[np.arange(num_prompts), best]
        assert row["toy"]["n"] == num_prompts, model
        assert row["toy"]["mean"] == pytest.approx(float(np.mean(chosen[model])), rel=1e-6, abs=1e-7), model
        assert row["toy"]["median"] == pytest.approx(float(np.median(chosen[model])), rel=1e-6, abs=1e-7), model
    for model in ("sft", "dpo", "iter_1", "iter_2"):
        wins = np.mean((chosen[model] > chosen["base"]) + 0.5 * (chosen[model] == chosen["base"]))
        assert metrics["win_rates"][model]["toy"]["win_rate"] == pytest.approx(float(wins)), model
    report_files = {p.name for p in (run_dir / "report").iterdir()}
    assert {"report.md", "image_grid.png", "toy_over_iterations.png"} <= report_files
