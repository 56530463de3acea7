"""Resuming a sweep is opt-in (issue 23, finding 2): ``Tuner.restore`` unpickles Ray Tune's
state from the run directory, so it runs only with ``--resume``. Ray Tune itself is replaced
by a recording fake: no sweep runs here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from spin_ray.config import ConfigError, from_dict
from spin_ray.run_layout import RunLayout
from spin_ray.rundir import RunDir
from spin_ray.sweep.config import parse_sweep
from spin_ray.sweep.resume import RESUME_HINT, claim_run_dir

SIGNATURE_FILE = RunLayout.SWEEP_SIGNATURE


class FakeTuner:
    """Stands in for ``ray.tune.Tuner``: an experiment exists iff ``saved``; records calls."""

    saved = True
    calls: list[str] = []

    def __init__(self, *args, **kwargs):
        FakeTuner.calls.append("new")

    @classmethod
    def can_restore(cls, path):
        return cls.saved

    @classmethod
    def restore(cls, path, trainable, **kwargs):
        cls.calls.append("restore")
        return cls()

    def fit(self):
        FakeTuner.calls.append("fit")
        return []


@pytest.fixture
def fake_tune(monkeypatch):
    from ray import tune

    import spin_ray.sweep.tuner as tuner_module

    FakeTuner.saved, FakeTuner.calls = True, []
    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tuner_module, "trial_resources", lambda *args: {})
    monkeypatch.setattr(tuner_module, "head_node_resource", lambda: None)
    return FakeTuner


@pytest.fixture
def sweep_setup(tmp_path):
    cfg = from_dict({"run_dir": str(tmp_path / "run"), "train": {"steps": 10, "batch_size": 4, "num_workers": 1}})
    return cfg, parse_sweep({"space": {"loss.beta": {"grid": [2000, 5000]}}}, cfg)


def shared(cfg, sweep, *, resume):
    return SimpleNamespace(cfg=cfg, sweep=sweep, rundir=RunDir(cfg.run_dir), resume=resume)


def test_a_saved_experiment_is_not_restored_without_resume(fake_tune, sweep_setup):
    from spin_ray.sweep.tuner import run_tuner

    cfg, sweep = sweep_setup
    with pytest.raises(ConfigError, match="holds a Ray Tune experiment; rerun with --resume"):
        run_tuner(lambda config: None, shared(cfg, sweep, resume=False), storage_rel="sweep/iter_1", param_space={})
    assert fake_tune.calls == []  # neither restored nor replaced by a new experiment


def test_resume_restores_the_saved_experiment_and_a_fresh_one_starts_new(fake_tune, sweep_setup):
    from spin_ray.sweep.tuner import run_tuner

    cfg, sweep = sweep_setup
    run_tuner(lambda config: None, shared(cfg, sweep, resume=True), storage_rel="sweep/iter_1", param_space={})
    assert fake_tune.calls == ["restore", "new", "fit"]
    fake_tune.saved, fake_tune.calls = False, []
    for resume in (False, True):
        run_tuner(lambda config: None, shared(cfg, sweep, resume=resume), storage_rel="sweep/iter_1", param_space={})
    assert fake_tune.calls == ["new", "fit", "new", "fit"]


def test_rerunning_a_sweep_without_resume_stops_before_ray_and_never_restores(fake_tune, sweep_setup, monkeypatch):
    import spin_ray.ray_session
    from spin_ray.sweep import run_sweep

    cfg, sweep = sweep_setup
    monkeypatch.setattr(spin_ray.ray_session, "ensure_ray", lambda *a: pytest.fail("Ray was started"))
    RunDir(cfg.run_dir).write_json_atomic(SIGNATURE_FILE, sweep.search_signature())  # an earlier attempt
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, sweep)
    assert RESUME_HINT in str(err.value) and "\n" not in str(err.value)
    assert fake_tune.calls == []


def test_claiming_a_run_dir(sweep_setup):
    cfg, sweep = sweep_setup
    rundir = RunDir(cfg.run_dir)
    claim_run_dir(rundir, sweep.search_signature(), resume=True)  # nothing to resume: starts
    assert rundir.read_json(SIGNATURE_FILE) == sweep.search_signature()
    with pytest.raises(ConfigError, match=f"{rundir.path()} holds a sweep already; rerun with --resume"):
        claim_run_dir(rundir, sweep.search_signature(), resume=False)
    claim_run_dir(rundir, sweep.search_signature(), resume=True)


def test_the_command_line_passes_resume_and_turns_the_refusal_into_exit_2(monkeypatch, tmp_path, capsys):
    import yaml

    import spin_ray.sweep as sweep_module
    import spin_ray.sweep.job as job_module

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "eval": {"selection_prompts": "toy_selection"},
                                      "sweep": {"space": {"loss.beta": {"grid": [1]}}}}))
    seen = []

    def fake_run_sweep(cfg, sweep, *, resume=False):
        seen.append(resume)
        if not resume:
            raise ConfigError(f"sweep: {cfg.run_dir} holds a sweep already; {RESUME_HINT}")
        return sweep_module.SweepResult(run_dir=cfg.run_dir)

    monkeypatch.setattr(job_module, "run_sweep", fake_run_sweep)
    assert sweep_module.run_sweep_job(["--config", str(config), "--resume"]) == 0
    assert sweep_module.run_sweep_job(["--config", str(config)]) == 2
    assert seen == [True, False]
    assert capsys.readouterr().err.strip().endswith(RESUME_HINT)
