"""Baselines as stages of the same run (issue 16, item 1): the config, the (winner, loser) reader,
Diffusion-DPO through the train step, and ``run_baseline`` writing ``baseline_<name>/``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from test_data import BLUE, CORRUPT, GREEN, RED, pickapic_row, write_pickapic
from train_helpers import make_plan

from spin_ray import stages
from spin_ray.config import ConfigError, DataConfig, baseline_names, load_config
from spin_ray.data import LOSER_COLUMN, ReadStats, iter_sft_rows
from spin_ray.diffusion import row_noise_and_timesteps
from spin_ray.pair_schema import PAIR_COLUMNS, pair_batch
from spin_ray.pairs import _as_dpo_pair, _with_noise_seed
from spin_ray.run_layout import RunLayout
from spin_ray.rundir import RunDir
from spin_ray.train_loop import StepRunner

# ----------------------------------------------------------------------------- config


def test_baselines_parse_and_sft_baseline_is_a_synonym_for_sft():
    assert baseline_names(load_config(None, ["self_play.baselines=[dpo, sft]"])) == ["sft", "dpo"]  # report order
    assert baseline_names(load_config(None, ["self_play.sft_baseline=true"])) == ["sft"]
    both = load_config(None, ["self_play.sft_baseline=true", "self_play.baselines=[sft]"])  # consistent: fine
    assert baseline_names(both) == ["sft"]
    assert baseline_names(load_config(None, ["self_play.sft_baseline=true", "self_play.baselines=[dpo]"])) == [
        "sft", "dpo"]
    assert baseline_names(load_config(None, ["self_play.sft_baseline=false", "self_play.baselines=[]"])) == []
    cfg = load_config(None, ["baselines.dpo.beta=5000", "baselines.dpo.lr_schedule=constant",
                             "baselines.sft.steps=7", "baselines.sft.lr=1e-5"])
    assert (cfg.baselines.dpo.beta, cfg.baselines.dpo.lr_schedule) == (5000.0, "constant")
    assert (cfg.baselines.sft.steps, cfg.baselines.sft.lr, cfg.baselines.sft.batch_size) == (7, 1e-5, None)


@pytest.mark.parametrize(("overrides", "message"), [
    (["self_play.baselines=[sft, ppo]"], "self_play.baselines[1]: 'ppo' is not one of 'sft', 'dpo'"),
    (["self_play.baselines=[dpo, dpo]"], "self_play.baselines: 'dpo' is listed twice"),
    (["self_play.baselines=[dpo]", "data.format=parquet", "data.path=x.parquet"],
     "self_play.baselines: 'dpo' needs (winner, loser) pairs"),
    (["baselines.dpo.beta=0"], "baselines.dpo.beta: must be positive"),
    (["baselines.sft.warmup_steps=-1"], "baselines.sft.warmup_steps: must be >= 0"),
    (["baselines.sft.beta=100"], "unknown config key 'baselines.sft.beta'"),
])
def test_a_bad_baseline_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_shipped_configs_carry_the_baselines():
    default = load_config("configs/default.yaml")
    assert baseline_names(default) == ["sft", "dpo"]
    paper = load_config("configs/sd15_pickapic.yaml")
    assert baseline_names(paper) == ["sft", "dpo"]
    sft, dpo, workers = paper.baselines.sft, paper.baselines.dpo, paper.train.num_workers
    assert (sft.lr, sft.steps, sft.warmup_steps, sft.lr_schedule) == (1e-5, 2000, 500, "constant")
    assert sft.batch_size * sft.gradient_accumulation_steps * workers == 512  # the paper's global batch
    assert (dpo.lr, dpo.beta, dpo.steps) == (2e-5, 2000.0, 350)
    assert (dpo.batch_size, dpo.gradient_accumulation_steps, workers) == (8, 32, 8)


def test_an_unset_baseline_schedule_trains_as_the_sft_baseline_always_did():
    cfg = load_config(None, ["train.steps=[10,20,30]", "train.lr=[1e-4,5e-5,5e-5]", "loss.beta=[100,200,300]"])
    for name in ("sft", "dpo"):
        plan = stages.baseline_plan(cfg, name, "/models/base")
        assert (plan.steps, plan.lr, plan.beta, plan.loss_type) == (60, 1e-4, 100.0, name)
        assert (plan.batch_size, plan.warmup_steps, plan.lr_schedule) == (
            cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.lr_schedule)
    dpo = stages.baseline_plan(load_config(None, ["baselines.dpo.steps=5", "baselines.dpo.beta=2000",
                                                  "baselines.dpo.lr_schedule=cosine", "loss.shared_noise=false"]),
                               "dpo", "/models/base")
    assert (dpo.steps, dpo.beta, dpo.lr_schedule) == (5, 2000.0, "cosine")
    assert dpo.online_reference and dpo.shared_noise and dpo.init_model_path == "/models/base"  # theta_0 as reference


def test_the_layout_maps_dpo_to_its_stage_and_back():
    assert RunLayout.stage_of_model("dpo") == "baseline_dpo" and RunLayout.model_name("baseline_dpo") == "dpo"
    assert RunLayout.stage_of_model("sft") == "baseline_sft" and RunLayout.stage_of_model("ppo") is None


# ----------------------------------------------------------------------------- reader


def test_the_reader_keeps_winner_and_loser_and_drops_and_counts_ties(tmp_path):
    rows = [
        pickapic_row("zero wins", 1.0, jpg_0=RED, jpg_1=GREEN),
        pickapic_row("one wins", 0.0, jpg_0=GREEN, jpg_1=BLUE),
        pickapic_row("tie", 0.5, jpg_0=RED, jpg_1=BLUE),
        pickapic_row("bad loser", 1.0, jpg_0=RED, jpg_1=CORRUPT),
    ]
    path = write_pickapic(tmp_path / "train.parquet", rows)
    cfg = DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.5)
    stats = ReadStats()
    out = list(iter_sft_rows(cfg, stats, with_loser=True))
    assert [(r["prompt"], r["image"], r[LOSER_COLUMN], r["row_id"]) for r in out] == [
        ("zero wins", RED, GREEN, 0), ("one wins", BLUE, GREEN, 1)]
    assert stats == ReadStats(rows_read=4, rows_kept=2, ties_dropped=1, bad_rows={"bad_image": 1})
    # without a DPO baseline the loser is never read: the same row is kept, and no loser column
    plain = list(iter_sft_rows(cfg))
    assert [r["prompt"] for r in plain] == ["zero wins", "one wins", "bad loser"]
    assert LOSER_COLUMN not in plain[0]


# ----------------------------------------------------------------------------- DPO through the train step


class ScaledUNet(torch.nn.Module):
    """A stand-in UNet: eps(x_t) = w * x_t (w a learnable scalar), prompt and t ignored."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, noisy, timesteps, encoder_hidden_states):
        return SimpleNamespace(sample=self.w * noisy)


def test_the_dpo_loss_through_the_train_step_equals_the_hand_computed_value():
    """Diffusion-DPO (Wallace et al. 2023, eq. 14) on two (winner, loser) pairs built as the DPO
    baseline builds them (pairs.dpo_pairs), run by the trainer's StepRunner with theta_0 online."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    prepared = {"sample_id": np.arange(2, dtype=np.int64), "prompt_embeds": np.zeros((2, 3, 4), np.float16),
                "latents_real": torch.randn((2, 1, 2, 2), generator=g).numpy(),
                "latents_lose": torch.randn((2, 1, 2, 2), generator=g).numpy()}
    rows = _as_dpo_pair(_with_noise_seed(prepared, run_seed=0, iteration=1))
    assert set(PAIR_COLUMNS) <= set(rows) and np.isnan(rows["ref_mse_real"]).all()
    beta, w_policy, w_ref = 50.0, 0.3, 0.1
    policy, reference = ScaledUNet(w_policy), ScaledUNet(w_ref)
    runner = StepRunner(make_plan(loss_type="dpo", online_reference=True, beta=beta), policy, reference, scheduler,
                        torch.device("cpu"))
    metrics = runner.forward_backward({k: torch.as_tensor(v) for k, v in rows.items()})

    # by hand: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the same t and eps for winner and loser
    draw = row_noise_and_timesteps(rows["noise_seed"].tolist(), (1, 2, 2), 1000)
    abar = scheduler.alphas_cumprod[draw.timesteps].view(-1, 1, 1, 1)
    eps = draw.noise_real

    def err(w, x0):
        x_t = abar.sqrt() * torch.as_tensor(x0) + (1 - abar).sqrt() * eps
        return ((w * x_t - eps) ** 2).mean(dim=(1, 2, 3))

    win, lose = rows["latents_real"], rows["latents_syn"]
    logits = -(beta / 2) * ((err(w_policy, win) - err(w_ref, win)) - (err(w_policy, lose) - err(w_ref, lose)))
    expected = F.softplus(-logits).mean().item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["logits_mean"] == pytest.approx(logits.mean().item(), rel=1e-5)
    assert "reward_win" in metrics and policy.w.grad is not None and reference.w.grad is None
    assert not math.isclose(expected, math.log(2), rel_tol=1e-3)  # a value the test can tell apart


def test_the_dpo_batch_is_the_spin_pair_row_with_the_loser_as_synthetic():
    prepared = {"sample_id": np.arange(3, dtype=np.int64), "prompt_embeds": np.zeros((3, 2, 2), np.float16),
                "latents_real": np.zeros((3, 1, 1, 1), np.float32), "latents_lose": np.ones((3, 1, 1, 1), np.float32)}
    rows = _as_dpo_pair(_with_noise_seed(prepared, run_seed=0, iteration=1))
    batch = pair_batch({k: torch.as_tensor(v) for k, v in rows.items()}, online_reference=True)
    assert torch.equal(batch.latents_syn, torch.ones((3, 1, 1, 1))) and batch.ref_mse_real is None
    with pytest.raises(ValueError, match="no latents_lose column"):
        _as_dpo_pair({k: v for k, v in prepared.items() if k != "latents_lose"})


# ----------------------------------------------------------------------------- the stage


def test_run_baseline_writes_baseline_dpo_with_done(tmp_path, monkeypatch, capsys):
    import spin_ray.pairs
    import spin_ray.trainer

    fitted = []
    monkeypatch.setattr(spin_ray.trainer, "fit",
                        lambda plan, dataset, **kwargs: fitted.append((plan, dataset)) or SimpleNamespace(checkpoint=None))
    monkeypatch.setattr(spin_ray.trainer, "checkpoint_history", lambda checkpoint: [{"step": 4, "loss": 0.5}])
    monkeypatch.setattr(spin_ray.pairs, "sample_table", lambda *args, **kwargs: "samples")
    monkeypatch.setattr(spin_ray.pairs, "dpo_pairs", lambda samples, **kwargs: ("dpo pairs", samples, kwargs))
    monkeypatch.setattr(spin_ray.pairs, "spin_pairs", lambda *args, **kwargs: pytest.fail("DPO generates nothing"))

    def publish(checkpoint, base, rundir, rel):
        (tmp_path / "model").mkdir()
        rundir.publish_dir(tmp_path / "model", rel)

    monkeypatch.setattr(stages, "_publish_model", publish)
    rundir = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "self_play.baselines=[dpo]", "baselines.dpo.steps=4",
                             "baselines.dpo.batch_size=2", "baselines.dpo.beta=123", "train.warmup_steps=0"])

    model = stages.run_baseline(cfg, rundir, "dpo", base_model="/models/base",
                                prepared=stages.Prepared(path="prepared", n_rows=100))

    assert model == str(tmp_path / "run" / "baseline_dpo" / "model")
    assert rundir.is_done("baseline_dpo") and rundir.is_done("baseline_dpo/model")
    (plan, dataset), = fitted
    assert (plan.loss_type, plan.steps, plan.batch_size, plan.beta, plan.init_model_path) == (
        "dpo", 4, 2, 123.0, "/models/base")
    assert dataset == ("dpo pairs", "samples", {"run_seed": 0, "iteration": 1})
    metrics = json.loads((tmp_path / "run" / "baseline_dpo" / "metrics.json").read_text())
    assert (metrics["loss_type"], metrics["n_samples"], metrics["history"]) == ("dpo", 8, [{"step": 4, "loss": 0.5}])
    assert "[baseline_dpo] training 4 steps on 8 samples (dpo, beta=123.0" in capsys.readouterr().out
    assert not (tmp_path / "run" / "baseline_dpo" / "opponents").exists()
