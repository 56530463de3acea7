"""Model cards (spin_ray.model_card): written into a published model directory, parsed back with
huggingface_hub's own ModelCard (YAML front matter), naming the base model and its license, with
the stage's recipe, and the evaluation table once the report (the report's own writer) has it."""

from __future__ import annotations

from huggingface_hub import ModelCard
from tracking_helpers import write_report, write_stage_metrics

from spin_ray.config_load import from_dict
from spin_ray.model_card import publish_model_card, refresh_model_cards, write_model_card
from spin_ray.rundir import RunDir

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def published_stage(tmp_path, **config):
    cfg = from_dict({"run_dir": str(tmp_path / "run"), "data": {"path": "/data/pickapic"}, **config})
    rundir = RunDir(cfg.run_dir)
    rundir.mark_done(rundir.stage_model("iter_1"), {})  # a published model directory
    write_stage_metrics(rundir, "iter_1", history=[])
    return cfg, rundir


def test_the_card_names_the_base_model_with_its_license_and_the_recipe(tmp_path):
    cfg, rundir = published_stage(tmp_path, model={"pretrained": SD15}, publish={"hub_repo_id": "me/spin"})
    card = ModelCard.load(rundir.local_path(publish_model_card(cfg, rundir, "iter_1")))
    meta = card.data.to_dict()
    assert meta["base_model"] == SD15 and meta["license"] == "creativeml-openrail-m"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "diffusers", "spin-diffusion"} <= set(meta["tags"])
    assert "| stage: beta | `20.0` |" in card.text and f"| train.lr | `{cfg.train.lr}` |" in card.text
    assert 'from_pretrained("me/spin", revision="iter_1"' in card.text
    assert "Not evaluated yet" in card.text


def test_the_evaluation_table_is_added_after_the_evaluation(tmp_path):
    cfg, rundir = published_stage(tmp_path, model={"pretrained": SD15})
    publish_model_card(cfg, rundir, "iter_1")
    write_report(rundir)  # iter_1: toy_reward mean 0.75, median 0.7, 87.5% wins against base
    assert refresh_model_cards(cfg, rundir, {"base": "/models/base", "iter_1": "unused"}) == ["iter_1"]
    card = ModelCard.load(rundir.local_path("iter_1/model/README.md"))
    assert "| toy_reward | 0.75 | 0.7 | 87.5% |" in card.text
    assert card.data.to_dict()["base_model"] == SD15  # the front matter survives the rewrite


def test_a_local_base_model_is_named_and_its_own_card_gives_the_license(tmp_path):
    base = tmp_path / "my_base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    cfg = from_dict({"run_dir": str(tmp_path / "run"), "model": {"pretrained": str(base)},
                     "data": {"path": "/data/pickapic"}})
    model_dir = tmp_path / "assembled"
    model_dir.mkdir()
    card = ModelCard.load(write_model_card(model_dir, cfg=cfg, stage="baseline_sft"))
    meta = card.data.to_dict()
    assert meta["license"] == "mit" and "base_model" not in meta  # a local path is not a hub id
    assert f"base model `{base}`" in card.text and card.text.startswith("\n# sft:")
    assert 'from_pretrained("path/to/this/folder"' in card.text


def test_the_card_written_after_publishing_leaves_the_models_checksums_valid(tmp_path):
    """The card is written after the model's DONE (its checksum manifest) and rewritten after the
    evaluation: the model must still verify, so a rerun can reuse it."""
    from spin_ray.integrity import forget_verified

    cfg = from_dict({"run_dir": str(tmp_path / "run"), "model": {"pretrained": SD15}, "data": {"path": "/d"}})
    rundir = RunDir(cfg.run_dir)
    built = tmp_path / "built"
    (built / "unet").mkdir(parents=True)
    (built / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    rundir.publish_dir(built, rundir.stage_model("iter_1"))  # the real publish: DONE with the manifest
    publish_model_card(cfg, rundir, "iter_1")
    write_report(rundir)
    refresh_model_cards(cfg, rundir, {"iter_1": "unused"})
    forget_verified()
    rundir.verify(rundir.stage_model("iter_1"))  # raises IntegrityError if the card had been checksummed
