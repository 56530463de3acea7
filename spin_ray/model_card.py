"""Hugging Face model cards (``README.md``) for the models a run publishes.

Every published model directory (``iter_<k>/model``, ``baseline_<name>/model``) gets a card:
YAML front matter that the Hub reads (``base_model``, the base's ``license`` when known, tags,
``library_name: diffusers``, ``pipeline_tag: text-to-image``; written by huggingface_hub's
``ModelCardData``), the training recipe (the stage's record and the config keys that decide
the result), the model's evaluation table once the run's report holds it, and how to load it.
:func:`publish_model_card` writes it at the end of the stage; :func:`refresh_model_cards`
again after the evaluation, with the scores. Both write it after the model's ``DONE``, so the card
is not in the model's checksum manifest (:mod:`spin_ray.integrity`) and rewriting it never makes
a finished model look damaged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spin_ray.config import Config
from spin_ray.rundir import RunDir

CARD_FILE = "README.md"
TAGS = ["text-to-image", "diffusers", "spin-diffusion", "stable-diffusion", "self-play"]
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "compvis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
}
"""Licenses of common base models (lower-case ids); others are read from a local base's own card."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PAPER = "https://arxiv.org/abs/2402.10210"
RECIPE_KEYS = (
    "loss.type", "loss.reference", "loss.shared_noise", "loss.timestep_weighting", "train.lr", "train.steps",
    "train.batch_size", "train.gradient_accumulation_steps", "train.num_workers", "train.warmup_steps",
    "train.lr_schedule", "train.max_grad_norm", "train.mixed_precision", "generation.num_inference_steps",
    "generation.guidance_scale", "self_play.iterations", "self_play.opponent", "self_play.opponent_history",
    "model.resolution", "data.path", "data.format", "data.max_rows", "seed",
)
STAGE_KEYS = ("iteration", "loss_type", "beta", "lr", "peak_lr", "warmup_steps", "steps", "n_samples", "opponent",
              "init_model")


def base_license(base_model: str) -> str | None:
    """The base model's license: a known id's, or the ``license`` of a local base's own card."""
    known = KNOWN_LICENSES.get(base_model.lower())
    if known:
        return known
    card = Path(base_model).expanduser() / CARD_FILE
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    license_name = ModelCard.load(card).data.to_dict().get("license")
    return license_name if isinstance(license_name, str) else None


def model_card_text(cfg: Config, stage: str, *, stage_record: Mapping[str, Any] | None = None,
                    evaluation: Mapping[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The card of stage ``stage``'s model: front matter + recipe + evaluation + loading."""
    from huggingface_hub import ModelCardData

    base = cfg.model.pretrained
    data = ModelCardData(base_model=base if HUB_ID.match(base) and not Path(base).exists() else None,
                         license=base_license(base), tags=list(TAGS), library_name="diffusers",
                         pipeline_tag="text-to-image")
    name = RunDir.model_name(stage)
    sections = [
        f"# {name}: SPIN-Diffusion fine-tune of `{base}`\n\n"
        f"Trained with spin-ray by self-play fine-tuning (SPIN-Diffusion, Yuan et al. 2024, "
        f"[arXiv 2402.10210]({PAPER})): stage `{stage}` of the run `{cfg.run_dir}`, base model `{base}`.",
        "## Training recipe\n\n" + _recipe_table(cfg, stage_record),
        "## Evaluation\n\n" + (_evaluation_table(evaluation, name) or "Not evaluated yet (the run's report has no "
                                                                     "scores for this model)."),
        "## How to load\n\n" + _loading(repo_id, stage),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _recipe_table(cfg: Config, record: Mapping[str, Any] | None) -> str:
    from spin_ray.config_load import to_dict

    flat = _flatten(to_dict(cfg))
    rows = [(f"stage: {key}", record[key]) for key in STAGE_KEYS if record and record.get(key) is not None]
    rows += [(key, flat[key]) for key in RECIPE_KEYS if key in flat]
    return "| setting | value |\n| --- | --- |\n" + "\n".join(f"| {key} | `{value}` |" for key, value in rows)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _evaluation_table(report: Mapping[str, Any] | None, model: str) -> str | None:
    """The model's row of a report's metrics.json: best-of-N mean and median per scorer, and the win
    rate against the report's baseline when there is one."""
    row = (report or {}).get("summaries", {}).get(model)
    if not row:
        return None
    baseline = report.get("baseline")
    wins = report.get("win_rates", {}).get(model, {})
    header = "| metric | mean | median |" + (f" win rate vs {baseline} |" if wins else "")
    lines = [header, "| --- | --- | --- |" + (" --- |" if wins else "")]
    for metric, summary in row.items():
        cells = [metric, f"{summary['mean']:.4g}", f"{summary['median']:.4g}"]
        if wins:
            rate = wins.get(metric, {}).get("win_rate")
            cells.append("" if rate is None else f"{rate:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loading(repo_id: str | None, stage: str) -> str:
    where = f'"{repo_id}", revision="{stage}"' if repo_id else '"path/to/this/folder"'
    return ("```python\nimport torch\nfrom diffusers import StableDiffusionPipeline\n\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({where}, torch_dtype=torch.float16).to(\"cuda\")\n"
            "image = pipe(\"a photo of an astronaut riding a horse\").images[0]\n```")


def write_model_card(model_dir: Path, *, cfg: Config, stage: str, stage_record: Mapping[str, Any] | None = None,
                     evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_dir/README.md`` (a local directory, e.g. the model assembled before publishing)."""
    path = Path(model_dir) / CARD_FILE
    path.write_text(model_card_text(cfg, stage, stage_record=stage_record, evaluation=evaluation,
                                    repo_id=cfg.publish.hub_repo_id), encoding="utf-8")
    return path


def publish_model_card(cfg: Config, rundir: RunDir, stage: str, evaluation: Mapping[str, Any] | None = None) -> str:
    """Write the card of ``stage``'s published model through the run directory (local or object
    store), from the stage's metrics.json when it exists; returns the card's run-dir path."""
    record_rel = rundir.stage_metrics(stage)
    record = rundir.read_json(record_rel) if rundir.exists(record_rel) else None
    card_rel = f"{rundir.stage_model(stage)}/{CARD_FILE}"
    rundir.write_text_atomic(card_rel, model_card_text(cfg, stage, stage_record=record, evaluation=evaluation,
                                                       repo_id=cfg.publish.hub_repo_id))
    return card_rel


def refresh_model_cards(cfg: Config, rundir: RunDir, models: Mapping[str, str]) -> list[str]:
    """After the evaluation: every stage model of ``models`` (report names) gets its card again, with
    its scores from ``report/metrics.json`` (or the first prompt set's); returns the stages updated."""
    report = _first_report(rundir)
    updated = []
    for model in models:
        stage = RunDir.stage_of_model(model)
        if stage and rundir.is_done(rundir.stage_model(stage)):
            publish_model_card(cfg, rundir, stage, report)
            updated.append(stage)
    return updated


def _first_report(rundir: RunDir) -> dict | None:
    top = f"{rundir.report()}/metrics.json"
    if rundir.exists(top):
        return rundir.read_json(top)
    found = rundir.glob(f"{rundir.report()}/*/metrics.json")
    return rundir.read_json(found[0]) if found else None
