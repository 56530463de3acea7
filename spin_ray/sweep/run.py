"""Running a sweep: claim the run directory, prepare once, search every iteration (grid) or
run the population (pbt), then evaluate the published models as ``jobs/self_play.py`` does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from spin_ray.config import Config, dump_config, with_overrides
from spin_ray.rundir import RunDir
from spin_ray.stages import ensure_prepared, resolve_base_model, run_sft_baseline
from spin_ray.sweep.config import SweepConfig
from spin_ray.sweep.context import SweepContext
from spin_ray.sweep.grid import search_iteration
from spin_ray.sweep.pbt import run_pbt
from spin_ray.sweep.resume import claim_run_dir
from spin_ray.sweep.trials import TrialRow


@dataclass
class SweepResult:
    """What a sweep produced: the published models and each iteration's winner."""

    run_dir: str
    models: dict[str, str] = field(default_factory=dict)
    """base, (sft,) iter_1, ..., iter_K -> local model directory."""
    winners: dict[int, TrialRow] = field(default_factory=dict)
    """Iteration -> the trial whose model became ``iter_<k>/model``."""


def run_sweep(cfg: Config, sweep: SweepConfig, *, resume: bool = False) -> SweepResult:
    """Run the sweep: per-iteration search (``grid``) or population-based self-play (``pbt``).
    ``resume``: continue the sweep in ``cfg.run_dir`` (trusts it: Tune unpickles its state);
    without it, a run dir that holds a sweep is a :class:`~spin_ray.config.ConfigError`."""
    from spin_ray.ray_session import ensure_ray

    cfg = _absolute_paths(cfg)
    rundir = RunDir(cfg.run_dir)
    claim_run_dir(rundir, sweep.search_signature(), resume=resume)
    rundir.write_run_config(dump_config(cfg))
    base_model = os.path.abspath(resolve_base_model(cfg, rundir))  # before Ray: a wrong path fails at once
    ensure_ray(cfg.cluster.address)
    shared = SweepContext(cfg=cfg, sweep=sweep, rundir=rundir, base_model=base_model,
                          prepared=ensure_prepared(cfg, rundir, base_model), resume=resume)
    result = SweepResult(run_dir=cfg.run_dir, models={RunDir.BASE: base_model})
    if cfg.self_play.sft_baseline:
        result.models["sft"] = run_sft_baseline(cfg, rundir, base_model=base_model, prepared=shared.prepared)
    if sweep.mode == "pbt":
        result.winners = run_pbt(shared)
    else:
        for k in range(1, cfg.self_play.iterations + 1):
            result.winners[k] = search_iteration(shared, k)
    for k in range(1, cfg.self_play.iterations + 1):
        result.models[rundir.iteration(k)] = rundir.local_copy(rundir.model(k))
    if cfg.eval.enabled:
        from spin_ray.eval.run import evaluate_models

        evaluate_models(cfg, rundir, result.models)
    return result


def _absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: make local paths absolute."""
    changes = {}
    for key, value in {"run_dir": cfg.run_dir, "model.pretrained": cfg.model.pretrained,
                       "data.path": cfg.data.path}.items():
        if value and value != "toy" and "://" not in value and (key == "run_dir" or Path(value).expanduser().exists()):
            changes[key] = os.path.abspath(Path(value).expanduser())
    for key in ("eval.prompts", "eval.selection_prompts"):
        value = cfg.eval.prompts if key == "eval.prompts" else cfg.eval.selection_prompts
        prompts = value if isinstance(value, list) else [value]
        if any(p and Path(p).expanduser().exists() for p in prompts):
            absolute = [os.path.abspath(Path(p).expanduser()) if p and Path(p).expanduser().exists() else p
                        for p in prompts]
            changes[key] = absolute if isinstance(value, list) else absolute[0]
    return with_overrides(cfg, changes) if changes else cfg
