"""A job on a simulated autoscaling cluster: the autoscaler adds a generation node and a
training node for it, the run finishes on them, and the nodes go once idle (issue #21)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import simulated_cluster
from ray_processes import kill_tagged, stop_head, submit_job, tagged_pids

from spin_ray.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[2]


def job_overrides(pipeline: Path, data: Path, run_dir: Path) -> list[str]:
    values = {
        "run_dir": str(run_dir), "seed": 5, "model.pretrained": str(pipeline), "model.resolution": 128,
        "data.path": str(data), "data.prepare_batch_size": 8, "generation.num_inference_steps": 2,
        "generation.batch_size": 4, "train.steps": 2, "train.batch_size": 4, "train.warmup_steps": 0,
        "train.lr": 1e-3, "train.log_every": 1, "self_play.iterations": 1, "self_play.baselines": "[]",
        "eval.enabled": False, "tracking.backends": "[]",
        "cluster.generation_node_label": simulated_cluster.GEN_LABEL,
        "cluster.train_node_label": simulated_cluster.TRAIN_LABEL,
    }
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@pytest.fixture
def cluster(tmp_path):
    tag = uuid.uuid4().hex
    temp_dir = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))  # short: Ray's socket paths
    started = None
    try:
        started = simulated_cluster.start(temp_dir, tmp_path, tag)
        yield started
    finally:
        if started is not None:
            stop_head(started.head, tag)
        kill_tagged(tag, wait_s=20)
        assert not tagged_pids(tag), "processes of the simulated cluster were left behind"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_simulated_cluster_scales_up_runs_and_releases(cluster, tiny_pipeline_dir, tmp_path):
    assert simulated_cluster.alive_workers(cluster, simulated_cluster.GEN_LABEL) == 0  # starts with the head only
    data = write_pickapic_parquet(tmp_path / "train.parquet", n_rows=8, seed=2, resolution=128)
    run_dir = tmp_path / "run"
    entrypoint = ["python", "jobs/self_play.py", *job_overrides(tiny_pipeline_dir, data, run_dir)]
    started = time.time()
    result = submit_job(cluster.address, entrypoint, cluster.env, working_dir=REPO)
    print(f"job: {time.time() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert (run_dir / "iter_1" / "DONE").exists()

    had = simulated_cluster.nodes(cluster)
    for label in (simulated_cluster.GEN_LABEL, simulated_cluster.TRAIN_LABEL):
        assert any(label in node["resources_total"] for node in had), f"no {label} node was launched: {had}"
    print(f"nodes released {simulated_cluster.wait_until_released(cluster, timeout=120):.0f} s after the job")
