"""Loading a config: YAML files, dotted ``key=value`` overrides, and errors that name their source.

The entry points (:func:`load_config`, :func:`from_dict`, :func:`with_overrides`, ...) are
importable from :mod:`spin_ray.config` too, where the classes they build are documented. An
error says where the bad value came from: the config file or the ``command line``
(:func:`blame`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from spin_ray.config import Config, ConfigError
from spin_ray.config_security import check_config_security
from spin_ray.config_validate import build_dataclass, coerce, field_types, unknown_key_message, validate

__all__ = [
    "COMMAND_LINE", "apply_overrides", "blame", "build_config", "dump_config", "from_dict", "load_config",
    "load_yaml", "parse_override", "replace", "to_dict", "with_overrides",
]


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (security checks included:
    :mod:`spin_ray.config_security`)."""
    cfg = validate(build_dataclass(Config, values, ""))
    check_config_security(to_dict(cfg))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML-ready)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-5"`` -> ``("train.lr", 1e-5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:  # e.g. "train.lr=[1," : one line, not a traceback
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    return key, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested mapping (a copy); unknown keys fail."""
    result = _deep_copy(values)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(result, key, value)
    return result


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


def _set_path(values: dict[str, Any], dotted: str, value: Any) -> None:
    cls: Any = Config
    node = values
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        known = field_types(cls)
        if part not in known:
            raise ConfigError(unknown_key_message(part, list(known), prefix))
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = known[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section; cannot set {dotted!r}")
        node = node.setdefault(part, {})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply ``key=value`` overrides, validate."""
    values = load_yaml(path) if path is not None else {}
    if "sweep" in values:
        raise ConfigError(f"{path}: has a top-level 'sweep:' section, so it is a sweep config: "
                          f"run it with python jobs/sweep.py --config {path}")
    return build_config(values, overrides or [], source=path)


COMMAND_LINE = "command line"
"""How an error names the ``key=value`` overrides as the source of a bad value."""


def build_config(values: dict[str, Any], overrides: list[str], source: str | Path | None) -> Config:
    """:func:`from_dict` of the file's ``values`` with ``overrides`` applied; an error names
    where the bad value came from: ``command line`` or the file ``source``."""
    try:
        merged = apply_overrides(values, overrides)
        for text in overrides:  # type errors of an override are the command line's own
            key, value = parse_override(text)
            coerce(value, _type_at(key), key)
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    try:
        return from_dict(merged)
    except ConfigError as err:
        raise blame(err, source, overrides, lambda: from_dict(values)) from None


def blame(err: ConfigError, source: str | Path | None, overrides: Sequence[str],
          file_alone: Callable[[], object]) -> ConfigError:
    """``err`` prefixed with its origin: the file ``source`` if the file alone (``file_alone``
    builds it) fails the same way, else the command line (its overrides caused it)."""
    if source is not None and (not overrides or _fails_with(file_alone, str(err))):
        return ConfigError(f"{source}: {err}")
    return ConfigError(f"{COMMAND_LINE}: {err}")


def _fails_with(build: Callable[[], object], message: str) -> bool:
    try:
        build()
    except ConfigError as other:
        return str(other) == message
    return False


def _type_at(dotted: str) -> Any:
    """The annotation of the dotted key (checked to exist by :func:`apply_overrides`)."""
    tp: Any = Config
    for part in dotted.split("."):
        tp = field_types(tp)[part]
    return tp


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of it gives back ``cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that validates a whole :class:`Config` again."""
    new = dataclasses.replace(cfg, **changes)
    return validate(new) if isinstance(new, Config) else new


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key overrides (values already typed), validated."""
    values = to_dict(cfg)
    for key, value in overrides.items():
        _set_path(values, key, value)
    return from_dict(values)
