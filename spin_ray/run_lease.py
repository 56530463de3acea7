"""One driver per run directory (issue 19): a lease file, taken at start, renewed, released.

Two drivers on one run directory (a resubmitted job, a second terminal) would both write
opponents, checkpoints and models into it. Each job therefore holds ``<run_dir>/lease.json``
(host, pid, start time, heartbeat, a random token) while it runs:

- a second driver refuses to start, naming the holder (exit code 2);
- a lease whose holder is gone (same host, pid no longer running) or whose heartbeat is older
  than ``cluster.lease_stale_s`` (a driver on another host that died) is taken over with a
  warning;
- the holder renews the heartbeat from a thread and removes the file when it ends.

Guarantees. On local disk (and shared POSIX file systems) the lease is created with
``O_CREAT | O_EXCL``: of two drivers starting together exactly one gets it. Object stores
offer no such create through fsspec, so there the lease is written, then read back after a
settle delay: a driver that finds another token gives way. Two drivers starting within that
delay of each other on an object store can still both pass; the lease stops every later one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from spin_ray.errors import UserError
from spin_ray.rundir import RunDir

log = logging.getLogger(__name__)

OBJECT_STORE_SETTLE_S = 2.0
"""How long a driver waits before reading its lease back from an object store."""


class RunDirBusy(UserError):
    """Another driver holds the run directory."""

    label = "run directory busy"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: where it runs and when it last said it was alive (unix times)."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    @classmethod
    def me(cls, now: float) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now, token=uuid.uuid4().hex)

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started}, last heartbeat {now - self.heartbeat:.0f}s ago"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunLease:
    """Context manager: hold ``rundir``'s lease for the duration of a job."""

    def __init__(self, rundir: RunDir, *, stale_s: float = 120.0, renew_s: float | None = None):
        self.rundir, self.stale_s = rundir, float(stale_s)
        self.renew_s = renew_s if renew_s is not None else max(0.5, min(30.0, self.stale_s / 4))
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> Holder:
        """Take the lease, or raise :class:`RunDirBusy` naming the driver that holds it."""
        now = time.time()
        current = self.read()
        if current is not None:
            abandoned = self.abandoned_because(current, now)
            if abandoned is None:
                raise RunDirBusy(
                    f"run_dir {self.rundir.path()}: another driver works in it ({current.describe(now)}); wait for "
                    f"it to end or stop it, or use another run_dir (a lease not renewed for cluster.lease_stale_s="
                    f"{self.stale_s:g}s is taken over; the lease is {self.rundir.path(self.rundir.LEASE)})")
            log.warning("%s: taking over the lease of %s: %s", self.rundir.path(), current.describe(now), abandoned)
        holder = Holder.me(now)
        self._write_first(holder) if current is None else self._write(holder)
        self._confirm(holder)
        self.holder = holder
        return holder

    def release(self) -> None:
        """Remove the lease if it is still ours (a driver that took it over keeps it)."""
        if self.holder is None:
            return
        with contextlib.suppress(OSError, ValueError):
            current = self.read()
            if current is not None and current.token == self.holder.token:
                self.rundir.remove(self.rundir.LEASE)
        self.holder = None

    def abandoned_because(self, holder: Holder, now: float) -> str | None:
        """Why ``holder``'s lease may be taken over, or None while it is held."""
        if holder.host == socket.gethostname() and not pid_alive(holder.pid):
            return "its process no longer runs"
        if now - holder.heartbeat > self.stale_s:
            return f"its heartbeat is {now - holder.heartbeat:.0f}s old (cluster.lease_stale_s={self.stale_s:g})"
        return None

    # ------------------------------------------------------------------ the file

    def read(self) -> Holder | None:
        """The lease's holder, or None when there is no lease (an unreadable one counts as none:
        its writer died mid-write, and a whole lease is written atomically)."""
        if not self.rundir.exists(self.rundir.LEASE):
            return None
        try:
            return Holder(**self.rundir.read_json(self.rundir.LEASE))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _write(self, holder: Holder) -> None:
        self.rundir.write_json_atomic(self.rundir.LEASE, asdict(holder))

    def _write_first(self, holder: Holder) -> None:
        """Create the lease; on local disk only if no other driver created it first."""
        if not self.rundir.is_local:
            self._write(holder)
            return
        path = self.rundir.local_path(self.rundir.LEASE)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RunDirBusy(f"run_dir {self.rundir.path()}: another driver took its lease just now "
                             f"({path}); wait for it to end or use another run_dir") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(holder), handle)
            handle.flush()
            os.fsync(handle.fileno())

    def _confirm(self, holder: Holder) -> None:
        """On an object store, read the lease back after a delay: last writer wins there."""
        if self.rundir.is_local:
            return
        time.sleep(OBJECT_STORE_SETTLE_S)
        current = self.read()
        if current is None or current.token != holder.token:
            other = current.describe(time.time()) if current else "unknown"
            raise RunDirBusy(f"run_dir {self.rundir.path()}: another driver took its lease at the same time "
                             f"({other}); wait for it to end or use another run_dir")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            with contextlib.suppress(OSError, ValueError):
                current = self.read()
                if self.holder is None or current is None or current.token != self.holder.token:
                    log.error("%s: this driver's lease was taken over by another driver", self.rundir.path())
                    return
                self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
                self._write(self.holder)
