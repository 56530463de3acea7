"""Experiment tracking (spin_ray.tracking) through its real path: a stage history made by real
training steps of the tiny UNet, logged by the tracker, read back with each library's own reader
(TensorBoard's EventAccumulator, wandb's offline run files). The MLflow server test is
test_tracking_mlflow.py."""

from __future__ import annotations

import sys

import pytest
from tracking_helpers import (
    STEPS,
    tracking_config,
    train_history,
    wandb_history,
    write_report,
    write_stage_metrics,
)

from spin_ray.config import ConfigError
from spin_ray.progress import write_progress
from spin_ray.rundir import RunDir
from spin_ray.tracking import LOGS, open_tracker


def event_reader(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def scalar_series(reader, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in reader.Scalars(tag)]


@pytest.fixture(scope="module")
def history(tiny_pipeline_dir):
    from spin_ray.diffusion import load_components

    return train_history(load_components(str(tiny_pipeline_dir), local_files_only=True))


def test_tensorboard_gets_every_stage_on_one_global_step_and_the_evaluation(tmp_path, history):
    cfg = tracking_config(tmp_path, ["tensorboard"])
    rundir = RunDir(cfg.run_dir)
    tracker = open_tracker(cfg, rundir)
    for stage, loss_type in (("baseline_sft", "sft"), ("iter_1", "spin")):
        with tracker.stage(stage):
            write_stage_metrics(rundir, stage, history, loss_type)
    summaries = write_report(rundir)
    tracker.log_evaluation()
    tracker.close()

    losses = [report["loss"] for report in history]
    job = event_reader(rundir.local_path(LOGS))
    # sft's steps 1..3 then iter_1's, continuing the global step: 4..6
    assert [step for step, _ in scalar_series(job, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in scalar_series(job, "train/loss")] == pytest.approx(losses * 2, rel=1e-6)
    for tag in ("train/implicit_acc", "train/reward_real", "train/reward_syn", "train/margin", "train/lr",
                "train/samples_per_s", "train/nonfinite_total"):
        assert len(job.Scalars(tag)) == 2 * STEPS, tag
    stage = event_reader(rundir.local_path(f"{LOGS}/iter_1"))
    assert [step for step, _ in scalar_series(stage, "train/loss")] == [1, 2, 3]  # the stage's own step
    assert scalar_series(stage, "generation/opponents") == [(STEPS, 2.0 * STEPS)]
    [(step, mean)] = scalar_series(job, "eval/iter_1/toy_reward/mean")
    assert (step, mean) == (2 * STEPS, pytest.approx(summaries["iter_1"]["toy_reward"].mean))
    assert scalar_series(job, "eval/iter_1/toy_reward/vs_base/win_rate")[0][1] == pytest.approx(0.875)
    [image] = job.Images("eval/image_grid")
    assert (image.width, image.height, image.step) == (40, 24, 2 * STEPS)
    assert "config" in " ".join(job.Tags()["tensors"])  # the resolved config as text


def test_a_running_stage_is_logged_live_and_each_step_once(tmp_path, history):
    cfg = tracking_config(tmp_path, ["tensorboard"])
    rundir = RunDir(cfg.run_dir)
    tracker = open_tracker(cfg, rundir)
    tracker.live_every_s = 3600  # the test polls by hand
    stage = tracker.stage("iter_1")
    stage.__enter__()  # what the driver's `with` does around the stage's training
    rundir.write_bytes_atomic("iter_1/opponents/part-0.parquet", b"x")
    for report in history:  # rank 0's side, as the trainer's reporting_progress calls it
        write_progress(rundir.path(rundir.stage_progress("iter_1")), report["step"], STEPS, report["loss"],
                       metrics=report)
    tracker.watchers["iter_1"].poll()
    assert tracker._logged["iter_1"] == {1, 2, 3}  # seen live, before the stage's metrics.json exists
    write_stage_metrics(rundir, "iter_1", history)
    stage.__exit__(None, None, None)  # the stage's end: its history fills in the steps the polls missed
    tracker.close()
    job = event_reader(rundir.local_path(LOGS))
    assert [step for step, _ in scalar_series(job, "train/loss")] == [1, 2, 3]  # no step twice
    assert scalar_series(job, "generation/opponents_done") == [(STEPS, float(cfg.generation.batch_size))]


@pytest.mark.slow  # wandb starts its service process: about 12 s
def test_wandb_offline_keeps_the_history_in_the_run_directory(tmp_path, history, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tracking_config(tmp_path, ["wandb"], project="spin-ray-test")
    rundir = RunDir(cfg.run_dir)
    tracker = open_tracker(cfg, rundir)
    with tracker.stage("iter_1"):
        write_stage_metrics(rundir, "iter_1", history)
    write_report(rundir)
    tracker.log_evaluation()
    tracker.close()
    [run] = rundir.local_path(f"{LOGS}/wandb").glob("offline-run-*")
    [run_file] = run.glob("run-*.wandb")  # the history, for `wandb sync`
    rows = wandb_history(run_file)
    losses = [report["loss"] for report in history]
    job = [(row["global_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert job == [(step, pytest.approx(loss)) for step, loss in zip(range(1, STEPS + 1), losses, strict=True)]
    stage = [(row["iter_1/step"], row["iter_1/train/loss"]) for row in rows if "iter_1/train/loss" in row]
    assert stage == job  # the only stage: its own step is the global step
    [evaluation] = [row for row in rows if "eval/iter_1/toy_reward/mean" in row]
    assert evaluation["eval/iter_1/toy_reward/mean"] == pytest.approx(0.75) and evaluation["global_step"] == STEPS
    assert list(run.glob("files/media/images/eval/image_grid_*.png"))


def test_a_backend_without_its_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec then reports it missing
    cfg = tracking_config(tmp_path, ["tensorboard", "mlflow"])
    with pytest.raises(ConfigError, match=r"tracking.backends: mlflow .* pip install 'spin_ray\[tracking\]'"):
        open_tracker(cfg, RunDir(cfg.run_dir))


def test_no_backends_logs_nothing(tmp_path, history):
    cfg = tracking_config(tmp_path, [])
    rundir = RunDir(cfg.run_dir)
    tracker = open_tracker(cfg, rundir)
    with tracker.stage("iter_1"):
        write_stage_metrics(rundir, "iter_1", history)
    tracker.log_evaluation()
    tracker.close()
    assert not rundir.exists(LOGS)


def test_a_failing_backend_is_reported_dropped_and_the_job_goes_on(tmp_path, history, capsys):
    cfg = tracking_config(tmp_path, ["tensorboard"])
    tracker = open_tracker(cfg, RunDir(cfg.run_dir))
    tracker.log_report("iter_9", history[0])  # a stage never started: TensorBoard has no writer for it
    assert tracker.backends == []
    assert "[tracking] TensorBoardBackend failed in log_metrics" in capsys.readouterr().out
    tracker.log_evaluation()  # nothing left to log to, and nothing raises
    tracker.close()
