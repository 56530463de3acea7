"""Ray processes the integration tests start themselves, and how they end exactly those.

Every process a test starts carries a tag in its environment (``SPIN_RAY_TEST_TAG``), inherited
by everything it starts in turn (raylets, workers, the autoscaler's simulated nodes); the test
ends them by PID through that tag, never by name: the machine is shared, and ``ray stop`` would
end every Ray on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TAG = "SPIN_RAY_TEST_TAG"
RAY_BIN = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_env(tag: str, **extra: str) -> dict[str, str]:
    """This process's environment without RAY_ADDRESS, with the tag and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[TAG] = tag
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra)
    return env


def tagged_pids(tag: str) -> list[int]:
    """PIDs of the live processes that carry ``tag`` in their environment."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and f"{TAG}={tag}".encode() in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_tagged(tag: str, wait_s: float = 0.0) -> int:
    """SIGKILL every process that carries ``tag`` in its environment (ours only, by PID); with
    ``wait_s``, keep at it until none is left or ``wait_s`` passed (a process that is being
    started while we look is only seen on a second pass)."""
    killed = 0
    deadline = time.time() + wait_s
    while True:
        pids = tagged_pids(tag)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if not pids or time.time() >= deadline:
            return killed
        time.sleep(0.5)


def head_command(gcs_port: int, dashboard_port: int, temp_dir: Path, *extra: str) -> list[str]:
    """``ray start --head --block`` on loopback, its dashboard (job server) on ``dashboard_port``.

    Every port is a free one: the defaults (52365 ...) are taken by the test session's own Ray,
    and a job agent that cannot bind never takes a job. ``temp_dir`` must be short: Ray's unix
    sockets live under it and must stay under 107 bytes.
    """
    return [str(RAY_BIN), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
            f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}", *extra]


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


TRANSIENT_SUBMIT_ERRORS = ("No available agent", "RemoteDisconnected")


def submit_job(address: str, entrypoint: list[str], env: dict[str, str], *, working_dir: Path,
               timeout: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit`` and wait; retried while the submission is not taken
    (:data:`TRANSIENT_SUBMIT_ERRORS`)."""
    submit = [str(RAY_BIN), "job", "submit", f"--address={address}", f"--working-dir={working_dir}", "--",
              *entrypoint]
    deadline = time.time() + 240
    while True:  # the node's job agent registers some seconds after the job server answers
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stderr + result.stdout
        # Not taken yet: the node's job agent has not registered, or (a loaded machine) the job
        # server dropped the submission's connection before answering.
        if result.returncode == 0 or not any(cause in output for cause in TRANSIENT_SUBMIT_ERRORS):
            return result
        assert time.time() < deadline, result.stderr[-2000:]
        time.sleep(3)


def stop_head(head: subprocess.Popen, tag: str) -> None:
    """End the head we started (SIGTERM, then its tagged processes by PID)."""
    os.kill(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    kill_tagged(tag)
