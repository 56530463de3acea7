"""The paper's schedule made visible (#16 item 5): ``train.warmup_steps`` per iteration, and the
peak learning rate a stage really reaches when its warm-up is longer than its steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spin_ray import self_play, stages
from spin_ray.config import ConfigError, load_config
from spin_ray.rundir import RunDir
from spin_ray.stages import peak_lr, train_plan
from spin_ray.train_step import make_lr_scheduler

REPO = Path(__file__).resolve().parents[2]


def config(**values):
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


@pytest.mark.parametrize(("lr", "warmup", "steps", "expected"), [
    (2e-5, 200, 50, 4.9e-6),          # the paper's iteration 1: 49 / 200 of 2e-5
    (5e-8, 200, 200, 5e-8 * 199 / 200),  # iteration 3 never leaves warm-up
    (2e-5, 200, 500, 2e-5),           # iteration 2 reaches its peak at step 200
    (1e-4, 5, 70, 1e-4),              # the toy default
    (1e-4, 0, 3, 1e-4),               # no warm-up
    (1e-4, 10, 11, 1e-4),             # the last step is the first after warm-up
    (1e-4, 10, 10, 9e-5),
])
def test_peak_lr_by_hand(lr, warmup, steps, expected):
    assert peak_lr(lr, warmup, steps) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
@pytest.mark.parametrize(("warmup", "steps"), [(8, 5), (8, 8), (8, 9), (3, 12), (0, 4)])
def test_peak_lr_is_what_the_trainers_scheduler_reaches(schedule, warmup, steps):
    """The formula against the scheduler the trainer builds: the highest lr any of the
    stage's optimizer steps runs with."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    try:
        scheduler = make_lr_scheduler(optimizer, schedule=schedule, warmup_steps=warmup, total_steps=steps)
    except (ValueError, KeyError):
        pytest.skip(f"make_lr_scheduler has no {schedule!r} schedule")
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(used) == pytest.approx(peak_lr(1e-3, warmup, steps), rel=1e-9)


def test_warmup_steps_take_one_value_per_iteration():
    cfg = config(**{"self_play.iterations": 3, "train.warmup_steps": [10, 0, 5]})
    assert [train_plan(cfg, "m", k, "spin").warmup_steps for k in (1, 2, 3)] == [10, 0, 5]
    scalar = config(**{"self_play.iterations": 2, "train.warmup_steps": 7})
    assert [train_plan(scalar, "m", k, "spin").warmup_steps for k in (1, 2)] == [7, 7]
    with pytest.raises(ConfigError, match="train.warmup_steps: has 2 values but self_play.iterations is 3"):
        config(**{"self_play.iterations": 3, "train.warmup_steps": [1, 2]})
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0, got -1"):
        config(**{"self_play.iterations": 2, "train.warmup_steps": [3, -1]})
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0, got -2"):
        config(**{"train.warmup_steps": -2})


def test_the_paper_config_uses_independent_noise_and_the_papers_evaluation_seed():
    sd15 = load_config(REPO / "configs" / "sd15_pickapic.yaml")
    assert sd15.loss.shared_noise is False
    assert sd15.eval.seed == 5775709 == sd15.seed
    assert load_config(REPO / "configs" / "eval_paper.yaml").eval.seed == 5775709
    assert load_config(REPO / "configs" / "default.yaml").loss.shared_noise is True  # the toy keeps it (YAML says why)


def test_a_stage_whose_warmup_outlasts_it_says_its_peak_and_records_it(tmp_path, monkeypatch, capsys, no_ray):
    import spin_ray.pairs
    import spin_ray.ray_session
    import spin_ray.trainer

    monkeypatch.setattr(spin_ray.trainer, "fit", lambda plan, dataset, **kwargs: SimpleNamespace(checkpoint=None))
    monkeypatch.setattr(spin_ray.trainer, "checkpoint_history", lambda checkpoint: [])
    monkeypatch.setattr(spin_ray.pairs, "sample_table", lambda *args, **kwargs: "samples")
    monkeypatch.setattr(spin_ray.pairs, "spin_pairs", lambda samples, spec, **kwargs: "pairs")

    def publish(checkpoint, base, rundir, rel):
        (tmp_path / rel).mkdir(parents=True)
        rundir.publish_dir(tmp_path / rel, rel)

    monkeypatch.setattr(stages, "_publish_model", publish)
    run_dir = tmp_path / "run"
    RunDir(run_dir).mark_done(RunDir.PREPARED, {"n_rows": 100})
    self_play.run(config(**{"run_dir": str(run_dir), "eval.enabled": False, "self_play.iterations": 2,
                            "train.steps": [5, 8], "train.warmup_steps": [20, 4], "train.lr": [2e-5, 1e-4],
                            "train.batch_size": 2}))

    out = capsys.readouterr().out
    assert ("[iter_1] warm-up of 20 steps is longer than the 5 steps trained: the learning rate peaks at 4e-06, "
            "not 2e-05\n") in out
    assert "[iter_2] warm-up" not in out
    first = json.loads((run_dir / "iter_1" / "metrics.json").read_text())
    second = json.loads((run_dir / "iter_2" / "metrics.json").read_text())
    assert (first["peak_lr"], first["lr"], first["warmup_steps"]) == (pytest.approx(4e-6), 2e-5, 20)
    assert (second["peak_lr"], second["warmup_steps"]) == (1e-4, 4)
