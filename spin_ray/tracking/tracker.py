"""The job's tracker run: what the self-play driver calls at its start, around each stage, after
the evaluation and at its end.

Everything is logged from the driver, from what the run directory holds: the training workers
(rank 0) already record every logged step there (:func:`spin_ray.progress.write_progress`, live;
the stage's ``metrics.json`` history, at its end), so the trackers need no access from the
workers, which may run on other nodes, and a resumed job logs its finished stages again from
their records. While a stage runs, :class:`LiveStage` polls its progress file and its opponent
cache every :data:`LIVE_EVERY_S` seconds; the history written at the stage's end then fills in
the steps the polling missed (a step is logged once per stage).

Steps: ``train/*`` of the job run go against a global step that continues across the baselines
and iterations in the order they are logged; each stage's own view (:mod:`~spin_ray.tracking.backends`)
against the stage's optimizer step.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spin_ray.run_layout import RunLayout
from spin_ray.rundir import RunDir
from spin_ray.tracking import records
from spin_ray.tracking.backends import Backend

LOGS = RunLayout.LOGS
"""The run directory's folder of tracker files (TensorBoard event files, wandb's offline runs)."""
LIVE_EVERY_S = 2.0
REPORT_METRICS = "metrics.json"
REPORT_GRID = "image_grid.png"


class Tracker:
    """Sends a job's metrics to its backends (none: every call does nothing)."""

    def __init__(self, backends: list[Backend], rundir: RunDir, *, opponent_batch: int = 1,
                 live_every_s: float = LIVE_EVERY_S, local_logs: Path | None = None):
        self.backends, self.rundir = backends, rundir
        self.opponent_batch, self.live_every_s = max(1, opponent_batch), live_every_s
        self.local_logs = local_logs
        """Where TensorBoard writes when the run directory is not local (copied to it at each stage's end)."""
        self.global_step = 0
        """Optimizer steps of the stages logged so far: the global step of the next stage's step 0."""
        self.watchers: dict[str, LiveStage] = {}
        """The running stages' live pollers."""
        self._logged: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ stages

    @contextmanager
    def stage(self, rel: str) -> Iterator[None]:
        """Around a stage's training: live logging while it runs, its recorded history at its end
        (also for a stage an earlier run finished: its records are logged again)."""
        if not self.backends:
            yield
            return
        self._each("start_stage", rel)
        watcher = self.watchers[rel] = LiveStage(self, rel, every_s=self.live_every_s)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            del self.watchers[rel]
            self._finish_stage(rel)

    def log_stage(self, rel: str) -> None:
        """A stage that ran without :meth:`stage` around it: its recorded history, once finished."""
        with self.stage(rel):
            pass

    def log_report(self, rel: str, report: Mapping[str, Any]) -> None:
        """One training report of stage ``rel`` (a history entry), at the stage's step and the global
        step; a step already logged for this stage is not logged again."""
        step = int(report.get("step", 0))
        with self._lock:
            seen = self._logged.setdefault(rel, set())
            if step in seen:
                return
            seen.add(step)
        values = records.step_scalars(report)
        if values:
            self._each("log_metrics", values, self.global_step + step)
            self._each("log_metrics", values, step, stage=rel)

    def log_generation(self, rel: str, values: Mapping[str, float], step: int) -> None:
        """Generation numbers (``generation/*``) of stage ``rel`` at the stage's ``step``."""
        self._each("log_metrics", values, self.global_step + step)
        self._each("log_metrics", values, step, stage=rel)

    def _finish_stage(self, rel: str) -> None:
        metrics_rel = self.rundir.stage_metrics(rel)
        record = self.rundir.read_json(metrics_rel) if self.rundir.exists(metrics_rel) else None
        if record is not None:
            for report in sorted(record.get("history", []), key=lambda report: int(report.get("step", 0))):
                self.log_report(rel, report)  # the steps the live polls did not see
            steps = int(record.get("steps") or max(self._logged.get(rel, {0}), default=0))
            summary = records.stage_summary(record)
            self._each("log_metrics", summary, steps, stage=rel)
            self.global_step += steps
        self._each("end_stage", rel)
        self._sync_logs()

    # ------------------------------------------------------------------ evaluation and the end

    def log_evaluation(self) -> None:
        """Every score of every model in the run's reports (``report/metrics.json``, or one per
        prompt set), and each report's image grid as an image, at the global step."""
        if not self.backends:
            return
        for report_rel in self._report_dirs():
            prompt_set = report_rel.split("/", 1)[1] if "/" in report_rel else None
            scalars = records.eval_scalars(self.rundir.read_json(f"{report_rel}/{REPORT_METRICS}"), prompt_set)
            self._each("log_metrics", scalars, self.global_step)
            grid_rel = f"{report_rel}/{REPORT_GRID}"
            if self.rundir.exists(grid_rel):
                tag = f"{records.EVAL_PREFIX}/{prompt_set}/image_grid" if prompt_set else f"{records.EVAL_PREFIX}/image_grid"
                with self._local_file(grid_rel) as local:
                    self._each("log_image", tag, local, self.global_step)
        self._sync_logs()

    def _report_dirs(self) -> list[str]:
        top = self.rundir.report()
        if self.rundir.exists(f"{top}/{REPORT_METRICS}"):
            return [top]
        return [found.rsplit("/", 1)[0] for found in self.rundir.glob(f"{top}/*/{REPORT_METRICS}")]

    @contextmanager
    def _local_file(self, rel: str) -> Iterator[Path]:
        if self.rundir.is_local:
            yield self.rundir.local_path(rel)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / rel.rsplit("/", 1)[-1]
            with self.rundir.open_read(rel) as handle:
                local.write_bytes(handle.read())
            yield local

    def close(self, failed: bool = False) -> None:
        """End the job's tracker run (``failed``: the job raised)."""
        self._each("close", failed)
        self._sync_logs()
        self.backends = []

    def _each(self, method: str, *args, **kwargs) -> None:
        """Call ``method`` of every backend (the live thread and the driver share them). A backend
        that fails (a tracking server gone, a full disk) is reported once and dropped: tracking never
        stops a training run."""
        with self._lock:
            for backend in list(self.backends):
                try:
                    getattr(backend, method)(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 (whatever the tracker library raises)
                    self.backends.remove(backend)
                    reason = " ".join(str(err).split())[:300] or type(err).__name__
                    print(f"[tracking] {type(backend).__name__} failed in {method} ({reason}); "
                          "no more logging to it in this job", flush=True)

    def _sync_logs(self) -> None:
        """A run directory on an object store: copy the local TensorBoard files into ``logs/``."""
        if self.local_logs is None:
            return
        for path in sorted(self.local_logs.rglob("*")):
            if path.is_file() and "wandb" not in path.relative_to(self.local_logs).parts:
                self.rundir.upload_file(path, f"{LOGS}/{path.relative_to(self.local_logs).as_posix()}")


class LiveStage:
    """A thread that logs a running stage from the run directory: each new training report in rank
    0's progress file (its ``recent`` reports, :func:`spin_ray.progress.write_progress`) and the
    opponents generated so far."""

    def __init__(self, tracker: Tracker, rel: str, *, every_s: float = LIVE_EVERY_S):
        self.tracker, self.rel, self.every_s = tracker, rel, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tracking-{rel}", daemon=True)
        self._step = 0
        self._opponents: tuple[int, float] | None = None  # (count, time) when first seen
        self._last_count = -1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # what was written after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        """Log what is new; a file being replaced, or a store that hiccups, waits for the next poll."""
        try:
            self._poll_training()
            self._poll_opponents()
        except (OSError, ValueError):
            return

    def _poll_training(self) -> None:
        rundir = self.tracker.rundir
        rel = rundir.stage_progress(self.rel)
        if not rundir.exists(rel):
            return
        for report in rundir.read_json(rel).get("recent", []):  # rank 0's last reports, in step order
            if isinstance(report, dict) and "step" in report:
                self._step = max(self._step, int(report["step"]))
                self.tracker.log_report(self.rel, report)

    def _poll_opponents(self) -> None:
        rundir = self.tracker.rundir
        folder = rundir.stage_opponents(self.rel)
        if not rundir.exists(folder):
            return
        count = len(rundir.glob(f"{folder}/*.parquet")) * self.tracker.opponent_batch
        if count == self._last_count:
            return
        self._last_count, now = count, time.time()
        if self._opponents is None:
            self._opponents = (count, now)
            values = {f"{records.GENERATION_PREFIX}/opponents_done": float(count)}
        else:
            first, since = self._opponents
            values = {f"{records.GENERATION_PREFIX}/opponents_done": float(count),
                      f"{records.GENERATION_PREFIX}/opponents_per_s": (count - first) / max(now - since, 1e-9)}
        self.tracker.log_generation(self.rel, values, self._step)
