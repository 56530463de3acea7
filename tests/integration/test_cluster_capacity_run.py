"""A cluster too small for an iteration fails at once with a message, instead of hanging
(issue #19 item 5): `ray job submit` of jobs/self_play.py to a Ray head started with 2 CPUs."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from ray_processes import (
    free_port,
    head_command,
    kill_tagged,
    stop_head,
    submit_job,
    tagged_env,
    wait_for_job_server,
)

from spin_ray.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_two_cpu_cluster_is_refused_before_any_work(tiny_pipeline_dir, tmp_path):
    tag = uuid.uuid4().hex
    temp_dir = Path(tempfile.mkdtemp(prefix="cc-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    env = tagged_env(tag)
    head_log = tmp_path / "head.log"
    head = subprocess.Popen(head_command(gcs_port, dashboard_port, temp_dir, "--num-cpus=2"), env=env,
                            stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_job_server(f"http://127.0.0.1:{dashboard_port}", head, head_log, timeout=240)  # the head is up
        data = write_pickapic_parquet(tmp_path / "train.parquet", n_rows=4, seed=2, resolution=128)
        run_dir = tmp_path / "run"
        values = {"run_dir": str(run_dir), "model.pretrained": str(tiny_pipeline_dir), "model.resolution": 128,
                  "data.path": str(data), "self_play.baselines": "[]", "eval.enabled": False,
                  "tracking.backends": "[]"}
        args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
        result = submit_job(f"http://127.0.0.1:{dashboard_port}", ["python", "jobs/self_play.py", *args], env,
                            working_dir=REPO, timeout=400)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert "cannot run an iteration" in output and "Ray Data's read/repartition task" in output, output[-3000:]
        assert not (run_dir / "prepared").exists()  # refused before any work
    finally:
        stop_head(head, tag)
        kill_tagged(tag, wait_s=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
