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

from spin_ray.config import PER_ITERATION_KEYS, ConfigError, get_by_path

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
            if v <= 0:
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
    for key in ["train.warmup_steps", "train.checkpoint_every", "train.max_grad_norm",
                "generation.gpus_per_actor", "data.prepare_gpus_per_actor", "generation.eta",
                "train.max_failures"]:
        if get_by_path(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_by_path(cfg, key)}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.generation.guidance_scale < 1.0:
        raise ConfigError(f"generation.guidance_scale: must be >= 1, got {cfg.generation.guidance_scale}")
    if not cfg.data.path and cfg.model.pretrained != "toy":
        raise ConfigError("data.path: required unless model.pretrained is 'toy' (the embedded toy world)")
    return cfg
