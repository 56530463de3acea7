"""What an evaluation is asked to do, checked before any work; where the actors find each model.

The checks fail on what would fail later (no models, an unsafe model name, no prompt set,
unknown scorers) with the config key in the message; :func:`resolve_model` and
:func:`published_location` turn a configured model into the location every actor can load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from spin_ray.config import ConfigError, EvalConfig
from spin_ray.eval.prompt_sets import prompt_set_paths
from spin_ray.rewards import SCORER_NAMES
from spin_ray.rundir import RunDir

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_models(models: Mapping[str, str]) -> None:
    """Model names become directory names: letters, digits, ``_.-``; at least one model."""
    if not models:
        raise ConfigError("eval.models: no models to evaluate; set it to name -> diffusers directory or hub id, "
                          "e.g. eval.models='{base: /models/sd15, spin_iter_1: runs/sd15/iter_1/model}'")
    for name, location in models.items():
        if not _MODEL_NAME.match(name):
            raise ConfigError(f"eval.models.{name}: model names may hold letters, digits, '_', '.', '-' only")
        if not location:
            raise ConfigError(f"eval.models.{name}: empty path; expected a diffusers directory or hub id")


def check_eval_config(eval_cfg: EvalConfig) -> None:
    """Fail before any work on what would fail later: no prompt set, no or unknown scorers."""
    prompt_set_paths(eval_cfg.prompts)
    if not eval_cfg.scorers:
        raise ConfigError(f"eval.scorers: no scorers given; expected some of {list(SCORER_NAMES)}")
    unknown = [name for name in eval_cfg.scorers if name not in SCORER_NAMES]
    if unknown:
        raise ConfigError(f"eval.scorers: unknown scorers {unknown}; expected some of {list(SCORER_NAMES)}")


def resolve_model(name: str, location: str) -> str:
    """``eval.models.<name>`` as the actors should get it: a URL or hub id as is, a local
    diffusers directory as an absolute path (Ray workers may run in another directory)."""
    from spin_ray.diffusion import is_hub_id

    if "://" in location or is_hub_id(location):
        return location
    path = Path(location).expanduser()
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"eval.models.{name}: {location} is not a diffusers pipeline directory "
                          "(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return str(path.resolve())


def published_location(rundir: RunDir, name: str, path: str) -> str:
    """Where the actors find a self-play model: on object storage, a run's own finished models
    (:meth:`~spin_ray.run_layout.RunLayout.stage_of_model`) as their URL, so the actors on every
    node fetch them (``path`` is a copy on the driver's node only); a local directory as an
    absolute path (Ray workers may run in another directory)."""
    if not rundir.is_local:
        stage = rundir.stage_of_model(name)
        if stage and rundir.is_done(stage):
            return rundir.path(rundir.stage_model(stage))
    local = Path(path).expanduser()
    return str(local.resolve()) if "://" not in path and local.exists() else path
