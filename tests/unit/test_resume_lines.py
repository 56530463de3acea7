"""A rerun says what it skips, reuses and resumes: one line per stage.

``self_play.run`` is driven without Ray (as in test_stale_iterations.py): Ray's start, the base
model and the trainer are stand-ins, the run directory is real, so the lines come from what is
really on disk (DONE markers, cached opponent files, Ray Train's checkpoint snapshot).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray import self_play, stages
from spin_ray.config import load_config
from spin_ray.opponents import FILE_PATTERN
from spin_ray.rundir import RunDir


def config(run_dir: Path, **values):
    values = {"run_dir": str(run_dir), "eval.enabled": False, **values}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def finished(rundir: RunDir, rel: str) -> None:
    rundir.write_text_atomic(f"{rel}/model/weights.txt", rel)
    rundir.mark_done(rel, {})


def test_rerunning_a_finished_run_says_every_stage_is_reused(tmp_path, no_ray, capsys):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    rundir.mark_done(RunDir.PREPARED, {"n_rows": 8})
    for rel in (RunDir.baseline("sft"), "iter_1", "iter_2"):
        finished(rundir, rel)

    self_play.run(config(run_dir, **{"self_play.iterations": 2, "self_play.sft_baseline": True}))

    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"[prepare] already done in an earlier run: reusing its 8 encoded real rows in {run_dir}/prepared/data",
        *(f"[{rel}] already trained in an earlier run: model already published, reusing {run_dir}/{rel}/model"
          for rel in ("baseline_sft", "iter_1", "iter_2")),
    ]


@pytest.fixture
def trainer_stub(monkeypatch):
    """The Ray parts of run_stage replaced; the model must not be published again."""
    import spin_ray.pairs
    import spin_ray.trainer

    monkeypatch.setattr(spin_ray.trainer, "fit", lambda plan, dataset, **kwargs: SimpleNamespace(checkpoint=None))
    monkeypatch.setattr(spin_ray.trainer, "checkpoint_history", lambda checkpoint: [])
    monkeypatch.setattr(spin_ray.pairs, "sample_table", lambda path, n_rows, n_samples, **kwargs: "samples")
    monkeypatch.setattr(spin_ray.pairs, "spin_pairs", lambda samples, spec, **kwargs: "pairs")
    monkeypatch.setattr(spin_ray.pairs, "in_stretch_order", lambda files, *args, **kwargs: files)  # no prepared table

    def publish(*args):
        raise AssertionError("the published model was published again")

    monkeypatch.setattr(stages, "_publish_model", publish)


def test_an_interrupted_iteration_says_what_it_reuses_and_where_training_resumes(tmp_path, no_ray, trainer_stub,
                                                                                 capsys):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    rundir.mark_done(RunDir.PREPARED, {"n_rows": 3})
    opponents = run_dir / "iter_1" / "opponents"
    opponents.mkdir(parents=True)
    for first in (0, 2):  # two of the six generation batches were written before the run died
        pq.write_table(pa.table({"sample_id": [first, first + 1]}),
                       opponents / FILE_PATTERN.format(first_id=first, uid="abcd1234"))
    snapshot = run_dir / "iter_1" / "train" / "iter_1" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"metrics": {"step": 4, "loss": 0.1}}}))
    weights = tmp_path / "weights"
    weights.mkdir()
    rundir.publish_dir(weights, "iter_1/model")  # ... after publishing theta_1, before iter_1/DONE

    self_play.run(config(run_dir, **{"self_play.iterations": 1, "train.steps": 6, "train.batch_size": 2,
                                     "generation.batch_size": 2, "train.warmup_steps": 0}))

    out = capsys.readouterr().out
    assert "[iter_1/opponents] 2 of 6 opponent batches (4 of 12 samples) already on disk, reused; " \
           "generating the other 8\n" in out
    assert "[iter_1] training 6 steps on 12 samples, 3 real rows repeated 4 times (spin," in out
    assert "[iter_1] training resumes from its Ray Train checkpoint at step 4 of 6\n" in out
    assert f"[iter_1] model already published at {run_dir}/iter_1/model by an earlier run; keeping it\n" in out
    assert rundir.is_done("iter_1")


def test_a_first_run_says_nothing_about_reuse(tmp_path, no_ray, trainer_stub, monkeypatch, capsys):
    published = []

    def publish(checkpoint, base, rundir, rel):
        published.append(rel)
        (tmp_path / "theta_1").mkdir()
        rundir.publish_dir(tmp_path / "theta_1", rel)

    monkeypatch.setattr(stages, "_publish_model", publish)
    run_dir = tmp_path / "run"
    RunDir(run_dir).mark_done(RunDir.PREPARED, {"n_rows": 100})  # the prepare stage stands in for itself

    self_play.run(config(run_dir, **{"self_play.iterations": 1, "train.steps": 3, "train.batch_size": 2,
                                     "train.warmup_steps": 0}))  # a longer warm-up adds its peak-lr line

    lines = [line for line in capsys.readouterr().out.splitlines()[1:]  # after the prepare line
             if " | step " not in line]  # and without the live progress line (spin_ray.progress)
    assert len(lines) == 1 and lines[0].startswith("[iter_1] training 3 steps on 6 samples (spin,"), lines
    assert published == ["iter_1/model"]


@pytest.mark.parametrize("text", [None, "{truncated", json.dumps({"latest_checkpoint_result": None})])
def test_checkpoint_step_is_none_without_a_readable_checkpoint(tmp_path, text):
    from spin_ray.trainer import checkpoint_step

    if text is not None:
        (tmp_path / "iter_1").mkdir()
        (tmp_path / "iter_1" / "checkpoint_manager_snapshot.json").write_text(text)
    assert checkpoint_step(str(tmp_path), "iter_1") is None


@pytest.mark.parametrize(("n_rows", "n_samples", "note"), [
    (8, 160, ", 8 real rows repeated 20 times"),
    (1024, 2240, ", 1024 real rows repeated about 2.2 times"),
    (1024, 1024, ""),
    (1024, 64, ""),
])
def test_repeat_note(n_rows, n_samples, note):
    assert stages._repeat_note(n_rows, n_samples) == note


@pytest.mark.parametrize(("overrides", "said"), [
    ({"data.path": "/data/mine", "eval.enabled": True, "eval.prompts": "toy"}, True),
    ({"model.pretrained": "/models/sd15", "data.path": "/data/mine", "eval.enabled": True,
      "eval.prompts": ["toy", "a.txt"]}, True),
    ({"eval.enabled": True, "eval.prompts": "toy"}, False),  # the toy world itself
    ({"data.path": "/data/mine", "eval.enabled": True, "eval.prompts": "mine.txt"}, False),
    ({"data.path": "/data/mine", "eval.enabled": False, "eval.prompts": "toy"}, False),
])
def test_own_data_evaluated_on_toy_prompts_is_said(tmp_path, capsys, overrides, said):
    self_play._say_if_toy_evaluation(config(tmp_path, **overrides))
    assert ("the evaluation uses the toy world's prompts" in capsys.readouterr().out) is said
