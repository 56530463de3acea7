"""The driver as users run it: a killed run resumes, and `ray job submit` works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from spin_ray.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 128
TAG = "SPIN_RAY_TEST_TAG"


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


def tagged_env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[TAG] = tag
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def kill_tagged(tag: str) -> int:
    """SIGKILL every process that carries ``tag`` in its environment (ours only, by PID)."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{TAG}={tag}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_temp_dir():
    """Ray's temp dir: its unix sockets must stay under 107 bytes, which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for_job_server(address: str, head: subprocess.Popen, head_log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            pass
        if head.poll() is not None or time.time() > deadline:
            raise AssertionError(f"`ray start` gave no job server at {address}:\n{head_log.read_text()[-4000:]}")
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_runs_self_play(tiny_pipeline_dir, toy_parquet, tmp_path, tag, short_temp_dir):
    ray_bin = Path(sys.executable).parent / "ray"
    gcs_port, dashboard_port = free_port(), free_port()
    env = tagged_env(tag)
    head_log = tmp_path / "ray_start.log"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         "--num-cpus=4", f"--temp-dir={short_temp_dir}",
         # Free ports for the node's agents: the defaults (52365 ...) are taken by the test
         # session's own Ray, and a job agent that cannot bind never takes a job.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_server(address, head, head_log, timeout=240)
        run_dir = tmp_path / "run"
        submit = [str(ray_bin), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
                  "python", "jobs/self_play.py", *overrides(tiny_pipeline_dir, toy_parquet, run_dir, iterations=1)]
        deadline = time.time() + 240
        while True:  # the node's job agent registers some seconds after the job server answers
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode == 0 or "No available agent" not in result.stderr + result.stdout:
                break
            assert time.time() < deadline, result.stderr[-2000:] + head_log.read_text()[-2000:]
            time.sleep(3)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "succeeded" in result.stdout.lower()
        assert (run_dir / "iter_1" / "DONE").exists()
    finally:
        os.kill(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
