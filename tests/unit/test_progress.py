"""The driver's live progress line (spin_ray.progress): read from the run directory, redrawn on a
terminal, printed only when something changed when piped, with rate and ETA from the steps seen."""

from __future__ import annotations

from console_helpers import Output

from spin_ray.progress import Snapshot, StageProgress, write_progress
from spin_ray.rundir import RunDir


def progress(rundir: RunDir, out: Output, **kwargs) -> StageProgress:
    return StageProgress(rundir, "iter_1", steps=70, samples_per_step=32, opponents_rel="iter_1/opponents",
                         n_samples=2240, opponent_batch=16, out=out, **kwargs)


def test_progress_is_read_from_the_run_directory(tmp_path):
    rundir = RunDir(tmp_path)
    shown = progress(rundir, Output(False))
    assert shown.read() == Snapshot(step=0, loss=None, opponents=0)
    for first_id in (0, 16, 32):
        rundir.write_bytes_atomic(f"iter_1/opponents/part-{first_id:020d}-abc.parquet", b"x")
    rundir.write_bytes_atomic("iter_1/opponents/.part-x.parquet.tmp", b"partial")  # not counted
    write_progress(rundir.path("iter_1/progress.json"), 20, 70, 0.25)
    assert shown.read() == Snapshot(step=20, loss=0.25, opponents=48)


def test_the_line_gives_rate_and_eta_from_the_steps_seen(tmp_path):
    shown = progress(RunDir(tmp_path), Output(False))
    shown._started = 1000.0
    assert shown.line(Snapshot(0, None, 320), now=1012.0) == (
        "[iter_1] opponents 320/2240 | step 0/70 | starting (12s)")
    shown.line(Snapshot(10, 0.5, 640), now=1020.0)  # the first steps seen: the clock starts here
    # 20 more steps in 10 s: 2 steps/s = 64 samples/s; 40 steps left = 20 s
    assert shown.line(Snapshot(30, 0.4, 1280), now=1030.0) == (
        "[iter_1] opponents 1280/2240 | step 30/70 | loss 0.4 | 64.0 samples/s | eta 20s")


def test_piped_output_prints_a_line_only_when_progress_changed(tmp_path):
    out = Output(False)
    shown = progress(RunDir(tmp_path), out)
    shown.show(Snapshot(0, None, 0), now=1.0)
    shown.show(Snapshot(0, None, 0), now=2.0)  # nothing new (only the waiting time): no line
    shown.show(Snapshot(5, 0.3, 16), now=3.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "step 5/70" in lines[1] and "\r" not in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place(tmp_path):
    out = Output(True)
    with progress(RunDir(tmp_path), out, every_s=0.01) as shown:
        shown.show(Snapshot(5, 0.3, 16), now=3.0)
    text = out.getvalue()
    assert text.startswith("\r\033[K[iter_1]") and text.endswith("\n") and text.count("\n") == 1
