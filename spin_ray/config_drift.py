"""Which config keys a finished stage depends on, and how two configs differ for it (issue 19, item 1).

Pure functions of configs as plain nested dicts (:func:`spin_ray.config.to_dict`, or a stage's
stored ``config.yaml``); the run directory side (stored configs, the history file,
``--restart-from``) is :mod:`spin_ray.rerun_check`.

What each stage depends on (a stage also depends on every stage it builds on: the prepared
table under everything, theta_{k-1} under iteration k):

- ``prepared``: ``model.*`` and ``data.*``.
- ``baseline_<name>``: the above, ``seed``, ``train.*`` (the baselines inherit it), iteration 1's
  ``train.lr`` and ``train.warmup_steps``, the ``train.steps`` of every iteration when
  ``baselines.<name>.steps`` is unset (their sum is its length), ``baselines.<name>.*``, and
  iteration 1's ``loss.beta`` for ``dpo``.
- ``iter_<k>``: the prepared table's keys, ``seed``, ``train.*``, ``loss.*``, ``generation.*``,
  ``self_play.opponent`` and ``self_play.opponent_history``, and the per-iteration values of
  ``loss.beta``, ``train.lr``, ``train.steps`` and ``train.warmup_steps`` of iterations 1..k
  (iteration j's steps also move where iteration k's samples start in the data order).

Keys that cannot change a finished stage (:data:`NEVER_AFFECTS`: evaluation, actor counts and
GPUs per actor, cluster, logging and checkpoint frequency, tracking, publishing, the number of
iterations, which baselines run) are never drift. Generation's batch size is one of them: every
opponent sample is seeded by its own id, not its batch.
"""

from __future__ import annotations

from typing import Any

from spin_ray.config import PER_ITERATION_KEYS, Config, per_iteration
from spin_ray.config_load import to_dict

NEVER_AFFECTS = (
    "run_dir", "eval.", "cluster.", "tracking.", "publish.", "self_play.iterations", "self_play.baselines",
    "self_play.sft_baseline", "model.local_files_only", "data.prepare_batch_size", "data.prepare_num_actors",
    "data.prepare_gpus_per_actor", "generation.batch_size", "generation.num_actors", "generation.gpus_per_actor",
    "generation.compile", "train.log_every", "train.checkpoint_every", "train.max_failures",
    "train.max_nonfinite_steps", "train.compile", "train.gradient_checkpointing",
)
"""Keys (or sections, ending in ``.``) that no finished stage depends on: changing them is allowed."""
PREPARED = "prepared"
BASELINE_PREFIX = "baseline_"
ITERATION_PREFIX = "iter_"
ABSENT = "(not set)"
"""The value shown for a per-iteration entry a list does not have."""


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def never_affects(key: str) -> bool:
    """Whether no finished stage depends on ``key`` (:data:`NEVER_AFFECTS`)."""
    return any(key.startswith(rule) if rule.endswith(".") else key == rule for rule in NEVER_AFFECTS)


def _affects(key: str, stage: str) -> bool:
    """Whether ``stage`` depends on the plain (not per-iteration) key ``key``."""
    if never_affects(key) or key in PER_ITERATION_KEYS:
        return False
    if key.startswith(("model.", "data.")):
        return True  # every stage is built on the prepared table
    if stage == PREPARED:
        return False
    if key == "seed" or key.startswith("train."):
        return True
    if stage.startswith(BASELINE_PREFIX):
        return key.startswith(f"baselines.{stage[len(BASELINE_PREFIX):]}.")
    return key.startswith(("loss.", "generation.")) or key in ("self_play.opponent", "self_play.opponent_history")


def _per_iteration_keys(stage: str, flat: dict[str, Any]) -> list[tuple[str, int]]:
    """The (per-iteration key, iteration) pairs ``stage`` depends on, given its stored config ``flat``."""
    if stage == PREPARED:
        return []
    if stage.startswith(ITERATION_PREFIX):
        k = int(stage[len(ITERATION_PREFIX):])
        return [(key, j) for key in PER_ITERATION_KEYS for j in range(1, k + 1)]
    name = stage[len(BASELINE_PREFIX):]
    pairs = [("train.lr", 1), ("train.warmup_steps", 1)] + ([("loss.beta", 1)] if name == "dpo" else [])
    if flat.get(f"baselines.{name}.steps") is None:  # the sum of every iteration's steps
        pairs += [("train.steps", j) for j in range(1, int(flat.get("self_play.iterations", 1)) + 1)]
    return pairs


def _at(value: Any, iteration: int) -> Any:
    if isinstance(value, list) and len(value) < iteration:
        return ABSENT
    return per_iteration(value, iteration)


def stage_values(stage: str, stored: dict[str, Any], current: dict[str, Any]) -> tuple[dict, dict]:
    """The values ``stage`` depends on, as (in its stored config, in the current config), keyed
    by dotted key (``loss.beta[iteration 2]`` for a per-iteration value). Both configs are nested
    dicts; a key the stored config lacks (it predates the key) takes today's default."""
    defaults = flatten(to_dict(Config()))
    old, new = {**defaults, **flatten(stored)}, {**defaults, **flatten(current)}
    keys = sorted(key for key in old.keys() | new.keys() if _affects(key, stage))
    before = {key: old.get(key, ABSENT) for key in keys}
    after = {key: new.get(key, ABSENT) for key in keys}
    for key, j in _per_iteration_keys(stage, old):
        name = f"{key}[iteration {j}]"
        before[name], after[name] = _at(old.get(key), j), _at(new.get(key), j)
    return before, after


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (old, new) for every key whose value differs."""
    return {key: (before.get(key, ABSENT), after.get(key, ABSENT))
            for key in sorted(before.keys() | after.keys()) if before.get(key, ABSENT) != after.get(key, ABSENT)}


def allowed_changes(stored: dict[str, Any], current: dict[str, Any], drifted: set[str]) -> dict[str, tuple[Any, Any]]:
    """The keys that changed between two whole configs without changing a finished stage: those
    no stage depends on, and per-iteration lists changed only where no finished stage reads
    them (``drifted``: the keys :func:`changed` found for the finished stages)."""
    old, new = flatten(stored), flatten(current)
    return {key: pair for key, pair in changed(old, new).items()
            if never_affects(key) or (key in PER_ITERATION_KEYS and not any(d.startswith(f"{key}[") for d in drifted))}


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key of stages in the order a run makes them: prepared, baselines, iterations."""
    if stage == PREPARED:
        return (0, 0)
    if stage.startswith(BASELINE_PREFIX):
        return (1, 0 if stage == "baseline_sft" else 1)
    return (2, int(stage[len(ITERATION_PREFIX):]))
