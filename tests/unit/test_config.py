"""Config loading, overrides, validation messages and the YAML round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

import spin_ray.config
import spin_ray.config_load
from spin_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_config,
    get_by_path,
    load_config,
    load_yaml,
    per_iteration,
    to_dict,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))

PAPER = """
seed: 5775709
model: {pretrained: runwayml/stable-diffusion-v1-5, resolution: 512}
data: {path: /data/pickapic, format: pickapic}
self_play: {iterations: 3}
loss: {beta: [2000, 5000, 5000]}
train:
  lr: [2.0e-5, 2e-5, 5e-8]
  steps: [50, 500, 200]
  weight_decay: 1e-2
  warmup_steps: 200
  lr_schedule: linear
  batch_size: 8
  gradient_accumulation_steps: 32
generation: {guidance_scale: 7.5, num_inference_steps: 50}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def load_shipped(path: Path) -> Config:
    """A shipped config; a sweep config (top-level ``sweep:``, for jobs/sweep.py) through the sweep loader."""
    if "sweep" in load_yaml(path):
        from spin_ray.sweep import load_sweep

        return load_sweep(path)[0]
    return load_config(path)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_shipped(path)
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_the_papers_schedule_is_expressible(tmp_path):
    cfg = load_config(write(tmp_path, PAPER))
    assert [per_iteration(cfg.loss.beta, k) for k in (1, 2, 3)] == [2000.0, 5000.0, 5000.0]
    assert [per_iteration(cfg.train.lr, k) for k in (1, 2, 3)] == [2e-5, 2e-5, 5e-8]
    assert [per_iteration(cfg.train.steps, k) for k in (1, 2, 3)] == [50, 500, 200]
    assert cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 200
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 256
    assert cfg.seed == 5775709 and cfg.model.resolution == 512 and cfg.generation.guidance_scale == 7.5


def test_required_key_names_exist():
    cfg = Config()
    values = to_dict(cfg)
    for key in ["run_dir", "seed", "model.pretrained", "data.path", "data.format", "self_play.iterations",
                "loss.beta", "train.lr", "train.steps", "generation.num_inference_steps",
                "generation.guidance_scale"]:
        node = values  # the key's place in the YAML tree, walked without get_by_path
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
        assert get_by_path(cfg, key) == node, key
        assert apply_overrides({}, [f"{key}=1"]) == _nested(key, 1), key  # accepted as an override key
    with pytest.raises(AttributeError):
        get_by_path(cfg, "train.learning_rate")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        apply_overrides({}, ["train.learning_rate=1"])


def _nested(dotted: str, value: object) -> dict:
    """``"a.b"``, 1 -> ``{"a": {"b": 1}}``."""
    node: object = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    assert isinstance(node, dict)
    return node


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, PAPER), ["loss.beta=[1000,2000,3000]", "train.lr=1e-5", "seed=7",
                                               "data.format=parquet", "model.revision=null"])
    assert cfg.loss.beta == [1000.0, 2000.0, 3000.0]
    assert cfg.train.lr == 1e-5 and cfg.seed == 7 and cfg.data.format == "parquet"
    assert cfg.model.revision is None


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().seed = 3  # type: ignore[misc]


def test_unknown_key_names_dotted_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(write(tmp_path, "train: {lrr: 1.0e-5}\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.betta'; did you mean 'loss\.beta'"):
        load_config(None, ["loss.betta=3"])


def test_unknown_key_error_names_the_file(tmp_path):
    path = write(tmp_path, "modle: {}\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown config key 'modle'; did you mean 'model'"):
        load_config(path)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"train\.steps: 'many' is not a"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"self_play\.iterations: expected int, got 2\.5"):
        load_config(None, ["self_play.iterations=2.5"])
    with pytest.raises(ConfigError, match=r"data\.format: 'csv' is not one of 'pickapic', 'parquet', 'folder'"):
        load_config(None, ["data.format=csv"])
    with pytest.raises(ConfigError, match=r"train\.use_gpu: expected bool, got 'yes please'"):
        load_config(None, ["train.use_gpu=yes please"])


def test_per_iteration_list_length_must_match_iterations():
    with pytest.raises(ConfigError, match=r"loss\.beta: has 2 values but self_play\.iterations is 3"):
        load_config(None, ["loss.beta=[2000,5000]", "self_play.iterations=3"])


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match=r"train\.lr: must be positive, got -1"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"model\.resolution: must be a multiple of 8"):
        load_config(None, ["model.resolution=30"])
    with pytest.raises(ConfigError, match=r"data\.max_bad_fraction: must be in \[0, 1\]"):
        load_config(None, ["data.max_bad_fraction=2"])
    with pytest.raises(ConfigError, match=r"data\.path: required unless model\.pretrained is 'toy'"):
        load_config(None, ["model.pretrained=/models/sd15"])


def test_override_of_a_section_or_malformed_override_fails():
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.lr is not a section"):
        load_config(None, ["train.lr.x=1"])


def test_with_overrides_validates():
    cfg = with_overrides(Config(), {"loss.beta": 5000.0})
    assert cfg.loss.beta == 5000.0
    with pytest.raises(ConfigError):
        with_overrides(Config(), {"train.steps": 0})


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_a_sweep_config_given_to_a_plain_job_points_to_jobs_sweep():
    with pytest.raises(ConfigError, match=r"sweep config: run it with python jobs/sweep.py"):
        load_config(REPO / "configs" / "sweep_beta.yaml")


def test_the_loading_functions_stay_importable_from_spin_ray_config():
    for name in spin_ray.config_load.__all__:
        assert getattr(spin_ray.config, name) is getattr(spin_ray.config_load, name)
    with pytest.raises(AttributeError):
        spin_ray.config.no_such_name  # noqa: B018


@pytest.mark.parametrize("first", ["spin_ray.config", "spin_ray.config_load", "spin_ray.config_validate"])
def test_config_modules_import_in_any_order(first):
    code = f"import {first}; from spin_ray.config import load_config; load_config(None)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
