"""The sweep section (space parsing, overrides, validation) and winner selection, without Ray."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from spin_ray.config import ConfigError, from_dict
from spin_ray.sweep import (
    TrialRow,
    lineage_chain,
    max_samples,
    plot_beta_vs_metric,
    rows_from_results,
    select_winner,
    trials_markdown,
)
from spin_ray.sweep.config import (
    Dimension,
    SweepError,
    apply_sweep_overrides,
    load_sweep,
    parse_sweep,
    split_overrides,
)
from spin_ray.sweep.tuner import trial_resources

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg():
    return from_dict({"train": {"steps": 10, "batch_size": 4, "num_workers": 1}})


def space(cfg, entries: dict, **fields):
    return parse_sweep({"space": entries, **fields}, cfg)


# ----------------------------------------------------------------------------- the space


def test_each_search_kind_parses_to_its_dimension(cfg):
    sweep = space(cfg, {
        "loss.beta": {"grid": [2000, 5000]},
        "train.lr": {"loguniform": ["1e-6", 1e-4]},  # PyYAML reads 1e-6 as a string
        "train.steps": {"choice": [50, 200, 500]},
        "train.weight_decay": {"uniform": [0, 0.1]},
    })
    assert sweep.space == {
        "loss.beta": Dimension("grid", (2000, 5000)),
        "train.lr": Dimension("loguniform", (1e-6, 1e-4)),
        "train.steps": Dimension("choice", (50, 200, 500)),
        "train.weight_decay": Dimension("uniform", (0.0, 0.1)),
    }
    assert sweep.mode == "grid" and sweep.metric == "toy" and sweep.max_concurrent_trials == 1
    assert sweep.resources_per_trial == {"cpu": 0.0}


def test_a_grid_point_may_be_a_per_iteration_schedule():
    cfg = from_dict({"self_play": {"iterations": 2}})
    sweep = parse_sweep({"space": {"loss.beta": {"grid": [2000, [5000, 1.0e39]]}}}, cfg)
    assert sweep.space["loss.beta"].values == (2000, [5000, 1.0e39])
    with pytest.raises(ConfigError, match=r"the value \[5000, 2000, 2000\] is not valid.*has 3 values"):
        parse_sweep({"space": {"loss.beta": {"grid": [[5000, 2000, 2000]]}}}, cfg)


@pytest.mark.parametrize(("concurrent", "share"), [(1, 1.0), (2, 0.5), (3, 0.3333), (7, 0.1428), (64, 0.0156)])
def test_each_trial_takes_its_share_of_the_head_node(cfg, concurrent, share):
    sweep = space(cfg, {"loss.beta": {"grid": [1]}}, max_concurrent_trials=concurrent,
                  resources_per_trial={"cpu": 0, "gpu": 1})
    resources = trial_resources(sweep, "node:10.0.0.1")
    assert resources == {"cpu": 0.0, "gpu": 1.0, "node:10.0.0.1": share}
    assert concurrent * share <= 1.0 < (concurrent + 1) * share, "the head node must hold exactly that many"


@pytest.mark.parametrize(("entry", "message"), [
    ({"loss.beta": {"grid": []}}, "sweep.space.loss.beta.grid: expected a non-empty list"),
    ({"loss.beta": {"range": [1, 2]}}, "unknown search kind 'range'"),
    ({"loss.beta": {"grid": [1], "choice": [2]}}, "sweep.space.loss.beta: expected exactly one of"),
    ({"loss.beta": [2000, 5000]}, "sweep.space.loss.beta: expected exactly one of"),
    ({"train.lr": {"uniform": [1e-4, 1e-6]}}, "sweep.space.train.lr.uniform: low must be below high"),
    ({"train.lr": {"loguniform": [0, 1e-4]}}, "sweep.space.train.lr.loguniform: bounds must be positive"),
    ({"train.lr": {"uniform": [1e-4]}}, "expected [low, high]"),
    ({"loss.betta": {"grid": [1]}}, "sweep.space.loss.betta: unknown config key 'loss.betta'; did you mean 'loss.beta'"),
    ({"train.steps": {"grid": [10, 0]}}, "sweep.space.train.steps: the value 0 is not valid for this key"),
    ({"train.steps": {"uniform": [10, 100]}}, "sweep.space.train.steps: the value 10.0 is not valid"),
    ({"loss.type": {"grid": ["spin", "dpo"]}}, "the value 'dpo' is not valid"),
    ({"generation.guidance_scale": {"grid": [3, 7]}}, "'generation' keys cannot be searched"),
    ({"loss.shared_noise": {"grid": [True, False]}}, "'loss.shared_noise' keys cannot be searched"),
    ({"seed": {"grid": [1, 2]}}, "'seed' keys cannot be searched"),
])
def test_bad_space_entries_name_the_key(cfg, entry, message):
    with pytest.raises(ConfigError) as err:
        space(cfg, entry)
    assert message in str(err.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"mode": "bayes"}, "sweep.mode: 'bayes' is not one of grid, pbt"),
    ({"metric": "fid"}, "sweep.metric: 'fid' is not a scorer"),
    ({"max_concurent_trials": 2}, "did you mean 'sweep.max_concurrent_trials'"),
    ({"num_samples": 0}, "sweep.num_samples: expected an integer >= 1"),
    ({"resources_per_trial": {"node:__internal_head__": 1}}, "'node:' resources are set by the sweep"),
    ({"max_concurrent_trials": 65}, "sweep.max_concurrent_trials: at most 64"),
    ({"resources_per_trial": {"cpu": -1, "gpu": 1}}, "amounts must be >= 0"),
    ({"quantile_fraction": 0.75}, "sweep.quantile_fraction: must be in (0, 0.5]"),
])
def test_bad_sweep_fields_name_the_key(cfg, fields, message):
    with pytest.raises(ConfigError) as err:
        space(cfg, {"loss.beta": {"grid": [1]}}, **fields)
    assert message in str(err.value)


def test_an_empty_space_is_refused(cfg):
    with pytest.raises(ConfigError, match="sweep.space: expected a mapping of dotted config keys"):
        parse_sweep({"mode": "grid"}, cfg)


def test_max_samples_covers_the_largest_trial(cfg):
    sweep = space(cfg, {"train.steps": {"choice": [5, 20]}, "train.batch_size": {"grid": [2, 4]},
                        "loss.beta": {"grid": [1, 2]}})
    assert max_samples(cfg, sweep.space, 1) == 20 * 4
    assert max_samples(cfg, space(cfg, {"loss.beta": {"grid": [1, 2]}}).space, 1) == 10 * 4


# ----------------------------------------------------------------------------- loading and overrides


def test_sweep_overrides_are_split_from_config_overrides():
    sweep, config = split_overrides(["train.lr=1e-5", "sweep.max_concurrent_trials=2", "sweep.space.loss.beta={grid: [1]}"])
    assert sweep == ["sweep.max_concurrent_trials=2", "sweep.space.loss.beta={grid: [1]}"]
    assert config == ["train.lr=1e-5"]


def test_sweep_overrides_set_fields_space_entries_and_resources():
    section = {"mode": "grid", "space": {"loss.beta": {"grid": [2000]}}}
    result = apply_sweep_overrides(section, [
        "sweep.max_concurrent_trials=4", "sweep.space.train.lr={loguniform: [1.0e-6, 1.0e-4]}",
        "sweep.resources_per_trial.gpu=1",
    ])
    assert result["max_concurrent_trials"] == 4
    assert result["space"] == {"loss.beta": {"grid": [2000]}, "train.lr": {"loguniform": [1e-6, 1e-4]}}
    assert result["resources_per_trial"] == {"gpu": 1}
    assert section == {"mode": "grid", "space": {"loss.beta": {"grid": [2000]}}}, "the input was changed"
    with pytest.raises(ConfigError, match="did you mean 'sweep.metric'"):
        apply_sweep_overrides(section, ["sweep.metrik=toy"])
    with pytest.raises(ConfigError, match="sweep.mode is not a section"):
        apply_sweep_overrides(section, ["sweep.mode.x=1"])


def test_load_sweep_pops_the_section_and_applies_both_kinds_of_overrides(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 7}, "eval": {"selection_prompts": "toy_selection"},
                                    "sweep": {"space": {"loss.beta": {"grid": [1, 2]}}}}))
    cfg, sweep = load_sweep(path, ["train.lr=3e-5", "sweep.mode=pbt", "sweep.num_samples=3"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-5
    assert sweep.mode == "pbt" and sweep.num_samples == 3 and sweep.space["loss.beta"].values == (1, 2)


def test_load_sweep_errors_name_the_file(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"train": {"steps": 7}}))
    with pytest.raises(ConfigError, match=r"plain.yaml: no top-level 'sweep:' section"):
        load_sweep(plain)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sweep": {"space": {"train.steps": {"grid": [0]}}}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: sweep.space.train.steps"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match=r"^command line: unknown config key 'train.stepz'"):
        load_sweep(bad, ["train.stepz=3"])  # an override's error names the command line, not the file


@pytest.mark.parametrize(("name", "mode"), [("sweep_beta.yaml", "grid"), ("sweep_pbt.yaml", "pbt")])
def test_shipped_sweep_configs_load(name, mode):
    cfg, sweep = load_sweep(REPO / "configs" / name)
    assert sweep.mode == mode and "loss.beta" in sweep.space
    assert cfg.eval.prompts == "toy" and sweep.metric in cfg.eval.scorers


# ----------------------------------------------------------------------------- winners and reports


def row(trial: str, score, beta=2000.0, error=None, model=None, opponent=None) -> TrialRow:
    return TrialRow(trial_id=trial, params={"loss.beta": beta}, score=score, error=error, beta=beta,
                    model=model or f"m/{trial}", opponent=opponent)


def test_the_highest_score_wins_and_failed_trials_never_do():
    rows = [row("a", 0.2), row("b", 0.9, error="OOM"), row("c", 0.5), row("d", None), row("e", math.nan)]
    assert select_winner(rows).trial_id == "c"


def test_a_tie_goes_to_the_first_trial():
    assert select_winner([row("a", 0.5), row("b", 0.5)]).trial_id == "a"


def test_no_scored_trial_is_an_error_listing_the_failures():
    with pytest.raises(SweepError, match="trial a: OOM; trial b: no score"):
        select_winner([row("a", None, error="OOM"), row("b", None)])


def test_rows_from_tune_results_keep_failures_and_sort_by_trial():
    results = [
        SimpleNamespace(path="/x/tune/trial_b_00001", config={"loss.beta": 5000}, error=None,
                        metrics={"trial_id": "b_00001", "toy": 0.4, "model": "m/b", "beta": 5000.0}),
        SimpleNamespace(path="/x/tune/trial_a_00000", config={"loss.beta": 2000},
                        error=RuntimeError("Traceback ...\nValueError: lr exploded"), metrics={}),
    ]
    rows = rows_from_results(results, "toy")
    assert [r.trial_id for r in rows] == ["a_00000", "b_00001"]
    assert rows[0].error == "ValueError: lr exploded" and rows[0].score is None and not rows[0].ok
    assert rows[1].score == 0.4 and rows[1].model == "m/b" and rows[1].params == {"loss.beta": 5000}
    assert select_winner(rows).trial_id == "b_00001"


def test_trials_table_lists_hyperparameters_scores_and_the_winner():
    rows = [row("a", 0.25, beta=2000.0), row("b", 0.75, beta=5000.0), row("c", None, error="OOM")]
    table = trials_markdown(rows, select_winner(rows), "toy", 1)
    lines = table.splitlines()
    assert lines[2] == "| trial | loss.beta | beta | toy | status |"
    assert "| b | 5000 | 5000 | 0.75 | **winner** |" in lines
    assert "| c | 2000 | 2000 | - | failed: OOM |" in lines
    assert "Published as iter_1/model: trial b (m/b)." in table
    # pbt: the final winner's lineage may pass through a trial that was not this iteration's best
    lineage = trials_markdown(rows, rows[1], "toy", 1, published=rows[0]).splitlines()
    assert "| a | 2000 | 2000 | 0.25 | published |" in lineage
    assert "Published as iter_1/model: trial a (m/a)." in lineage


def test_beta_plot_is_written(tmp_path):
    rows = [row("a", 0.25, beta=2000.0), row("b", 0.75, beta=5000.0)]
    path = plot_beta_vs_metric(rows, rows[1], "toy", 1, tmp_path / "beta_vs_metric.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lineage_follows_opponents_back_through_clones():
    rows = {
        1: [row("a", 0.9, model="pbt/a/1"), row("b", 0.1, model="pbt/b/1")],
        2: [row("a", 0.3, model="pbt/a/2", opponent="pbt/a/1"), row("b", 0.8, model="pbt/b/2", opponent="pbt/a/1")],
    }
    chain = lineage_chain(rows, select_winner(rows[2]), 2)
    assert [(k, r.model) for k, r in chain.items()] == [(1, "pbt/a/1"), (2, "pbt/b/2")]
    with pytest.raises(SweepError, match="iteration 2: the opponent 'gone'"):
        lineage_chain({1: rows[1], 2: [row("c", 1.0, opponent="gone")]}, row("c", 1.0, opponent="gone"), 2)


# ----------------------------------------------------------------------------- the command line and resuming


def test_the_job_exits_with_2_on_a_config_error(tmp_path, capsys):
    from spin_ray.sweep import run_sweep_job

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sweep": {"space": {"loss.beta": {"grid": [-1]}}}}))
    assert run_sweep_job(["--config", str(bad)]) == 2
    assert "config error: " in capsys.readouterr().err


def test_a_run_dir_refuses_to_resume_another_search(cfg, tmp_path):
    from spin_ray.rundir import RunDir
    from spin_ray.sweep.resume import claim_run_dir

    rundir = RunDir(tmp_path / "run")
    claim_run_dir(rundir, space(cfg, {"loss.beta": {"grid": [1, 2]}}).search_signature(), resume=False)
    same = space(cfg, {"loss.beta": {"grid": [1, 2]}}, max_concurrent_trials=4)  # same search
    claim_run_dir(rundir, same.search_signature(), resume=True)
    with pytest.raises(ConfigError, match="records another search"):
        claim_run_dir(rundir, space(cfg, {"loss.beta": {"grid": [1, 3]}}).search_signature(), resume=True)
