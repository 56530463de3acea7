"""Which keys each finished stage depends on (spin_ray.config_drift), from first principles:
each expectation follows from what the stage's code reads (docs in the module)."""

from __future__ import annotations

from spin_ray.config import load_config
from spin_ray.config_drift import ABSENT, allowed_changes, changed, flatten, never_affects, stage_values
from spin_ray.config_load import to_dict


def config(*overrides: str) -> dict:
    return to_dict(load_config(None, ["self_play.iterations=3", *overrides]))


def drift(stage: str, stored: dict, current: dict) -> dict:
    return changed(*stage_values(stage, stored, current))


def test_an_iteration_depends_on_its_own_and_earlier_per_iteration_values_only():
    stored = config("loss.beta=[1000,2000,3000]")
    assert drift("iter_2", stored, config("loss.beta=[1000,2000,9999]")) == {}  # iteration 3's beta
    assert drift("iter_2", stored, config("loss.beta=[1000,5000,3000]")) == {
        "loss.beta[iteration 2]": (2000.0, 5000.0)}
    assert drift("iter_2", stored, config("loss.beta=[7,2000,3000]")) == {  # theta_1 changes, so theta_2 does
        "loss.beta[iteration 1]": (1000.0, 7.0)}
    # iteration 1's steps move where iteration 2's samples start in the data order
    assert set(drift("iter_2", config("train.steps=5"), config("train.steps=[6,5,5]"))) == {"train.steps[iteration 1]"}


def test_a_scalar_and_the_same_value_in_a_list_are_the_same():
    assert drift("iter_3", config("train.lr=1e-5"), config("train.lr=[1e-5,1e-5,1e-5]")) == {}


def test_keys_that_cannot_change_a_finished_stage_are_never_drift():
    stored = config()
    current = config("eval.batch_size=3", "eval.enabled=true", "cluster.lease_stale_s=5", "train.log_every=1",
                     "generation.num_actors=4", "generation.batch_size=2", "tracking.backends=[]",
                     "data.prepare_num_actors=3", "train.checkpoint_every=7", "self_play.iterations=5")
    for stage in ("prepared", "baseline_sft", "baseline_dpo", "iter_1", "iter_3"):
        assert drift(stage, stored, current) == {}, stage
    assert all(never_affects(key) for key in ("eval.scorers", "cluster.address", "publish.hub_repo_id"))
    assert not any(never_affects(key) for key in ("seed", "train.lr", "loss.type", "data.path", "train.keep"))


def test_the_prepared_table_depends_on_the_model_and_data_only():
    stored = config()
    assert drift("prepared", stored, config("train.lr=1", "loss.beta=5", "seed=9")) == {}
    assert drift("prepared", stored, config("data.max_rows=10", "model.resolution=64")) == {
        "data.max_rows": (None, 10), "model.resolution": (512, 64)}
    assert "data.max_rows" in drift("iter_1", stored, config("data.max_rows=10"))  # built on the table


def test_baselines_depend_on_their_own_section_and_what_they_inherit():
    stored = config()
    assert set(drift("baseline_sft", stored, config("baselines.sft.lr=0.1"))) == {"baselines.sft.lr"}
    assert drift("baseline_dpo", stored, config("baselines.sft.lr=0.1")) == {}
    assert drift("iter_1", stored, config("baselines.sft.lr=0.1")) == {}
    assert set(drift("baseline_dpo", stored, config("loss.beta=[1,2000,2000]"))) == {"loss.beta[iteration 1]"}
    assert drift("baseline_sft", stored, config("loss.beta=1")) == {}  # SFT has no beta
    assert drift("baseline_sft", stored, config("self_play.opponent=initial", "generation.eta=1")) == {}


def test_extending_a_run_keeps_the_baseline_whose_steps_are_the_sum_of_the_iterations():
    stored = config("train.steps=[5,5,5]")
    extended = to_dict(load_config(None, ["self_play.iterations=5", "train.steps=[5,5,5,8,8]"]))
    assert drift("baseline_sft", stored, extended) == {}
    assert set(drift("baseline_sft", stored, config("train.steps=[5,6,5]"))) == {"train.steps[iteration 2]"}
    assert drift("baseline_sft", config("baselines.sft.steps=4"), config("baselines.sft.steps=4", "train.steps=9")) == {}


def test_a_key_the_stored_config_predates_takes_its_default():
    stored = config()
    del stored["train"]["keep"], stored["loss"]["synthetic_states"]  # written before these keys existed
    assert drift("iter_1", stored, config()) == {}
    assert drift("iter_1", stored, config("train.keep=best", "train.eval_every=2",
                                          "eval.selection_prompts=toy_selection")) == {
        "train.keep": ("last", "best"), "train.eval_every": (0, 2)}


def test_a_shortened_list_shows_the_missing_value():
    before, after = stage_values("iter_2", config("self_play.iterations=2", "loss.beta=[1,2]"),
                                 {**config(), "loss": {**config()["loss"], "beta": [1.0]}})
    assert after["loss.beta[iteration 2]"] == ABSENT and before["loss.beta[iteration 2]"] == 2.0


def test_allowed_changes_are_those_no_stage_depends_on():
    stored, current = config(), config("eval.batch_size=3", "train.lr=1", "self_play.iterations=4")
    assert allowed_changes(stored, current, drifted=set()) == {
        "eval.batch_size": (8, 3), "self_play.iterations": (3, 4), "train.lr": (2e-5, 1.0)}
    assert "train.lr" not in allowed_changes(stored, current, drifted={"train.lr[iteration 1]"})


def test_flatten_spells_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [2], "e": {}}
