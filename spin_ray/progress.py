"""Live progress of a training stage on the driver's console (issue 14).

The training workers and the generation actors run in other processes (on a cluster, on other
nodes), and their own output stays in Ray's log files (:mod:`spin_ray.ray_session`). What they
have done is read from the run directory instead: rank 0 rewrites ``<stage>/progress.json`` at
every logged step (:func:`write_progress`) and every generated batch of opponents is a file
in the opponent cache. :class:`StageProgress` polls both in a thread and shows one line: on a
terminal it is redrawn in place every second; piped (``ray job submit`` logs, CI) a new line
is printed when something changed, at most every :data:`PIPED_EVERY_S` seconds.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from spin_ray.rundir import RunDir

PIPED_EVERY_S = 30.0
TERMINAL_EVERY_S = 1.0


def write_progress(location: str, step: int, steps: int, loss: float | None, metrics: dict | None = None) -> None:
    """Rank 0's side: record ``step`` of ``steps`` (and the loss) in the file ``location``;
    ``metrics``: the whole report; the file keeps this process's last :data:`RECENT_REPORTS` of them
    (``recent``), which the experiment trackers log while the stage runs (:mod:`spin_ray.tracking`)."""
    parent, name = location.rstrip("/").rsplit("/", 1)
    record: dict = {"step": step, "steps": steps, "loss": loss, "time": time.time()}
    if metrics is not None:
        recent = _RECENT.setdefault(location, deque(maxlen=RECENT_REPORTS))
        recent.append({key: value for key, value in metrics.items() if _json_number(value)})
        record["recent"] = list(recent)
    RunDir(parent).write_json_atomic(name, record)


RECENT_REPORTS = 100
"""Reports the progress file keeps: a tracker polling it every few seconds sees every step."""
_RECENT: dict[str, deque] = {}


def _json_number(value: object) -> bool:
    """A finite int or float (JSON has no NaN; a skipped step's loss is not a curve point)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Snapshot:
    """What a stage has done so far: optimizer steps and opponents on disk (None: no opponents)."""

    step: int
    loss: float | None
    opponents: int | None


class StageProgress:
    """Context manager that shows a stage's progress while its training runs.

    Args:
        stage: the stage's run-dir name (``iter_2``, ``baseline_sft``, a sweep trial).
        steps: optimizer steps the stage trains for.
        samples_per_step: samples one optimizer step consumes (for samples/s).
        opponents_rel: the opponent cache to count, with ``n_samples`` opponents needed and
            ``opponent_batch`` samples per generated file; None for SFT (no opponents).
    """

    def __init__(self, rundir: RunDir, stage: str, *, steps: int, samples_per_step: int,
                 opponents_rel: str | None = None, n_samples: int = 0, opponent_batch: int = 1,
                 out: TextIO | None = None, every_s: float | None = None):
        self.rundir, self.stage, self.steps, self.samples_per_step = rundir, stage, steps, samples_per_step
        self.opponents_rel, self.n_samples, self.opponent_batch = opponents_rel, n_samples, max(1, opponent_batch)
        self.out = out or sys.stdout
        self.terminal = self.out.isatty()
        self.every_s = every_s if every_s is not None else (TERMINAL_EVERY_S if self.terminal else PIPED_EVERY_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{stage}", daemon=True)
        self._started = time.time()
        self._first_step: tuple[int, float] | None = None  # (step, time) when steps were first seen
        self._last_line = ""

    def __enter__(self) -> StageProgress:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # the last state, so a log ends with the finished stage, not a stale line
            try:
                self.show(self.read())
            except (OSError, ValueError):
                pass
        if self.terminal and self._last_line:
            self.out.write("\n")  # leave the redrawn line on screen
            self.out.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.show(self.read())
            except (OSError, ValueError):  # a file being replaced, a store that hiccups: next time
                continue

    def read(self) -> Snapshot:
        """The stage's progress as the run directory shows it now."""
        rel = self.rundir.stage_progress(self.stage)
        info = self.rundir.read_json(rel) if self.rundir.exists(rel) else {}
        opponents = None
        if self.opponents_rel is not None:
            files = len(self.rundir.glob(f"{self.opponents_rel}/*.parquet")) if self.rundir.exists(
                self.opponents_rel) else 0
            opponents = min(self.n_samples, files * self.opponent_batch)
        return Snapshot(step=int(info.get("step", 0)), loss=info.get("loss"), opponents=opponents)

    def show(self, snapshot: Snapshot, now: float | None = None) -> None:
        """Write the line for ``snapshot`` (redrawn on a terminal; piped only when it changed)."""
        line = self.line(snapshot, time.time() if now is None else now)
        if self.terminal:
            self.out.write("\r\033[K" + line)
        elif line.split(" | eta")[0] != self._last_line.split(" | eta")[0]:
            self.out.write(line + "\n")
        else:
            return
        self._last_line = line
        self.out.flush()

    def line(self, snapshot: Snapshot, now: float) -> str:
        """``[iter_1] opponents 640/2240 | step 20/70 | loss 0.41 | 12.3 samples/s | eta 1m40s``."""
        parts = []
        if snapshot.opponents is not None:
            parts.append(f"opponents {snapshot.opponents}/{self.n_samples}")
        parts.append(f"step {snapshot.step}/{self.steps}")
        if snapshot.loss is not None:
            parts.append(f"loss {snapshot.loss:.4g}")
        if snapshot.step > 0 and self._first_step is None:
            self._first_step = (snapshot.step, now)
        rate = self._step_rate(snapshot.step, now)
        if rate:
            parts.append(f"{rate * self.samples_per_step:.1f} samples/s")
            parts.append(f"eta {_duration((self.steps - snapshot.step) / rate)}")
        else:
            parts.append(f"starting ({_duration(now - self._started)})")
        return f"[{self.stage}] " + " | ".join(parts)

    def _step_rate(self, step: int, now: float) -> float | None:
        if self._first_step is None or step <= self._first_step[0] or now <= self._first_step[1]:
            return None
        return (step - self._first_step[0]) / (now - self._first_step[1])


def _duration(seconds: float) -> str:
    seconds = max(0, int(math.ceil(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
