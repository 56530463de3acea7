"""The ``sweep:`` section of a sweep config, parsed, checked and loaded: what :mod:`spin_ray.sweep` runs.

A sweep config is a normal config plus ``sweep:`` (:class:`SweepConfig`); its ``space`` uses the
dotted keys of command-line overrides (see :mod:`spin_ray.sweep` for the modes). Everything here
is plain data and checks (Ray only names a :class:`Dimension` in Tune's terms): a bad key or
range fails with its dotted path before any trial starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spin_ray.config import (
    COMMAND_LINE,
    Config,
    ConfigError,
    blame,
    build_config,
    dump_config,
    get_by_path,
    load_yaml,
    parse_override,
    with_overrides,
)

AVERAGE_METRIC = "average"

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")
SWEEP_MODES = ("grid", "pbt")
FIXED_KEYS = (
    "run_dir", "seed", "model", "data", "generation", "self_play", "eval", "cluster",
    "loss.reference", "loss.shared_noise", "train.mixed_precision",
)
"""Keys a sweep may not vary: its trials share the prepared data, the generated opponents
and the evaluation protocol, which these keys define."""
SAMPLE_KEYS = ("train.steps", "train.batch_size", "train.gradient_accumulation_steps", "train.num_workers")
"""Keys that change how many samples an iteration trains on (and so how many opponents it needs)."""
DEFAULT_RESOURCES = {"cpu": 0.0}
"""A trial only drives its TorchTrainer and Ray Data actors, which ask for their own CPUs and
GPUs; a trial holding a CPU share can starve them on a small machine (docs/DESIGN.md section 7)."""
MAX_CONCURRENT_TRIALS = 64
"""Above this, 1/max_concurrent_trials of a resource loses its meaning at Ray's precision (1e-4)."""


class SweepError(RuntimeError):
    """A sweep cannot go on (e.g. every trial of an iteration failed)."""


# ----------------------------------------------------------------------------- the sweep section


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``grid``/``choice`` over ``values``, or ``uniform``/``loguniform``
    over ``values = (low, high)``."""

    kind: str
    values: tuple[Any, ...]

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def to_tune(self) -> Any:
        """The Ray Tune search-space entry (``tune.grid_search``, ``tune.choice``, ...)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)

    def to_mutation(self) -> Any:
        """PBT's ``hyperparam_mutations`` entry: a list (shift to a neighbour or resample) or a
        continuous domain (multiply by 0.8 or 1.2, or resample)."""
        return list(self.values) if self.discrete else self.to_tune()


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep:`` section of a sweep config."""

    mode: str = "grid"
    """``grid``: per-iteration search; ``pbt``: population-based self-play."""
    metric: str = "toy"
    """The held-out score trials are ranked by (higher is better): a scorer name of
    :func:`spin_ray.rewards.load_scorer`, or ``average`` (the mean over ``eval.scorers``).
    Best-of-``eval.num_images_per_prompt`` mean over the first prompt set of
    ``eval.selection_prompts`` (validation prompts; the report keeps ``eval.prompts``)."""
    space: dict[str, Dimension] = field(default_factory=dict)
    """Dotted config key -> ``{grid|choice|uniform|loguniform: [...]}``."""
    num_samples: int = 1
    """Ray Tune ``num_samples``: each grid point is repeated with this many draws of the random keys."""
    max_concurrent_trials: int = 1
    """Trials running at once; each runs its own TorchTrainer and Ray Data actors."""
    resources_per_trial: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    """What the trial process itself reserves (``cpu``, ``gpu``, ``memory`` bytes, custom),
    besides its share of the head node (:func:`trial_resources`)."""
    perturbation_interval: int = 1
    """pbt: self-play iterations between exploit/explore steps."""
    quantile_fraction: float = 0.25
    """pbt: share of the population cloned from (top) and replaced (bottom)."""
    resample_probability: float = 0.25
    """pbt: chance that a perturbed key is drawn afresh instead of shifted/scaled."""
    seed: int = 0
    """Seed of the random search draws and of PBT's choices."""

    def search_signature(self) -> dict[str, Any]:
        """What defines the search (resuming a run dir with another one is refused)."""
        return {
            "mode": self.mode, "metric": self.metric, "num_samples": self.num_samples, "seed": self.seed,
            "space": {key: {dim.kind: list(dim.values)} for key, dim in self.space.items()},
        }


_SWEEP_FIELDS = {f.name for f in dataclasses.fields(SweepConfig)}


def parse_sweep(values: Mapping[str, Any], cfg: Config) -> SweepConfig:
    """Build a :class:`SweepConfig` from the ``sweep:`` mapping and check every searched
    value against ``cfg`` (a value the config would reject fails here, naming its key)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"sweep: expected a mapping, got {values!r}")
    for name in values:
        if name not in _SWEEP_FIELDS:
            raise ConfigError(_unknown(f"sweep.{name}", str(name), sorted(_SWEEP_FIELDS), "sweep."))
    kwargs = {name: value for name, value in values.items() if name != "space"}
    kwargs = {name: _check_field(name, value) for name, value in kwargs.items()}
    space = values.get("space") or {}
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("sweep.space: expected a mapping of dotted config keys to "
                          "{grid|choice|uniform|loguniform: [...]}, e.g. loss.beta: {grid: [2000, 5000]}")
    kwargs["space"] = {str(key): _parse_dimension(str(key), spec, cfg) for key, spec in space.items()}
    return SweepConfig(**kwargs)


def _check_field(name: str, value: Any) -> Any:
    key = f"sweep.{name}"
    if name == "mode":
        if value not in SWEEP_MODES:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(SWEEP_MODES)}")
        return value
    if name == "metric":
        from spin_ray.rewards import SCORER_NAMES

        if value not in (*SCORER_NAMES, AVERAGE_METRIC):
            raise ConfigError(f"{key}: {value!r} is not a scorer ({', '.join(SCORER_NAMES)}) or {AVERAGE_METRIC!r}")
        return value
    if name == "resources_per_trial":
        return _check_resources(value)
    if name == "max_concurrent_trials" and _is_int(value) and value > MAX_CONCURRENT_TRIALS:
        raise ConfigError(f"{key}: at most {MAX_CONCURRENT_TRIALS}, got {value!r}")
    if name in ("num_samples", "max_concurrent_trials", "perturbation_interval"):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {value!r}")
        return value
    if name == "seed":
        if not _is_int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    number = _number(value, key)
    if name == "quantile_fraction" and not 0.0 < number <= 0.5:
        raise ConfigError(f"{key}: must be in (0, 0.5], got {value!r}")
    if name == "resample_probability" and not 0.0 <= number <= 1.0:
        raise ConfigError(f"{key}: must be in [0, 1], got {value!r}")
    return number


def _check_resources(value: Any) -> dict[str, float]:
    key = "sweep.resources_per_trial"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping such as {{cpu: 0}} or {{cpu: 1, gpu: 1}}, got {value!r}")
    resources = {str(name): _number(amount, f"{key}.{name}") for name, amount in value.items()}
    if any(amount < 0 for amount in resources.values()):
        raise ConfigError(f"{key}: amounts must be >= 0, got {resources}")
    if any(name.startswith("node:") for name in resources):
        raise ConfigError(f"{key}: 'node:' resources are set by the sweep from sweep.max_concurrent_trials")
    return resources


def _parse_dimension(key: str, spec: Any, cfg: Config) -> Dimension:
    where = f"sweep.space.{key}"
    for fixed in FIXED_KEYS:
        if key == fixed or key.startswith(fixed + "."):
            raise ConfigError(f"{where}: {fixed!r} keys cannot be searched: all trials share the prepared "
                              "data, the generated opponents and the evaluation they define")
    _check_key(key, cfg, where)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}: expected exactly one of {{grid|choice|uniform|loguniform: [...]}}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"{where}: unknown search kind {kind!r}; expected one of {', '.join(SEARCH_KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        values = _bounds(where, kind, values)
    for value in values:
        try:
            with_overrides(cfg, {key: value})
        except ConfigError as err:
            raise ConfigError(f"{where}: the value {value!r} is not valid for this key: {err}") from None
    return Dimension(kind=kind, values=tuple(values))


def _check_key(key: str, cfg: Config, where: str) -> None:
    """An unknown key fails with config.py's message (it suggests the closest key)."""
    try:
        get_by_path(cfg, key)
    except AttributeError:
        try:
            with_overrides(cfg, {key: None})
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def _bounds(where: str, kind: str, values: list[Any]) -> list[float]:
    if len(values) != 2:
        raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
    low, high = (_number(v, f"{where}.{kind}") for v in values)
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low must be below high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.{kind}: bounds must be positive, got {values!r}")
    return [low, high]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, key: str) -> float:
    if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _unknown(key: str, name: str, known: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
    return f"unknown sweep key {key!r}; {hint}"


# ----------------------------------------------------------------------------- loading


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` overrides -> (those of the ``sweep.`` section, those of the config)."""
    sweep = [text for text in overrides if text.split("=", 1)[0].strip().startswith("sweep.")]
    return sweep, [text for text in overrides if text not in sweep]


def apply_sweep_overrides(section: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``sweep.<field>=value``, ``sweep.resources_per_trial.<name>=value`` and
    ``sweep.space.<dotted config key>={grid: [...]}`` in a copy of the section."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"sweep: expected a mapping, got {section!r}")
    result = json.loads(json.dumps(section))
    for text in overrides:
        key, value = parse_override(text)
        path = key[len("sweep."):]
        name, _, rest = path.partition(".")
        if name not in _SWEEP_FIELDS:
            raise ConfigError(_unknown(key, name, sorted(_SWEEP_FIELDS), "sweep."))
        if not rest:
            result[name] = value
        elif name in ("space", "resources_per_trial"):
            result.setdefault(name, {})[rest] = value
        else:
            raise ConfigError(f"override {text!r}: sweep.{name} is not a section; cannot set {key!r}")
    return result


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, SweepConfig]:
    """Read a sweep config: the YAML's ``sweep:`` section becomes a :class:`SweepConfig`, the
    rest a :class:`Config`; ``sweep.*`` overrides go to the first, all others to the second."""
    values = load_yaml(path)
    section = values.pop("sweep", None)
    sweep_overrides, config_overrides = split_overrides(overrides)
    if section is None and not sweep_overrides:
        raise ConfigError(f"{path}: no top-level 'sweep:' section; see configs/sweep_beta.yaml for one")
    cfg = build_config(values, config_overrides, source=path)  # its errors name their source
    try:
        merged = apply_sweep_overrides(section or {}, sweep_overrides)
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    try:
        sweep = parse_sweep(merged, cfg)
    except ConfigError as err:
        raise blame(err, path, sweep_overrides, lambda: parse_sweep(section or {}, cfg)) from None
    from spin_ray.eval.prompt_sets import selection_prompt_set

    selection_prompt_set(cfg.eval.selection_prompts)  # trials are ranked on it: fail before any work
    return cfg, sweep


def dump_sweep_config(cfg: Config, sweep: SweepConfig) -> str:
    """The resolved sweep config as YAML (the config, then its ``sweep:`` section);
    :func:`load_sweep` of it gives back ``(cfg, sweep)``."""
    section = {f.name: getattr(sweep, f.name) for f in dataclasses.fields(sweep)}
    section["space"] = {key: {dim.kind: list(dim.values)} for key, dim in sweep.space.items()}
    return dump_config(cfg) + yaml.safe_dump({"sweep": section}, sort_keys=False)
