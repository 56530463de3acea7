"""One driver per run directory (spin_ray.run_lease): a second driver is refused with the holder's
name, a dead or silent holder's lease is taken over, the lease is renewed and given back."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from spin_ray import cli
from spin_ray.run_lease import Holder, RunDirBusy, RunLease
from spin_ray.rundir import RunDir


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)  # the process has exited: its pid is (almost surely) free


def write_lease(rundir: RunDir, **fields) -> Holder:
    now = time.time()
    holder = Holder(**{"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                       "token": "theirs", **fields})
    rundir.write_json_atomic(rundir.LEASE, holder.__dict__)
    return holder


@pytest.fixture(params=["local", "memory"])
def rundir(request, tmp_path, monkeypatch):
    monkeypatch.setattr("spin_ray.run_lease.OBJECT_STORE_SETTLE_S", 0.0)
    if request.param == "local":
        return RunDir(tmp_path / "run")
    return RunDir(f"memory://lease-{uuid.uuid4().hex[:8]}")


def test_a_second_driver_is_refused_naming_the_first(rundir):
    with RunLease(rundir) as first:
        assert rundir.read_json(rundir.LEASE)["token"] == first.holder.token
        with pytest.raises(RunDirBusy, match=rf"another driver works in it \(pid {os.getpid()} on "):
            RunLease(rundir).acquire()
    assert not rundir.exists(rundir.LEASE)  # given back at the end
    with RunLease(rundir):  # and free for the next driver
        pass


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(rundir, caplog):
    write_lease(rundir, pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="spin_ray.run_lease"), RunLease(rundir) as lease:
        assert lease.holder.pid == os.getpid()
    assert "its process no longer runs" in caplog.text


def test_a_silent_holder_on_another_host_is_taken_over_only_when_stale(rundir):
    write_lease(rundir, host="another-host", heartbeat=time.time() - 50)
    with pytest.raises(RunDirBusy, match="on another-host"):
        RunLease(rundir, stale_s=120).acquire()
    with RunLease(rundir, stale_s=30) as lease:  # 50 s without a heartbeat > 30 s
        assert rundir.read_json(rundir.LEASE)["token"] == lease.holder.token


def test_the_heartbeat_is_renewed(rundir):
    with RunLease(rundir, renew_s=0.05):
        first = rundir.read_json(rundir.LEASE)["heartbeat"]
        deadline = time.time() + 10
        while rundir.read_json(rundir.LEASE)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert rundir.read_json(rundir.LEASE)["heartbeat"] > first


def test_a_lease_taken_over_is_left_to_its_new_holder(rundir):
    lease = RunLease(rundir)
    lease.acquire()
    write_lease(rundir, host="another-host", token="new-holder")  # taken over while we were silent
    lease.release()
    assert rundir.read_json(rundir.LEASE)["token"] == "new-holder"  # not removed


def test_jobs_hold_the_lease_while_they_run(tmp_path):
    run_dir = tmp_path / "run"
    seen = []

    def job(cfg):
        seen.append(json.loads((run_dir / "lease.json").read_text())["pid"])

    assert cli.run_job(job, [f"run_dir={run_dir}"]) == 0
    assert seen == [os.getpid()] and not (run_dir / "lease.json").exists()
    write_lease(RunDir(run_dir), host="another-host")
    assert cli.run_job(job, [f"run_dir={run_dir}"]) == 2  # one line, exit code 2
    assert seen == [os.getpid()]
