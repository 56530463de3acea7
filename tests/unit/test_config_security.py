"""Config validation refuses credentials in URLs and hub names for open_clip scorers (issue 23,
finding 8): one-line errors naming the key, never echoing the secret."""

from __future__ import annotations

import pytest

from spin_ray.config import ConfigError, from_dict, load_config
from spin_ray.config_security import (
    HPSV2_MODEL_NAMES,
    check_open_clip_name,
    open_clip_model_names,
    redact_url,
    url_has_credentials,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"


@pytest.mark.parametrize("override, key", [
    (f"run_dir=s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/runs/x", "run_dir"),
    ("data.path=s3://AKIAIOSFODNN7EXAMPLE:plain@bucket/pickapic", "data.path"),
    ("eval.prompts=[prompts.txt, 'gs://user:pw@bucket/parti.tsv']", "eval.prompts[1]"),
    ("eval.models={base: 'https://token@example.com/model'}", "eval.models.base"),
    ("eval.scorer_paths={pickscore: 's3://only-a-user@bucket/ps'}", "eval.scorer_paths.pickscore"),
])
def test_credentials_in_a_url_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"command line: {key}: ") and "carries credentials in the URL" in message
    assert SECRET not in message and "plain" not in message and "pw@" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["s3://bucket/runs/x", "s3://bucket/runs/model@v2", "gs://bucket/a:b/c",
                                 "runs/local@dir", "stabilityai/sd-turbo", "file:///tmp/x"])
def test_urls_without_credentials_pass(url):
    assert not url_has_credentials(url)
    assert from_dict({"run_dir": url}).run_dir == url


def test_redaction_hides_the_user_part():
    assert redact_url(f"s3://KEY:{SECRET}@bucket/x") == "s3://***@bucket/x"


@pytest.mark.parametrize("name, problem", [
    ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hub and path names"),
    ("local-dir:/tmp/model", "hub and path names"),
    ("../ViT-H-14", "hub and path names"),
    ("ViT-Nonexistent-99", "is not in"),
])
def test_hpsv2_model_name_must_be_a_shipped_open_clip_architecture(name, problem):
    with pytest.raises(ConfigError, match=rf"^eval\.scorer_options\.hpsv2\.model_name: .*{problem}"):
        from_dict({"eval": {"scorer_options": {"hpsv2": {"model_name": name}}}})


def test_the_published_architecture_is_accepted():
    cfg = from_dict({"eval": {"scorer_options": {"hpsv2": {"model_name": "ViT-H-14"}}}})
    assert cfg.eval.scorer_options["hpsv2"]["model_name"] == "ViT-H-14"


def test_names_come_from_open_clip_when_installed_else_from_the_allow_list(monkeypatch):
    import open_clip

    assert open_clip_model_names() == frozenset(open_clip.list_models()) - _registered_at_run_time(open_clip)
    monkeypatch.setattr("spin_ray.config_security.open_clip_model_names", lambda: None)
    check_open_clip_name("ViT-H-14", "k")
    assert HPSV2_MODEL_NAMES == ("ViT-H-14",)
    with pytest.raises(ConfigError, match=r"^k: 'ViT-B-32' is not in the allow-list \(open_clip is not installed\)"):
        check_open_clip_name("ViT-B-32", "k")


def _registered_at_run_time(open_clip) -> frozenset[str]:
    """Architectures other tests add with ``open_clip.add_model_config`` (not shipped files)."""
    from pathlib import Path

    shipped = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    return frozenset(set(open_clip.list_models()) - shipped)


def test_the_scorer_itself_refuses_a_hub_name_before_loading_anything(tmp_path):
    from spin_ray.rewards.hps import load_hpsv2

    with pytest.raises(ValueError, match=r"model_name 'hf-hub:org/evil' is not in open_clip.list_models\(\)"):
        load_hpsv2(tmp_path / "missing.pt", model_name="hf-hub:org/evil")
