"""The driver as users run it: a killed run resumes, and `ray job submit` works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
RESOLUTION = 128


def overrides(tiny_pipeline_dir: Path, data: Path, run_dir: Path, iterations: int = 2) -> list[str]:
    values = {
        "run_dir": str(run_dir), "seed": 5, "model.pretrained": str(tiny_pipeline_dir),
        "model.resolution": RESOLUTION, "data.path": str(data), "data.prepare_batch_size": 8,
        "generation.num_inference_steps": 4, "generation.guidance_scale": 2.0, "generation.batch_size": 4,
        "train.steps": 2, "train.batch_size": 4, "train.warmup_steps": 0, "train.lr": 1e-3,
        "train.num_workers": 1, "train.log_every": 1, "self_play.iterations": iterations,
        "self_play.sft_baseline": False, "self_play.baselines": "[]",  # the drivers start from configs/default.yaml
        "eval.enabled": False,
    }
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@pytest.fixture
def tag():
    value = uuid.uuid4().hex
    yield value
    kill_tagged(value)


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory) -> Path:
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=12, seed=2,
                                  resolution=RESOLUTION)


def self_play_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "self_play.py"), *args]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode} before {path} appeared")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.5)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_driver_resumes_at_the_next_iteration(tiny_pipeline_dir, toy_parquet, tmp_path, tag):
    run_dir = tmp_path / "run"
    args = overrides(tiny_pipeline_dir, toy_parquet, run_dir)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(self_play_cmd(args), env=tagged_env(tag), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=tmp_path)
    wait_for(run_dir / "iter_1" / "DONE", first, timeout=400)
    os.kill(first.pid, signal.SIGKILL)  # the driver, by its own PID
    first.wait()
    kill_tagged(tag)  # and the local Ray it had started
    assert not (run_dir / "iter_2" / "DONE").exists()
    before = {rel: snapshot(run_dir / rel) for rel in ["prepared", "iter_1"]}

    second = subprocess.run(self_play_cmd(args), env=tagged_env(tag), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (run_dir / "iter_2" / "DONE").exists()
    for rel, files in before.items():
        assert snapshot(run_dir / rel) == files, f"{rel} was redone after the restart"
    output = second.stdout + second.stderr
    assert "[iter_1] training" not in output and "[iter_2] training" in output
    assert "prepared " not in output  # the real table was reused, not encoded again


@pytest.fixture
def short_temp_dir():
    """Ray's temp dir: its unix sockets must stay under 107 bytes, which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_self_play(tiny_pipeline_dir, toy_parquet, tmp_path, tag, short_temp_dir):
    gcs_port, dashboard_port = free_port(), free_port()
    env = tagged_env(tag)
    head_log = tmp_path / "ray_start.log"
    head = subprocess.Popen(head_command(gcs_port, dashboard_port, short_temp_dir, "--num-cpus=4"),
                            env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_server(address, head, head_log, timeout=240)
        run_dir = tmp_path / "run"
        entrypoint = ["python", "jobs/self_play.py", *overrides(tiny_pipeline_dir, toy_parquet, run_dir, iterations=1)]
        result = submit_job(address, entrypoint, env, working_dir=REPO)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "succeeded" in result.stdout.lower()
        assert (run_dir / "iter_1" / "DONE").exists()
    finally:
        stop_head(head, tag)
