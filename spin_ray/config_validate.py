"""Checking config values: types, unknown keys and ranges.

:func:`build_dataclass` turns a nested mapping into the frozen dataclasses of
:mod:`spin_ray.config`, checking every value against its field's annotation (:func:`coerce`)
and naming an unknown key with the closest valid one; :func:`validate` then checks ranges
and the rules between fields. Every failure is a :class:`~spin_ray.config.ConfigError`
naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from spin_ray.config import PER_ITERATION_KEYS, PER_ITERATION_MAY_BE_ZERO, ConfigError, get_by_path

if TYPE_CHECKING:
    from spin_ray.config import Config


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    types_by_name = field_types(cls)
    for name in values:
        if name not in types_by_name:
            raise ConfigError(unknown_key_message(name, list(types_by_name), prefix))
    kwargs = {name: coerce(v, types_by_name[name], _join(prefix, name)) for name, v in values.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unknown_key_message(name: str, known: list[str], prefix: str) -> str:
    message = f"unknown config key {_join(prefix, name)!r}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        message += f"; did you mean {_join(prefix, close[0])!r}?"
    else:
        message += f"; valid keys here: {', '.join(sorted(known))}"
    return message


def validate(cfg: Config) -> Config:
    k = cfg.self_play.iterations
    if k < 1:
        raise ConfigError(f"self_play.iterations: must be >= 1, got {k}")
    for key in PER_ITERATION_KEYS:
        value = get_by_path(cfg, key)
        if isinstance(value, list) and len(value) != k:
            raise ConfigError(
                f"{key}: has {len(value)} values but self_play.iterations is {k}; "
                "give one value per iteration or a single scalar"
            )
        for v in value if isinstance(value, list) else [value]:
            if key in PER_ITERATION_MAY_BE_ZERO and v < 0:
                raise ConfigError(f"{key}: must be >= 0, got {v}")
            if key not in PER_ITERATION_MAY_BE_ZERO and v <= 0:
                raise ConfigError(f"{key}: must be positive, got {v}")
    positive = [
        "model.resolution", "generation.num_inference_steps", "generation.batch_size",
        "generation.num_actors", "train.batch_size", "train.gradient_accumulation_steps",
        "train.num_workers", "train.log_every", "data.prepare_batch_size",
        "data.prepare_num_actors", "eval.num_images_per_prompt", "eval.batch_size",
        "eval.num_inference_steps", "train.max_nonfinite_steps", "eval.num_actors",
        "data.max_image_bytes", "data.max_row_group_bytes", "eval.max_prompt_file_bytes",
    ]
    for key in positive:
        if get_by_path(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_by_path(cfg, key)}")
    if cfg.model.resolution % 8:
        raise ConfigError(f"model.resolution: must be a multiple of 8, got {cfg.model.resolution}")
    for key in ["train.checkpoint_every", "train.max_grad_norm",
                "generation.gpus_per_actor", "data.prepare_gpus_per_actor", "generation.eta",
                "train.max_failures"]:
        if get_by_path(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_by_path(cfg, key)}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.generation.guidance_scale < 1.0:
        raise ConfigError(f"generation.guidance_scale: must be >= 1, got {cfg.generation.guidance_scale}")
    _validate_baselines(cfg)
    _validate_selection_prompts(cfg)
    # here, not at the top: it imports the config. Every Config is validated when built (from_dict,
    # replace, with_overrides), so a bad train.eval_every/keep fails before any stage.
    from spin_ray.checkpoint_selection import check_selection_config

    check_selection_config(cfg)
    if cfg.self_play.opponent_history < 1:
        raise ConfigError(f"self_play.opponent_history: must be >= 1, got {cfg.self_play.opponent_history}")
    if cfg.self_play.opponent_history > 1 and cfg.self_play.opponent == "initial":
        raise ConfigError("self_play.opponent_history: must be 1 with self_play.opponent: initial (every "
                          f"iteration's opponent is theta_0; there is no history to mix), got "
                          f"{cfg.self_play.opponent_history}")
    if not cfg.data.path and cfg.model.pretrained != "toy":
        raise ConfigError("data.path: required unless model.pretrained is 'toy' (the embedded toy world)")
    return cfg


def _validate_baselines(cfg: Config) -> None:
    """``self_play.baselines`` without repeats, DPO only on winner/loser data, every schedule
    value that is set in range."""
    names = list(cfg.self_play.baselines)
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"self_play.baselines: {name!r} is listed twice, got {names}")
    if "dpo" in names and cfg.data.format != "pickapic":
        raise ConfigError(f"self_play.baselines: 'dpo' needs (winner, loser) pairs, which only data.format "
                          f"'pickapic' has; got data.format {cfg.data.format!r}")
    for name in ("sft", "dpo"):
        schedule = getattr(cfg.baselines, name)
        for key in ("lr", "steps", "batch_size", "gradient_accumulation_steps", "beta"):
            value = getattr(schedule, key, None)
            if value is not None and not value > 0:
                raise ConfigError(f"baselines.{name}.{key}: must be positive, got {value}")
        if schedule.warmup_steps is not None and schedule.warmup_steps < 0:
            raise ConfigError(f"baselines.{name}.warmup_steps: must be >= 0, got {schedule.warmup_steps}")


def _prompt_set_list(value: str | list[str]) -> list[str]:
    return [p.strip() for p in ([value] if isinstance(value, str) else value) if p.strip()]


def _same_prompt_set(a: str, b: str) -> bool:
    import posixpath

    def norm(path: str) -> str:
        return path if path in ("toy", "toy_selection") or "://" in path else posixpath.normpath(
            posixpath.expanduser(path)).rstrip("/")
    return norm(a) == norm(b)


def _validate_selection_prompts(cfg: Config) -> None:
    """No model chosen on the prompts it is reported on, unless the config says it may be."""
    if cfg.eval.allow_selection_on_report_prompts:
        return
    report = _prompt_set_list(cfg.eval.prompts)
    shared = [s for s in _prompt_set_list(cfg.eval.selection_prompts) if any(_same_prompt_set(s, r) for r in report)]
    if shared:
        raise ConfigError(f"eval.selection_prompts and eval.prompts share {', '.join(shared)}: models would be "
                          "selected on the prompts they are reported on; give eval.selection_prompts a validation "
                          "set (toy_selection for toy) or set eval.allow_selection_on_report_prompts=true")
