"""Checkpoint evaluation during training (``train.eval_every``, ``train.keep``): which steps are
scored, which checkpoint is published, the config errors, and that a resumed stage reuses the
scores it already has (spin_ray.checkpoint_selection; the Ray run end to end is in
tests/integration/test_baselines_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from spin_ray import checkpoint_selection
from spin_ray.checkpoint_selection import (
    choose,
    scored_steps,
    select_and_publish,
    snapshot_checkpoint_every,
    stage_selection,
)
from spin_ray.config import ConfigError, load_config
from spin_ray.eval import scoring
from spin_ray.rundir import RunDir


def config(**values):
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_every_nth_step_and_the_last_are_scored():
    assert scored_steps(6, 2) == [2, 4, 6]
    assert scored_steps(7, 3) == [3, 6, 7]
    assert scored_steps(2, 5) == [2]
    assert scored_steps(10, 0) == []
    # the loop's checkpoint period meets both the scored steps and train.checkpoint_every
    assert snapshot_checkpoint_every(4, 0) == 4
    assert snapshot_checkpoint_every(4, 6) == 2
    assert snapshot_checkpoint_every(5, 10) == 5


def test_keep_best_publishes_the_argmax_and_keep_last_the_last():
    curve = [{"step": 2, "average": 0.40}, {"step": 4, "average": 0.55}, {"step": 6, "average": 0.48},
             {"step": 8, "average": 0.55}]
    step, reason = choose(curve, "best")
    assert step == 4  # the highest; of the two equal ones the earlier
    assert reason.startswith("keep=best") and "0.55 at step 4" in reason and "last step 8" in reason
    assert choose(curve, "last")[0] == 8
    assert choose([{"step": 3, "average": 0.1, "toy": 0.9}], "best", metric="toy")[0] == 3
    with pytest.raises(ValueError, match="no scored checkpoint"):
        choose([], "best")


def test_a_baseline_takes_its_own_values_and_falls_back_to_train():
    cfg = config(**{"train.eval_every": 5, "baselines.sft.eval_every": 2, "baselines.sft.keep": "best",
                    "eval.selection_prompts": "toy_selection"})
    sft = stage_selection(cfg, "sft")
    assert (sft.eval_every, sft.keep, sft.keys) == (2, "best", ("baselines.sft.eval_every", "baselines.sft.keep"))
    dpo = stage_selection(cfg, "dpo")
    assert (dpo.eval_every, dpo.keep, dpo.keys) == (5, "last", ("train.eval_every", "train.keep"))


@pytest.mark.parametrize(("values", "message"), [
    ({"train.keep": "best"}, "train.keep: 'best' needs checkpoints scored during training; set train.eval_every > 0"),
    ({"self_play.baselines": ["sft"], "baselines.sft.keep": "best"},
     "baselines.sft.keep: 'best' needs .* set train.eval_every > 0"),
    ({"train.eval_every": 3, "eval.selection_prompts": ""},
     "train.eval_every: 3 scores checkpoints on eval.selection_prompts, which is empty"),
    ({"self_play.baselines": ["dpo"], "baselines.dpo.eval_every": 2, "eval.selection_prompts": []},
     "baselines.dpo.eval_every: 2 scores checkpoints on eval.selection_prompts, which is empty"),
    ({"train.eval_every": -1}, "train.eval_every: must be >= 0, got -1"),
])
def test_a_selection_that_cannot_work_is_a_one_line_config_error(values, message):
    with pytest.raises(ConfigError, match=message) as error:  # from loading, should the config check it too
        checkpoint_selection.check_selection_config(config(**values))
    assert "\n" not in str(error.value)


def test_the_error_comes_before_any_stage_trains(tmp_path, no_ray, monkeypatch):
    from spin_ray import self_play, stages

    monkeypatch.setattr(stages, "_train", lambda *args, **kwargs: pytest.fail("trained despite the bad config"))
    with pytest.raises(ConfigError, match="train.keep"):
        self_play.run(config(**{"run_dir": str(tmp_path / "run"), "eval.enabled": False, "train.keep": "best"}))
    assert not (tmp_path / "run" / "prepared").exists()


# ----------------------------------------------------------------------------- scoring, resuming


def fake_checkpoint(rundir: RunDir, stage: str, step: int, build: Path) -> None:
    """A published checkpoint directory (its content is never loaded: generation is replaced)."""
    local = build / f"step_{step}"
    local.mkdir(parents=True)
    (local / "weights.txt").write_text(f"theta after step {step}")
    rundir.publish_dir(local, rundir.stage_checkpoint(stage, step), {"step": step})


@pytest.fixture
def scored_run(tmp_path, monkeypatch):
    """A stage with checkpoints at steps 2, 4, 6 whose images score (p + 1) * step / 100 for
    image 0 and half of that for image 1 of prompt p; generate_and_score counts its calls."""
    calls: list[str] = []

    def generate_and_score(model, prompts, cfg):
        calls.append(model)
        step = int(Path(model).name.removeprefix("step_"))
        n_images = cfg.eval.num_images_per_prompt
        rows = [(p, i) for p in range(len(prompts)) for i in range(n_images)]
        return pa.table({"prompt_index": [p for p, _ in rows], "image_index": [i for _, i in rows],
                         "toy": [(p + 1) * step / 100 / (1 + i) for p, i in rows]})

    monkeypatch.setattr(scoring, "generate_and_score", generate_and_score)
    cfg = config(**{"run_dir": str(tmp_path / "run"), "eval.selection_prompts": "toy_selection",
                    "eval.scorers": ["toy"], "eval.max_prompts": 3, "eval.num_images_per_prompt": 2,
                    "baselines.sft.eval_every": 2, "baselines.sft.keep": "best"})
    rundir = RunDir(cfg.run_dir)
    for step in (2, 4, 6):
        fake_checkpoint(rundir, "baseline_sft", step, tmp_path / "build")
    return cfg, rundir, calls


def test_the_curve_holds_each_checkpoints_best_of_n_mean_and_a_rerun_reuses_the_scores(scored_run):
    cfg, rundir, calls = scored_run
    history = [{"step": s, "lr": 1e-4 * s, "loss": 1.0 / s} for s in range(1, 7)]
    points = checkpoint_selection.selection_curve(cfg, rundir, "baseline_sft", 6, 2, history)
    assert len(calls) == 3
    # best of 2 per prompt is image 0, (p + 1) * step / 100; the mean over prompts 0..2 is 2 * step / 100
    assert [p["step"] for p in points] == [2, 4, 6]
    assert [p["toy"] for p in points] == pytest.approx([0.04, 0.08, 0.12])
    assert [p["average"] for p in points] == pytest.approx([0.04, 0.08, 0.12])
    assert [(p["lr"], p["loss"]) for p in points] == [(2e-4, 0.5), (4e-4, 0.25), (pytest.approx(6e-4), 1 / 6)]

    again = checkpoint_selection.selection_curve(cfg, rundir, "baseline_sft", 6, 2, history)
    assert len(calls) == 3, "a resumed stage scored its checkpoints again"
    assert again == points


def test_the_chosen_checkpoint_becomes_the_stages_model_and_the_curve_is_written(scored_run, monkeypatch):
    cfg, rundir, calls = scored_run
    # a hand-built curve whose best is not the last step: step 4
    scores = {2: 0.3, 4: 0.7, 6: 0.5}
    monkeypatch.setattr(checkpoint_selection, "score_checkpoint",
                        lambda cfg, rundir, stage, step, prompts: {"toy": scores[step], "average": scores[step]})
    record = select_and_publish(cfg, rundir, "baseline_sft", stage_selection(cfg, "sft"), steps=6, history=[])

    assert record["published_step"] == 4 and record["keep"] == "best" and record["prompt_set"] == "toy_selection"
    model = Path(rundir.path(rundir.stage_model("baseline_sft")))
    assert (model / "weights.txt").read_text() == "theta after step 4"
    assert rundir.read_done(rundir.stage_model("baseline_sft"))["step"] == 4
    assert rundir.read_json(rundir.stage_selection_curve("baseline_sft")) == json.loads(json.dumps(record))
    # a rerun that died before the stage's DONE keeps what it published
    assert select_and_publish(cfg, rundir, "baseline_sft", stage_selection(cfg, "sft"), steps=6,
                              history=[])["published_step"] == 4
    checkpoint_selection.remove_checkpoints(rundir, "baseline_sft")
    assert not rundir.exists(rundir.stage_checkpoints("baseline_sft")) and model.is_dir()


# ----------------------------------------------------------------------------- the training side


def test_the_worker_writes_models_at_the_scored_steps_and_ray_checkpoints_only_at_its_own(tmp_path,
                                                                                         tiny_pipeline_dir):
    from train_helpers import make_plan

    from spin_ray.diffusion import load_unet
    from spin_ray.train_loop import CheckpointRequest, Optimization, TrainState
    from spin_ray.trainer import Snapshots, reporting_snapshots

    rundir = RunDir(tmp_path / "run")
    unet = load_unet(str(tiny_pipeline_dir), local_files_only=True)
    optim = Optimization(unet, torch.optim.SGD(unet.parameters(), lr=0.1), None)
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), steps=5, checkpoint_every=1)
    handed: list[tuple[int, bool]] = []
    report = reporting_snapshots(lambda metrics, checkpoint: handed.append((metrics["step"], checkpoint is not None)),
                                 Snapshots(rundir, "iter_1", every=2, ray_checkpoint_every=3), plan, rank=0)
    for step in range(1, 6):
        with torch.no_grad():
            next(unet.parameters()).fill_(float(step))  # theta after step `step`
        report({"step": step}, CheckpointRequest(optim, TrainState(step=step)))

    assert handed == [(1, False), (2, False), (3, True), (4, False), (5, True)]
    assert sorted(p.name for p in (tmp_path / "run" / "iter_1" / "checkpoints").iterdir()) == [
        "step_000002", "step_000004", "step_000005"]
    for step in (2, 4, 5):
        saved = load_unet(rundir.path(rundir.stage_checkpoint("iter_1", step)), local_files_only=True)
        assert torch.all(next(saved.parameters()) == step)
        assert rundir.read_done(rundir.stage_checkpoint("iter_1", step))["step"] == step
    model = tmp_path / "run" / "iter_1" / "checkpoints" / "step_000002"
    assert {p.name for p in model.iterdir()} == {p.name for p in Path(tiny_pipeline_dir).iterdir()} | {"DONE"}


def test_the_paper_config_picks_the_sft_checkpoint_on_validation():
    paper = load_config(Path(__file__).resolve().parents[2] / "configs" / "sd15_pickapic.yaml")
    sft = stage_selection(paper, "sft")
    assert (sft.eval_every, sft.keep) == (250, "best")  # App. A.1: the best of the 2000 steps on validation
    assert scored_steps(paper.baselines.sft.steps, sft.eval_every) == list(range(250, 2001, 250))
    assert (stage_selection(paper).eval_every, stage_selection(paper, "dpo").keep) == (0, "last")
    checkpoint_selection.check_selection_config(paper)
    assert "validation" in paper.eval.selection_prompts
