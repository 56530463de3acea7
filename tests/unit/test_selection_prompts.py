"""Selection on validation, reporting on test (#16 item 3): ``eval.selection_prompts`` ranks
sweep trials, ``eval.prompts`` is the report's, and a config that selects on a set it reports
on is refused unless ``eval.allow_selection_on_report_prompts``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_ray.config import ConfigError, load_config
from spin_ray.eval.prompt_sets import load_prompts, prompt_set_names, selection_prompt_set
from spin_ray.rundir import RunDir
from spin_ray.toy.world import parse_prompt, selection_prompts, split_triples, validation_prompts

REPO = Path(__file__).resolve().parents[2]


def config(**values):
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_the_toy_selection_set_is_held_out_and_disjoint_from_the_report_set():
    report, selection = load_prompts("toy"), load_prompts("toy_selection")
    assert report == validation_prompts() and selection == selection_prompts()
    assert len(selection) == len(set(selection)) == 64
    assert not set(report) & set(selection)
    heldout = set(split_triples("validation"))
    assert {parse_prompt(p).triple for p in selection} == heldout  # every held-out triple, nothing trained on
    assert all(parse_prompt(p).size or parse_prompt(p).position for p in selection)
    assert selection_prompts() == selection  # fixed
    assert prompt_set_names(["toy", "toy_selection"]) == ["toy", "toy_selection"]
    assert load_prompts("toy_selection", max_prompts=5) == selection[:5]


def test_selecting_on_the_report_prompts_is_refused_in_one_line_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        config(**{"eval.prompts": "toy", "eval.selection_prompts": "toy"})
    message = str(err.value)
    assert "eval.selection_prompts" in message and "eval.prompts" in message
    assert "eval.allow_selection_on_report_prompts" in message and "\n" not in message
    allowed = config(**{"eval.prompts": "toy", "eval.selection_prompts": "toy",
                        "eval.allow_selection_on_report_prompts": True})
    assert allowed.eval.selection_prompts == "toy"


def test_a_shared_set_is_found_in_lists_and_under_another_spelling():
    with pytest.raises(ConfigError, match="share /p/test.parquet/"):
        config(**{"eval.prompts": ["/p/parti.tsv", "/p/./test.parquet"],
                  "eval.selection_prompts": ["/p/val.parquet", "/p/test.parquet/"]})
    ok = config(**{"eval.prompts": ["/p/parti.tsv", "/p/test.parquet"], "eval.selection_prompts": "/p/val.parquet"})
    assert ok.eval.selection_prompts == "/p/val.parquet"
    assert config(**{"eval.prompts": "toy", "eval.selection_prompts": ""}).eval.selection_prompts == ""


def test_no_selection_set_fails_where_a_model_would_be_selected():
    with pytest.raises(ConfigError, match="^eval.selection_prompts: no prompt set"):
        selection_prompt_set("")
    with pytest.raises(ConfigError, match="^eval.selection_prompts: no prompt set"):
        selection_prompt_set([" "])
    assert selection_prompt_set(["/v.parquet", "/w.txt"]) == "/v.parquet"


def test_a_sweep_without_selection_prompts_fails_before_any_work(tmp_path):
    from spin_ray.sweep.config import load_sweep

    text = (REPO / "configs" / "sweep_beta.yaml").read_text()
    assert "  selection_prompts: toy_selection" in text
    path = tmp_path / "sweep.yaml"
    path.write_text(text.replace("  selection_prompts: toy_selection", "  selection_prompts: ''"))
    with pytest.raises(ConfigError, match="eval.selection_prompts"):
        load_sweep(path)
    cfg, _ = load_sweep(path, ["eval.selection_prompts=toy_selection"])  # reachable from the command line
    assert cfg.eval.selection_prompts == "toy_selection"


def test_sweep_trials_are_scored_on_the_selection_prompts(tmp_path, monkeypatch):
    from spin_ray.eval import score_cache
    from spin_ray.sweep.trials import score_model

    seen = []

    class Stop(Exception):
        pass

    def model_scores(cfg, rundir, eval_rel, model, prompts):
        seen.append(prompts)
        raise Stop

    monkeypatch.setattr(score_cache, "model_scores", model_scores)
    cfg = config(**{"run_dir": str(tmp_path), "eval.prompts": "toy", "eval.selection_prompts": "toy_selection",
                    "eval.max_prompts": 10, "eval.scorers": ["toy"]})
    with pytest.raises(Stop):
        score_model(cfg, RunDir(tmp_path), "eval", "iter_1/model", "toy")
    assert seen == [selection_prompts()[:10]]


@pytest.mark.parametrize(("name", "selection", "report"), [
    ("sd15_pickapic.yaml", "validation_unique", "test_unique"),
    ("eval_paper.yaml", "validation_unique", "test_unique"),
])
def test_the_paper_configs_select_on_validation_and_report_on_test(name, selection, report):
    cfg = load_config(REPO / "configs" / name)
    assert selection in cfg.eval.selection_prompts and "test" not in cfg.eval.selection_prompts
    prompts = [cfg.eval.prompts] if isinstance(cfg.eval.prompts, str) else cfg.eval.prompts
    assert report in prompts[0]
    assert not cfg.eval.allow_selection_on_report_prompts


@pytest.mark.parametrize("name", ["sweep_beta.yaml", "sweep_pbt.yaml"])
def test_the_sweep_configs_rank_on_toy_selection(name):
    from spin_ray.sweep.config import load_sweep

    cfg, _ = load_sweep(REPO / "configs" / name)
    assert (cfg.eval.selection_prompts, cfg.eval.prompts) == ("toy_selection", "toy")
