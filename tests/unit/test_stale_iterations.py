"""Setting stale later iterations aside: work done against an opponent that is being replaced is
moved to ``<dir>.stale-<time>`` (never deleted) and redone, and nothing else is moved.

``self_play.run`` is driven with its stages replaced by stand-ins (no Ray, no models): the
stand-in trains like ``run_stage`` (a finished iteration is reused as it is, else a new model is
written and marked done). ``grid.set_aside_if_stale`` (:mod:`spin_ray.sweep.grid`) is called
directly, with the opponent identity ``grid.opponent_identity`` reads from a really (re)published
theta_{k-1}.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from spin_ray import self_play, stages
from spin_ray.config import load_config
from spin_ray.rundir import RunDir
from spin_ray.sweep import grid

SWEEP_DIR = RunDir.SWEEP


def stale_names(parent: Path, name: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(name)}\.stale-\d+$")
    return sorted(p.name for p in parent.iterdir() if pattern.match(p.name))


def finished_iteration(rundir: RunDir, rel: str, weights: str) -> None:
    rundir.write_text_atomic(f"{rel}/model/weights.txt", weights)
    rundir.mark_done(rel, {"weights": weights})


# ----------------------------------------------------------------------------- self_play.run


@pytest.fixture
def trained(monkeypatch, no_ray):
    """self_play.run's stages replaced; returns the (rel, opponent) of every stage that trained."""
    trained: list[tuple[str, str]] = []

    def run_stage(cfg, rundir, rel, *, model_path, base_model, prepared, iteration, loss_type, **kwargs):
        if rundir.is_done(rel):  # as the real run_stage: a finished stage is reused, not retrained
            return rundir.local_copy(f"{rel}/model")
        trained.append((rel, model_path))
        finished_iteration(rundir, rel, f"{rel} trained against {model_path}")
        return rundir.local_copy(f"{rel}/model")

    monkeypatch.setattr(stages, "ensure_prepared",
                        lambda cfg, rundir, base_model: stages.Prepared(path="prepared", n_rows=1))
    monkeypatch.setattr(stages, "run_stage", run_stage)
    return trained


def test_a_finished_iteration_after_an_unfinished_one_is_set_aside_and_trained_again(tmp_path, trained):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    rundir.write_text_atomic("iter_1/model/weights.txt", "half written")  # iteration 1 never finished
    finished_iteration(rundir, "iter_2", "against the old theta_1")  # ... but 2 did, against the old theta_1

    result = self_play.run(load_config(None, [f"run_dir={run_dir}", "self_play.iterations=2"]))

    theta_1 = str(run_dir / "iter_1" / "model")
    assert trained == [("iter_1", "/models/base"), ("iter_2", theta_1)]
    assert (run_dir / "iter_2/model/weights.txt").read_text() == f"iter_2 trained against {theta_1}"
    (aside,) = stale_names(run_dir, "iter_2")
    assert (run_dir / aside / "model/weights.txt").read_text() == "against the old theta_1"  # kept, not deleted
    assert RunDir(run_dir).read_done(aside) == {"weights": "against the old theta_1"}
    assert result.models["iter_2"] == str(run_dir / "iter_2" / "model")
    assert stale_names(run_dir, "iter_1") == []


def test_finished_iterations_in_order_are_reused_and_nothing_is_set_aside(tmp_path, trained):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    finished_iteration(rundir, "iter_1", "theta_1")
    finished_iteration(rundir, "iter_2", "theta_2")

    self_play.run(load_config(None, [f"run_dir={run_dir}", "self_play.iterations=3"]))

    assert trained == [("iter_3", str(run_dir / "iter_2" / "model"))]
    assert (run_dir / "iter_1/model/weights.txt").read_text() == "theta_1"
    assert (run_dir / "iter_2/model/weights.txt").read_text() == "theta_2"
    assert [p.name for p in run_dir.iterdir() if ".stale-" in p.name] == []


# ----------------------------------------------------------------------------- grid.set_aside_if_stale


def publish_theta_1(rundir: RunDir, tmp_path: Path, weights: str) -> dict:
    """Publish iter_1/model as the sweep does (a fresh publish id each time); its identity."""
    local = tmp_path / f"theta_1_{uuid.uuid4().hex[:6]}"
    local.mkdir()
    (local / "weights.txt").write_text(weights)
    if rundir.exists("iter_1/model"):
        rundir.fs.rm(rundir.fs_path("iter_1/model"), recursive=True)
    rundir.publish_dir(local, "iter_1/model")
    return grid.opponent_identity(rundir, "iter_1/model")


def test_sweep_keeps_trials_against_the_same_opponent(tmp_path):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    identity = publish_theta_1(rundir, tmp_path, "theta_1")
    assert identity["opponent"] == "iter_1/model" and identity["publish_id"]

    grid.set_aside_if_stale(rundir, 2, identity)  # first visit: records the opponent
    assert rundir.read_json(f"{SWEEP_DIR}/iter_2/opponent.json") == identity
    rundir.write_text_atomic(f"{SWEEP_DIR}/iter_2/trial_a/result.json", "{}")

    grid.set_aside_if_stale(rundir, 2, grid.opponent_identity(rundir, "iter_1/model"))  # a resume
    assert rundir.exists(f"{SWEEP_DIR}/iter_2/trial_a/result.json")
    assert stale_names(run_dir / SWEEP_DIR, "iter_2") == []


def test_sweep_sets_aside_trials_and_the_published_iteration_of_a_replaced_opponent(tmp_path):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    old = publish_theta_1(rundir, tmp_path, "old theta_1")
    grid.set_aside_if_stale(rundir, 2, old)
    rundir.write_text_atomic(f"{SWEEP_DIR}/iter_2/trial_a/result.json", '{"score": 1}')
    finished_iteration(rundir, "iter_2", "against the old theta_1")
    rundir.write_text_atomic("iter_3/model/weights.txt", "unrelated")

    new = publish_theta_1(rundir, tmp_path, "new theta_1")  # iteration 1 redone: a new publication
    assert new != old
    grid.set_aside_if_stale(rundir, 2, new)

    (trials_aside,) = stale_names(run_dir / SWEEP_DIR, "iter_2")
    aside = f"{SWEEP_DIR}/{trials_aside}"
    assert rundir.read_text(f"{aside}/trial_a/result.json") == '{"score": 1}'
    assert rundir.read_json(f"{aside}/opponent.json") == old
    (published_aside,) = stale_names(run_dir, "iter_2")
    assert rundir.read_text(f"{published_aside}/model/weights.txt") == "against the old theta_1"
    assert not rundir.exists("iter_2") and not rundir.exists(f"{SWEEP_DIR}/iter_2/trial_a")
    assert rundir.read_json(f"{SWEEP_DIR}/iter_2/opponent.json") == new  # the new opponent recorded
    assert rundir.read_text("iter_3/model/weights.txt") == "unrelated"


def test_sweep_sets_aside_trials_with_no_record_of_their_opponent(tmp_path):
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    rundir.write_text_atomic(f"{SWEEP_DIR}/iter_1/trial_a/result.json", "{}")  # from before the marker existed

    grid.set_aside_if_stale(rundir, 1, grid.opponent_identity(rundir, RunDir.BASE))

    (aside,) = stale_names(run_dir / SWEEP_DIR, "iter_1")
    assert rundir.exists(f"{SWEEP_DIR}/{aside}/trial_a/result.json")
    assert rundir.read_json(f"{SWEEP_DIR}/iter_1/opponent.json") == {"opponent": "base"}
