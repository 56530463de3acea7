"""MLflow through a real tracking server: the test starts ``mlflow server`` on loopback (a free
port, a temporary SQLite store and artifact folder), logs a job with two stages and an evaluation
to it through spin_ray.tracking, and reads the runs back with ``MlflowClient``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tracking_helpers import STEPS, tracking_config, train_history, write_report, write_stage_metrics

from spin_ray.rundir import RunDir
from spin_ray.tracking import open_tracker

pytestmark = pytest.mark.slow  # the server takes seconds to start


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 240.0) -> None:
    # its start (imports, database migrations) took 1-2 minutes on a 2-core machine shared with other jobs
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 (loopback)
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer in {timeout_s} s")


@pytest.fixture
def mlflow_server(tmp_path):
    pytest.importorskip("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"),
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield url
    finally:  # the server and the workers it started: its own process group, by its PID
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_mlflow_gets_a_job_run_with_nested_stage_runs(tmp_path, tiny_pipeline_dir, mlflow_server):
    from mlflow.tracking import MlflowClient

    from spin_ray.diffusion import load_components

    history = train_history(load_components(str(tiny_pipeline_dir), local_files_only=True))
    cfg = tracking_config(tmp_path, ["mlflow"], uri=mlflow_server, experiment="spin-ray-test", run_name="job-1")
    rundir = RunDir(cfg.run_dir)
    tracker = open_tracker(cfg, rundir)
    for stage in ("iter_1", "iter_2"):
        with tracker.stage(stage):
            write_stage_metrics(rundir, stage, history)
    write_report(rundir)
    tracker.log_evaluation()
    tracker.close()

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("spin-ray-test")
    [job] = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'job-1'")
    assert job.info.status == "FINISHED"
    assert job.data.params["train.lr"] == str(cfg.train.lr) and job.data.params["tracking.backends"] == "['mlflow']"
    assert job.data.tags["run_dir"] == rundir.path()
    losses = [report["loss"] for report in history]
    series = client.get_metric_history(job.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in series) == [
        (step, pytest.approx(loss)) for step, loss in zip(range(1, 2 * STEPS + 1), losses * 2, strict=True)]
    assert job.data.metrics["eval/iter_1/toy_reward/mean"] == pytest.approx(0.75)
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{job.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["iter_1", "iter_2"]
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train/loss"))
        assert steps == [1, 2, 3]  # each stage's own step
    [artifact] = client.list_artifacts(job.info.run_id, "eval/image_grid")
    local = client.download_artifacts(job.info.run_id, artifact.path, str(tmp_path / "download"))
    assert Path(local).read_bytes() == rundir.local_path("report/image_grid.png").read_bytes()
