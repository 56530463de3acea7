"""A rerun whose config changed under finished stages (issue 19, item 1), and damaged finished
files met by the driver (item 3).

Fault injection: a finished run directory is rerun with a changed config. ``self_play.run`` is
driven through the command line (``cli.run_job``, exit codes included) with the stages replaced
by stand-ins that behave like the real ones for the run directory: ``run_stage`` writes the
stage's ``config.yaml``, publishes a model and marks the stage DONE; ``ensure_prepared`` writes
a shard and marks ``prepared`` DONE (checksummed).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from spin_ray import cli, integrity, self_play, stages
from spin_ray.config import dump_config, load_config
from spin_ray.rerun_check import HISTORY, ConfigDriftError, RerunChoice, check_rerun
from spin_ray.rundir import RunDir


@pytest.fixture
def trained(monkeypatch, no_ray, tmp_path):
    """The stages of self_play.run replaced; returns the stages trained, in order."""
    trained: list[str] = []

    def ensure_prepared(cfg, rundir, base_model):
        if not rundir.is_done(rundir.PREPARED):
            trained.append("prepared")
            rundir.write_bytes_atomic("prepared/data/part-0.parquet", b"rows" * 100)
            rundir.mark_done(rundir.PREPARED, {"n_rows": 4})
        return stages.Prepared(path=rundir.path("prepared/data"), n_rows=4)

    def run_stage(cfg, rundir, rel, **kwargs):
        if not rundir.is_done(rel):
            trained.append(rel)
            model = Path(tempfile.mkdtemp(dir=tmp_path)) / "model"
            model.mkdir()
            (model / "weights.safetensors").write_bytes(rel.encode() * 64)
            rundir.publish_dir(model, rundir.stage_model(rel))
            rundir.write_text_atomic(rundir.stage_config(rel), dump_config(cfg))
            rundir.mark_done(rel, {"steps": 1})
        return rundir.local_copy(rundir.stage_model(rel))

    monkeypatch.setattr(stages, "ensure_prepared", ensure_prepared)
    monkeypatch.setattr(stages, "run_stage", run_stage)
    integrity.forget_verified()
    return trained


def job(run_dir: Path, *args: str) -> int:
    """``python jobs/self_play.py`` on ``run_dir`` with 3 iterations, evaluation off."""
    return cli.run_job(self_play.run, [f"run_dir={run_dir}", "self_play.iterations=3", "eval.enabled=false",
                                       "self_play.baselines=[]", *args], rerun_flags=True)


def stale(run_dir: Path) -> list[str]:
    return sorted(p.name.split(".stale-")[0] for p in run_dir.iterdir() if ".stale-" in p.name)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / HISTORY).read_text().splitlines()]


def test_a_changed_beta_is_refused_before_any_work(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    assert job(run_dir, "loss.beta=2000") == 0
    assert trained == ["prepared", "iter_1", "iter_2", "iter_3"]
    config_before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()

    assert job(run_dir, "loss.beta=[2000,5000,2000]") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config changed: ")
    assert "loss.beta[iteration 2]: 2000.0 -> 5000.0 (iter_2, iter_3)" in err
    assert "--restart-from iter_2" in err and "--accept-config-change" in err
    assert trained == ["prepared", "iter_1", "iter_2", "iter_3"]  # nothing trained ...
    assert (run_dir / "config.yaml").read_text() == config_before  # ... nor written
    assert stale(run_dir) == [] and not (run_dir / HISTORY).exists()


def test_restart_from_redoes_that_stage_and_the_later_ones(tmp_path, trained):
    run_dir = tmp_path / "run"
    assert job(run_dir) == 0
    assert job(run_dir, "loss.beta=[2000,5000,2000]", "--restart-from", "iter_3") == 2  # iter_2 changed too
    assert stale(run_dir) == []
    assert job(run_dir, "loss.beta=[2000,5000,2000]", "--restart-from", "iter_2") == 0
    assert trained == ["prepared", "iter_1", "iter_2", "iter_3", "iter_2", "iter_3"]
    assert stale(run_dir) == ["iter_2", "iter_3"]
    assert [entry["stage"] for entry in history(run_dir) if entry["action"] == "restart"] == ["iter_2", "iter_3"]
    assert job(run_dir, "loss.beta=[2000,5000,2000]") == 0  # the redone stages match the config now


def test_accept_config_change_keeps_the_stages_and_records_the_change_once(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    assert job(run_dir) == 0
    assert job(run_dir, "train.weight_decay=0.5", "--accept-config-change") == 0
    assert trained == ["prepared", "iter_1", "iter_2", "iter_3"]
    accepted = [entry for entry in history(run_dir) if entry["action"] == "accept"]
    assert len(accepted) == 1
    assert {(c["stage"], c["key"], c["old"], c["new"]) for c in accepted[0]["changes"]} == {
        (f"iter_{k}", "train.weight_decay", 0.01, 0.5) for k in (1, 2, 3)}
    capsys.readouterr()
    assert job(run_dir, "train.weight_decay=0.5") == 0  # accepted: no longer a change
    assert job(run_dir) == 2  # back to the old value: a change against what was accepted
    assert "train.weight_decay: 0.5 -> 0.01" in capsys.readouterr().err


def test_allowed_changes_and_more_iterations_run_and_are_logged(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    assert job(run_dir, "train.steps=[5,5,5]") == 0
    capsys.readouterr()
    assert job(run_dir, "self_play.iterations=4", "train.steps=[5,5,5,7]", "train.lr=[1e-4,5e-5,5e-5,5e-5]",
               "eval.batch_size=2", "generation.num_actors=2") == 0
    assert trained[-1] == "iter_4" and len(trained) == 5
    out = capsys.readouterr().out
    assert "changing no finished stage" in out and "self_play.iterations: 3 -> 4" in out
    assert "eval.batch_size: 64 -> 2" in out  # configs/default.yaml has 64
    allowed = [entry for entry in history(run_dir) if entry["action"] == "allowed"]
    assert {c["key"] for c in allowed[0]["changes"]} == {"self_play.iterations", "train.steps", "train.lr",
                                                        "eval.batch_size", "generation.num_actors"}


def test_restart_from_prepared_sets_everything_aside(tmp_path, trained):
    run_dir = tmp_path / "run"
    assert job(run_dir) == 0
    assert job(run_dir, "model.resolution=64") == 2
    assert job(run_dir, "model.resolution=64", "--restart-from", "prepared") == 0
    assert stale(run_dir) == ["iter_1", "iter_2", "iter_3", "prepared"]
    assert trained[4:] == ["prepared", "iter_1", "iter_2", "iter_3"]


def test_a_stage_without_its_config_is_reused_with_a_warning(tmp_path, trained, caplog):
    run_dir = tmp_path / "run"
    assert job(run_dir) == 0
    (run_dir / "iter_1" / "config.yaml").unlink()  # as a run directory from before the check
    (run_dir / "prepared" / "config.yaml").unlink()
    with caplog.at_level("WARNING", logger="spin_ray.rerun_check"):
        assert job(run_dir, "seed=5", "--restart-from", "iter_2") == 0
    assert "iter_1 was finished without its config" in caplog.text and "prepared was finished without" in caplog.text


def test_a_bad_restart_name_is_a_one_line_error(tmp_path, trained, capsys):
    assert job(tmp_path / "run", "--restart-from", "iter_0") == 2
    assert "--restart-from iter_0: expected prepared, baseline_<name>" in capsys.readouterr().err


def test_a_damaged_opponent_or_prepared_table_stops_the_rerun(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    assert job(run_dir, "self_play.iterations=1", "train.lr=5e-5") == 0
    weights = run_dir / "iter_1" / "model" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    integrity.forget_verified()  # a new process
    capsys.readouterr()
    assert job(run_dir, "self_play.iterations=2", "train.lr=5e-5") == 2  # theta_1 would be iteration 2's opponent
    err = capsys.readouterr().err
    assert re.search(r"integrity error: .*iter_1/model/weights.safetensors has sha256 .*--restart-from iter_1", err)
    assert trained == ["prepared", "iter_1"]
    assert job(run_dir, "self_play.iterations=2", "train.lr=5e-5", "--restart-from", "iter_1") == 0
    assert trained[2:] == ["iter_1", "iter_2"]

    shard = run_dir / "prepared" / "data" / "part-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-1])  # cut off
    integrity.forget_verified()
    assert job(run_dir, "self_play.iterations=2", "train.lr=5e-5") == 2
    assert "part-0.parquet has 399 bytes, 400 were recorded" in capsys.readouterr().err


def test_check_rerun_on_a_new_run_directory_does_nothing(tmp_path):
    rundir = RunDir(tmp_path / "new")
    check_rerun(load_config(None, [f"run_dir={tmp_path / 'new'}"]), rundir, RerunChoice())
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigDriftError, match="expected prepared"):
        check_rerun(load_config(None, []), rundir, RerunChoice(restart_from=("final",)))


def test_an_unfinished_iteration_is_compared_with_the_config_that_started_it(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    assert job(run_dir, "self_play.iterations=2", "train.lr=5e-5") == 0
    (run_dir / "iter_2" / "DONE").unlink()  # killed before the end: its opponents and checkpoints stay
    capsys.readouterr()
    assert job(run_dir, "self_play.iterations=2", "train.lr=[5e-5,1e-5]") == 2
    err = capsys.readouterr().err
    assert "train.lr[iteration 2]: 5e-05 -> 1e-05 (iter_2)" in err and "--restart-from iter_2" in err
    assert job(run_dir, "self_play.iterations=2", "train.lr=[5e-5,1e-5]", "--restart-from", "iter_2") == 0
    assert stale(run_dir) == ["iter_2"] and trained[-1] == "iter_2"
