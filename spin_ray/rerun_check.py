"""Before a rerun does any work: refuse a config that changed under finished stages, unless told.

Every finished stage keeps the config it was made with: ``<stage>/config.yaml`` (written by
:func:`spin_ray.stages.run_stage` before its DONE; ``prepared/config.yaml`` by
:func:`record_prepared_config`). :func:`check_rerun` compares, for each finished stage, the keys
it depends on (:mod:`spin_ray.config_drift`) with the current config, and when any differ stops
with a :class:`ConfigDriftError` (exit code 2) naming each key with its old and new value,
unless the command line says what to do:

- ``--restart-from <stage>`` (``prepared``, ``baseline_<name>``, ``iter_<k>``): that stage and
  every stage built on it are moved aside (``<stage>.stale-<time>``, never deleted), then the run
  makes them again with the current config;
- ``--accept-config-change``: the finished stages are kept; the change is appended to
  ``config_history.jsonl`` and later reruns compare against the accepted values.

A stage a killed run left unfinished (the next iteration's cached opponents and checkpoints, a
baseline's checkpoints) is compared the same way with the previous run's config (the run
directory's ``config.yaml``), which made them. Changes no stage depends on (evaluation, actor
counts, logging, more iterations) are allowed: printed and appended to the history. A finished stage without a stored config (a run
directory from before this check) is not compared, with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import yaml

from spin_ray.config import Config, baseline_names, dump_config
from spin_ray.config_drift import (
    ITERATION_PREFIX,
    PREPARED,
    allowed_changes,
    changed,
    stage_order,
    stage_values,
)
from spin_ray.config_load import to_dict
from spin_ray.errors import StorageError, UserError, first_line
from spin_ray.run_layout import RunLayout
from spin_ray.rundir import RunDir

logger = logging.getLogger(__name__)

HISTORY = RunLayout.CONFIG_HISTORY
"""The run's config history (JSON lines): accepted and allowed changes, restarts."""
_STAGE_NAME = re.compile(r"^(prepared|baseline_[a-z]+|iter_[1-9][0-9]*)$")


class ConfigDriftError(UserError, ValueError):
    """The config changed under finished stages and the command line did not say what to do."""

    label = "config changed"


@dataclass(frozen=True)
class RerunChoice:
    """What the command line says to do with finished stages whose config changed."""

    restart_from: tuple[str, ...] = ()
    """Stages to redo, each with every stage built on it (``--restart-from``, repeatable)."""
    accept_config_change: bool = False
    """Keep the finished stages as they are and record the change (``--accept-config-change``)."""


def check_rerun(cfg: Config, rundir: RunDir, choice: RerunChoice = RerunChoice()) -> None:
    """Compare the finished stages' configs with ``cfg`` and act on ``choice`` (module docstring);
    raises :class:`ConfigDriftError` before anything is changed."""
    try:
        _check(cfg, rundir, choice)
    except OSError as err:
        if isinstance(err, UserError):
            raise
        raise StorageError(f"run_dir {rundir.path()}: cannot read it ({first_line(err)})") from err


def _check(cfg: Config, rundir: RunDir, choice: RerunChoice) -> None:
    current = to_dict(cfg)
    names = _top_level_names(rundir)
    aside = sorted({name for stage in choice.restart_from for name in redone_by(stage, names)}, key=_order)
    kept = [stage for stage in finished_stages(rundir, cfg) if stage not in aside]
    history = read_history(rundir)
    previous = _previous_config(rundir)
    drift: dict[str, dict[str, tuple[Any, Any]]] = {}
    partial = [stage for stage in unfinished_stages(rundir, cfg, names) if stage not in aside]
    for stage in kept + partial:
        stored = stored_config(rundir, stage) if stage in kept else previous
        if stored is None and stage in partial:
            continue
        if stored is None:
            logger.warning("%s: %s was finished without its config (an older run directory): not compared with "
                           "this config", rundir.path(), stage)
            continue
        before, after = stage_values(stage, stored, current)
        before.update(_accepted(history, stage, before))
        if differences := changed(before, after):
            drift[stage] = differences
    if drift and not choice.accept_config_change:
        raise ConfigDriftError(drift_message(rundir, drift))
    for stage in aside:
        moved = rundir.set_aside(stage, "is redone (--restart-from)")
        append_history(rundir, {"action": "restart", "stage": stage, "moved_to": moved})
    _log_allowed(rundir, previous, current, {key for changes in drift.values() for key in changes})
    if drift:
        changes = [{"stage": stage, "key": key, "old": old, "new": new}
                   for stage, differences in drift.items() for key, (old, new) in differences.items()]
        print(f"[config] --accept-config-change: keeping what earlier runs made of {', '.join(drift)}; "
              f"{_describe(drift)} (recorded in {rundir.path(HISTORY)})", flush=True)
        append_history(rundir, {"action": "accept", "changes": changes})


def redone_by(stage: str, names: list[str]) -> list[str]:
    """The directories ``--restart-from stage`` moves aside, of the run dir's top-level ``names``:
    the stage and every stage built on it (everything for ``prepared``, the toy data included;
    ``iter_j`` for j >= k for ``iter_k``; only itself for a baseline)."""
    if not _STAGE_NAME.match(stage):
        raise ConfigDriftError(f"--restart-from {stage}: expected prepared, baseline_<name> (e.g. baseline_sft) or "
                               "iter_<k> (e.g. iter_2)")
    stages = [name for name in names if _STAGE_NAME.match(name)]
    if stage == PREPARED:
        return stages + (["toy_data"] if "toy_data" in names else [])
    if stage.startswith(ITERATION_PREFIX):
        k = int(stage[len(ITERATION_PREFIX):])
        return [name for name in stages if name.startswith(ITERATION_PREFIX) and int(name[len(ITERATION_PREFIX):]) >= k]
    return [stage] if stage in names else []


def finished_stages(rundir: RunDir, cfg: Config) -> list[str]:
    """The finished stages this run would reuse: the prepared table, its baselines, and its
    iterations 1..K that are all DONE (a DONE iteration after a gap is redone anyway)."""
    stages = [PREPARED] if rundir.is_done(PREPARED) else []
    stages += [rundir.baseline(name) for name in baseline_names(cfg) if rundir.is_done(rundir.baseline(name))]
    done = set(rundir.done_iterations())
    k = 1
    while k in done and k <= cfg.self_play.iterations:
        stages.append(rundir.iteration(k))
        k += 1
    return stages


def unfinished_stages(rundir: RunDir, cfg: Config, names: list[str]) -> list[str]:
    """The stages a killed run left unfinished whose caches this run would reuse (a baseline's
    or the next iteration's Ray Train checkpoints, the iteration's cached opponents): they were
    made with the previous run's config (the run directory's ``config.yaml``)."""
    wanted = [rundir.baseline(name) for name in baseline_names(cfg)]
    done = set(rundir.done_iterations())
    k = 1
    while k in done:
        k += 1
    if k <= cfg.self_play.iterations:
        wanted.append(rundir.iteration(k))
    return [stage for stage in wanted if stage in names and not rundir.is_done(stage)]


def stored_config(rundir: RunDir, stage: str) -> dict[str, Any] | None:
    """The config ``stage`` was made with (nested dicts), or None when it was not stored."""
    rel = rundir.stage_config(stage)
    if not rundir.exists(rel):
        return None
    values = yaml.safe_load(rundir.read_text(rel))
    return values if isinstance(values, dict) else None


def record_prepared_config(rundir: RunDir, cfg: Config, done_before: str | None) -> None:
    """Store ``cfg`` as ``prepared/config.yaml`` when the prepared table was made by this run
    (its DONE differs from ``done_before``, read before :func:`spin_ray.stages.ensure_prepared`)."""
    if prepared_done_text(rundir) not in (None, done_before):
        rundir.write_text_atomic(rundir.stage_config(PREPARED), dump_config(cfg))


def prepared_done_text(rundir: RunDir) -> str | None:
    """The text of ``prepared/DONE``, or None when the table is not finished."""
    return rundir.read_text(rundir.done_marker(PREPARED)) if rundir.is_done(PREPARED) else None


def read_history(rundir: RunDir) -> list[dict[str, Any]]:
    """The entries of the run's config history, oldest first."""
    if not rundir.exists(HISTORY):
        return []
    return [json.loads(line) for line in rundir.read_text(HISTORY).splitlines() if line.strip()]


def append_history(rundir: RunDir, entry: dict[str, Any]) -> None:
    """Add ``entry`` (stamped with the time) to the history; the file is rewritten atomically
    (object stores cannot append)."""
    before = rundir.read_text(HISTORY) if rundir.exists(HISTORY) else ""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}, sort_keys=True)
    rundir.write_text_atomic(HISTORY, before + line + "\n")


def drift_message(rundir: RunDir, drift: dict[str, dict[str, tuple[Any, Any]]]) -> str:
    """One line: every changed key with its old and new value and the stages it changes, and
    the two ways on."""
    first_iteration = next((stage for stage in drift if stage.startswith(ITERATION_PREFIX)), None)
    restarts = [PREPARED] if PREPARED in drift else [
        *(stage for stage in drift if not stage.startswith(ITERATION_PREFIX)), *([first_iteration] * bool(first_iteration))]
    redo = " ".join(f"--restart-from {stage}" for stage in restarts)
    return (f"{rundir.path()}: the config changed under stages made by an earlier run: {_describe(drift)}. Rerun with {redo} to "
            f"make them again with this config (the old ones are moved aside, not deleted), or with "
            f"--accept-config-change to keep them as they are (recorded in {HISTORY}); or use another run_dir")


def _describe(drift: dict[str, dict[str, tuple[Any, Any]]]) -> str:
    """``loss.beta[iteration 2]: 2000.0 -> 5000.0 (iter_2, iter_3); ...``, each change once."""
    stages_of: dict[tuple[str, str, str], list[str]] = {}
    for stage, differences in drift.items():
        for key, (old, new) in differences.items():
            stages_of.setdefault((key, _show(old), _show(new)), []).append(stage)
    return "; ".join(f"{key}: {old} -> {new} ({', '.join(stages)})" for (key, old, new), stages in stages_of.items())


def _previous_config(rundir: RunDir) -> dict[str, Any] | None:
    """The config of the previous run (the run directory's ``config.yaml``), or None."""
    if not rundir.exists(rundir.CONFIG):
        return None
    values = yaml.safe_load(rundir.read_text(rundir.CONFIG))
    return values if isinstance(values, dict) else None


def _log_allowed(rundir: RunDir, previous: dict[str, Any] | None, current: dict[str, Any], drifted: set[str]) -> None:
    """Print and record the changes since the previous run's config that change no finished stage."""
    if previous is None:
        return
    allowed = allowed_changes(previous, current, drifted)
    if not allowed:
        return
    text = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in allowed.items())
    print(f"[config] changed since the previous run, changing no finished stage: {text}", flush=True)
    append_history(rundir, {"action": "allowed",
                            "changes": [{"key": key, "old": old, "new": new} for key, (old, new) in allowed.items()]})


def _accepted(history: list[dict[str, Any]], stage: str, before: dict[str, Any]) -> dict[str, Any]:
    """The values accepted for ``stage`` by earlier ``--accept-config-change`` runs, latest last."""
    accepted: dict[str, Any] = {}
    for entry in history:
        for change in entry.get("changes", []) if entry.get("action") == "accept" else []:
            if change.get("stage") == stage and change.get("key") in before:
                accepted[change["key"]] = change.get("new")
    return accepted


def _top_level_names(rundir: RunDir) -> list[str]:
    rundir.fs.invalidate_cache(rundir.root)
    try:
        return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in rundir.fs.ls(rundir.root, detail=False))
    except FileNotFoundError:
        return []


def _order(name: str) -> tuple[int, int]:
    return stage_order(name) if _STAGE_NAME.match(name) else (-1, 0)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
