"""Checkpoint evaluation during training (``train.eval_every``, ``train.keep``): the training
curve on the selection prompts (SPIN-Diffusion, Yuan et al. 2024, Fig. 7) and the choice of
the checkpoint a stage publishes (App. A.1: the SFT baseline's best checkpoint on validation).

While a stage trains, rank 0 writes theta after every ``eval_every``-th optimizer step and the
last as a complete diffusers model, ``<stage>/checkpoints/step_<N>/``
(:class:`spin_ray.trainer.Snapshots`: the starting model's VAE, text encoder, tokenizer and
scheduler + theta's UNet in safetensors, float32 as trained, no optimizer state; for SD-1.5
about 4.3 GB each, so 2000 steps with ``eval_every: 250`` hold 8 of them, about 35 GB, until
the stage is done). After training, the driver scores each one on the first
``eval.selection_prompts`` set with ``eval.scorers`` (the paper's protocol: best of
``eval.num_images_per_prompt`` per prompt, then the mean over prompts; scores cached per
checkpoint in ``<stage>/checkpoint_eval/step_<N>/`` by :mod:`spin_ray.eval.score_cache`, so a
resumed stage scores only what is left), writes the curve to ``<stage>/selection_curve.json``,
and moves the chosen checkpoint into place as the stage's model: the highest selection score
(:data:`SELECTION_METRIC`; the earliest of equal ones) with ``keep: best``, the last step with
``keep: last``. Once the stage is DONE every other checkpoint is deleted (the published model
is the chosen one; the curve and the scores stay). Ray Train's own checkpoints
(``<stage>/train/``, with the optimizer, for resuming) are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spin_ray.config import Config, ConfigError
from spin_ray.eval.metrics import AVERAGE
from spin_ray.rundir import RunDir

SELECTION_METRIC = AVERAGE
"""What ``keep: best`` maximises: the mean over prompts of the best-of-N average over scorers
(with one scorer, that scorer)."""


@dataclass(frozen=True)
class Selection:
    """How a stage's checkpoints are scored and which one it publishes."""

    eval_every: int
    """Score theta every this many optimizer steps and at the last (0: never)."""
    keep: str
    """``last`` or ``best``."""
    keys: tuple[str, str]
    """The config keys the two values came from (for messages)."""


def stage_selection(cfg: Config, baseline: str | None = None) -> Selection:
    """The selection of a SPIN iteration (``train.*``) or of baseline ``baseline``
    (``baselines.<name>.*``, a null value falling back to ``train.*``)."""
    every, keep = cfg.train.eval_every, cfg.train.keep
    keys = ["train.eval_every", "train.keep"]
    if baseline is not None:
        schedule = getattr(cfg.baselines, baseline)
        if schedule.eval_every is not None:
            every, keys[0] = schedule.eval_every, f"baselines.{baseline}.eval_every"
        if schedule.keep is not None:
            keep, keys[1] = schedule.keep, f"baselines.{baseline}.keep"
    return Selection(int(every), str(keep), (keys[0], keys[1]))


def check_selection_config(cfg: Config) -> None:
    """One-line :class:`ConfigError` for a checkpoint selection that cannot work: a negative
    ``eval_every``, ``keep: best`` without ``eval_every``, or ``eval_every`` with no
    ``eval.selection_prompts``; for ``train.*`` and each configured baseline. Called before
    any stage trains."""
    from spin_ray.config import baseline_names

    has_prompts = any(p.strip() for p in ([cfg.eval.selection_prompts] if isinstance(cfg.eval.selection_prompts, str)
                                          else cfg.eval.selection_prompts))
    for selection in [stage_selection(cfg), *(stage_selection(cfg, name) for name in baseline_names(cfg))]:
        every_key, keep_key = selection.keys
        if selection.eval_every < 0:
            raise ConfigError(f"{every_key}: must be >= 0, got {selection.eval_every}")
        if selection.keep == "best" and selection.eval_every == 0:
            raise ConfigError(f"{keep_key}: 'best' needs checkpoints scored during training; set {every_key} > 0 "
                              f"or {keep_key}: last")
        if selection.eval_every > 0 and not has_prompts:
            raise ConfigError(f"{every_key}: {selection.eval_every} scores checkpoints on eval.selection_prompts, "
                              "which is empty; set eval.selection_prompts (toy_selection for the toy world) or "
                              f"{every_key}: 0")


def scored_steps(steps: int, eval_every: int) -> list[int]:
    """The steps whose checkpoints are scored: every ``eval_every``-th, and the last."""
    return sorted({*range(eval_every, steps + 1, eval_every), steps}) if eval_every > 0 else []


def snapshot_checkpoint_every(eval_every: int, checkpoint_every: int) -> int:
    """The loop's checkpoint period that meets both the scored steps and ``train.checkpoint_every``."""
    return math.gcd(eval_every, checkpoint_every) if checkpoint_every else eval_every


def choose(points: list[dict[str, Any]], keep: str, metric: str = SELECTION_METRIC) -> tuple[int, str]:
    """(step, reason) of the checkpoint to publish from the curve ``points`` (in step order):
    the last with ``keep: last``; with ``keep: best`` the highest ``metric`` (the earliest
    of equal ones)."""
    if not points:
        raise ValueError("choose: no scored checkpoint")
    last = points[-1]
    if keep == "last":
        return int(last["step"]), f"keep=last: the last step ({metric} {last[metric]:.4g})"
    best = max(points, key=lambda point: (point[metric], -point["step"]))
    return int(best["step"]), (f"keep=best: the highest {metric} on the selection prompts, {best[metric]:.4g} at "
                               f"step {best['step']} (last step {last['step']}: {last[metric]:.4g})")


def score_checkpoint(cfg: Config, rundir: RunDir, stage: str, step: int, prompts: list[str]) -> dict[str, float]:
    """Metric -> mean over ``prompts`` of the best-of-N scores of the checkpoint at ``step``
    (each scorer and the average), from its stored scores when they are still valid."""
    from spin_ray.eval import metrics, rows, score_cache

    model = rundir.path(rundir.stage_checkpoint(stage, step))
    table = score_cache.model_scores(cfg, rundir, rundir.stage_checkpoint_eval(stage, step), model, prompts)
    scores = rows.gather_scores(table.to_pydict(), cfg.eval.scorers, len(prompts), cfg.eval.num_images_per_prompt)
    summary = metrics.evaluate_models({"model": scores}, normalise=cfg.eval.normalise_average)["model"].summary
    return {metric: float(value.mean) for metric, value in summary.items()}


def selection_curve(cfg: Config, rundir: RunDir, stage: str, steps: int, eval_every: int,
                    history: list[dict]) -> list[dict[str, Any]]:
    """The stage's curve: for every scored step that has a checkpoint, its ``step``, the
    ``lr`` and training ``loss`` logged at that step (``history``), and each metric's mean on
    the selection prompts."""
    from spin_ray.eval.prompt_sets import load_prompts, selection_prompt_set

    prompts = load_prompts(selection_prompt_set(cfg.eval.selection_prompts), cfg.eval.max_prompts,
                           cfg.eval.max_prompt_file_bytes)
    logged = {int(row["step"]): row for row in history if "step" in row}
    points = []
    for step in scored_steps(steps, eval_every):
        if not rundir.is_done(rundir.stage_checkpoint(stage, step)):
            print(f"[{stage}] no checkpoint of step {step} to score (training resumed past it?); left out",
                  flush=True)
            continue
        row = logged.get(step, {})
        points.append({"step": step, "lr": row.get("lr"), "loss": row.get("loss"),
                       **score_checkpoint(cfg, rundir, stage, step, prompts)})
    return points


def select_and_publish(cfg: Config, rundir: RunDir, stage: str, selection: Selection, *, steps: int,
                       history: list[dict]) -> dict[str, Any]:
    """Score the stage's checkpoints, write its ``selection_curve.json`` and move the chosen
    checkpoint into place as the stage's model (unless an earlier run already did); returns
    the record (also the ``selection`` of the stage's metrics.json)."""
    from spin_ray.eval.prompt_sets import prompt_set_names, selection_prompt_set

    curve_rel, model_rel = rundir.stage_selection_curve(stage), rundir.stage_model(stage)
    if rundir.is_done(model_rel) and rundir.exists(curve_rel):  # died between publishing and DONE
        print(f"[{stage}] checkpoint already chosen and published by an earlier run; keeping it", flush=True)
        return rundir.read_json(curve_rel)
    points = selection_curve(cfg, rundir, stage, steps, selection.eval_every, history)
    step, reason = choose(points, selection.keep)
    prompt_set = selection_prompt_set(cfg.eval.selection_prompts)
    record = {"eval_every": selection.eval_every, "keep": selection.keep, "metric": SELECTION_METRIC,
              "prompt_set": prompt_set_names([prompt_set])[0], "scorers": list(cfg.eval.scorers), "steps": steps,
              "published_step": step, "reason": reason, "points": points}
    rundir.write_json_atomic(curve_rel, record)
    if rundir.is_done(model_rel):
        print(f"[{stage}] model already published at {rundir.path(model_rel)} by an earlier run; keeping it",
              flush=True)
    else:
        rundir.remove_incomplete(model_rel)
        rundir.move(rundir.stage_checkpoint(stage, step), model_rel)
    print(f"[{stage}] published the checkpoint of step {step}: {reason}", flush=True)
    return record


def remove_checkpoints(rundir: RunDir, stage: str) -> None:
    """Delete a finished stage's scored checkpoints (its model is the chosen one, moved out)."""
    rel = rundir.stage_checkpoints(stage)
    if rundir.exists(rel):
        rundir.remove(rel)
