"""The self-play loop: prepare -> baselines -> (generate + train) per iteration -> evaluate -> DONE.

The baselines (``self_play.baselines``: ``sft``, ``dpo``) train from theta_0 before the first
iteration, each a stage ``baseline_<name>/`` (:func:`spin_ray.stages.run_baseline`).

Iteration k starts from theta_{k-1}'s weights and plays against theta_{k-1} (theta_0 is
``model.pretrained``), or against theta_0 with ``self_play.opponent: initial``; with
``self_play.opponent_history`` N > 1 it also trains on the cached opponents of the N-1
iterations before it (:func:`spin_ray.stages.opponent_history`). Every stage leaves its result in the run directory and a DONE
marker written last; rerunning the same command skips what is done, reuses cached
opponents of an unfinished iteration, and resumes its training from the last Ray Train
checkpoint (see :mod:`spin_ray.run_layout` for the layout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from spin_ray import stages
from spin_ray.cluster_capacity import check_cluster
from spin_ray.config import Config, baseline_names, dump_config
from spin_ray.model_card import refresh_model_cards
from spin_ray.rerun_check import RerunChoice, check_rerun, prepared_done_text, record_prepared_config
from spin_ray.rundir import RunDir
from spin_ray.tracking import Tracker, open_tracker


@dataclass
class RunResult:
    """What a finished run produced: model directories by name (base, sft, dpo, iter_1, ...)."""

    run_dir: str
    models: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def run(cfg: Config, rerun: RerunChoice | None = None) -> RunResult:
    """Run (or resume) the whole self-play schedule described by ``cfg``: the stages of
    :mod:`spin_ray.stages` in order, each skipped when an earlier run finished it.

    Before any work, the finished stages' configs are compared with ``cfg``
    (:func:`spin_ray.rerun_check.check_rerun`; ``rerun``: ``--restart-from`` and
    ``--accept-config-change``), the cluster is checked to hold an iteration
    (:mod:`spin_ray.cluster_capacity`), and a finished stage's files are checked against the
    checksums of its DONE before they are used (:mod:`spin_ray.integrity`). Metrics go to the
    trackers of ``tracking.backends`` (:mod:`spin_ray.tracking`)."""
    from spin_ray.ray_session import ensure_ray

    rundir = RunDir(cfg.run_dir)
    check_rerun(cfg, rundir, rerun or RerunChoice())
    rundir.write_run_config(dump_config(cfg))
    base_model = stages.resolve_base_model(cfg, rundir)  # before Ray starts: a wrong model path fails at once
    private = ensure_ray(cfg.cluster.address)
    checked = check_cluster(cfg, private=private)  # before any work: a too small cluster would hang
    if not private:
        print(f"cluster: {checked}", flush=True)
    tracker = open_tracker(cfg, rundir)
    try:
        result = _run_stages(cfg, rundir, base_model, tracker)
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()
    return result


def _run_stages(cfg: Config, rundir: RunDir, base_model: str, tracker: Tracker) -> RunResult:
    """Prepare, the baselines, the iterations and the evaluation, each logged to ``tracker``."""
    result = RunResult(run_dir=cfg.run_dir)
    result.models["base"] = base_model
    _say_if_toy_evaluation(cfg)
    done_before = prepared_done_text(rundir)
    prepared = stages.ensure_prepared(cfg, rundir, base_model)
    record_prepared_config(rundir, cfg, done_before)
    if rundir.is_done(rundir.PREPARED):
        rundir.verify(rundir.PREPARED)  # before any stage reads it; free when it was just written
    for name in baseline_names(cfg):  # self_play.baselines (and sft_baseline): sft, dpo, each from theta_0
        started = time.time()
        with tracker.stage(rundir.baseline(name)):
            result.models[name] = stages.run_baseline(cfg, rundir, name, base_model=base_model, prepared=prepared)
        result.timings[rundir.baseline(name)] = time.time() - started
    last_done = rundir.last_done_iteration()
    for k in range(1, cfg.self_play.iterations + 1):
        rel = rundir.iteration(k)
        if k <= last_done:
            result.models[rel] = rundir.path(rundir.model(k))
            _check_reused_model(cfg, rundir, rundir.model(k))
            stages.say_reused(rel, result.models[rel])
            tracker.log_stage(rel)  # keeps the global step where a run without the restart has it
            continue
        started = time.time()
        with tracker.stage(rel):
            result.models[rel] = _run_iteration(cfg, rundir, k, base_model, prepared)
        result.timings[rel] = time.time() - started
    if cfg.eval.enabled:
        from spin_ray.eval import evaluate_models

        evaluate_models(cfg, rundir, result.models)
        tracker.log_evaluation()
        refresh_model_cards(cfg, rundir, result.models)
    return result


def _run_iteration(cfg: Config, rundir: RunDir, k: int, base_model: str, prepared: stages.Prepared) -> str:
    """Iteration k: theta starts from theta_{k-1} and plays against it (or theta_0)."""
    rel = rundir.iteration(k)
    if rundir.is_done(rel):  # finished, but after an unfinished iteration: another opponent
        rundir.set_aside(rel, "is finished but an earlier iteration is not (it was trained against another "
                              "opponent)")
    previous = base_model if k == 1 else rundir.local_copy(rundir.model(k - 1))  # theta starts here
    opponent = base_model if cfg.self_play.opponent == "initial" else previous  # Fig. 5's fixed opponent
    return stages.run_stage(cfg, rundir, rel, model_path=opponent, base_model=base_model, prepared=prepared,
                            iteration=k, loss_type=cfg.loss.type, init_model=previous,
                            history=cfg.self_play.opponent_history)


def _check_reused_model(cfg: Config, rundir: RunDir, model_rel: str) -> None:
    """A reused model that the evaluation will load from the run directory is checked against
    its DONE's checksums first; one on an object store is checked when the evaluation downloads
    it (:meth:`RunDir.local_copy`), and the last one when the next iteration plays against it."""
    if cfg.eval.enabled and rundir.is_local and rundir.is_done(model_rel):
        rundir.verify(model_rel)


def _say_if_toy_evaluation(cfg: Config) -> None:
    """Your own data or model evaluated on the toy prompts (configs/default.yaml's ``eval``
    section, kept when only ``data.path`` or ``model.pretrained`` is overridden) measures
    nothing about them: say so before the training, not in the report hours later."""
    prompts = [cfg.eval.prompts] if isinstance(cfg.eval.prompts, str) else list(cfg.eval.prompts)
    if cfg.eval.enabled and "toy" in prompts and (cfg.data.path or cfg.model.pretrained != "toy"):
        print("note: the evaluation uses the toy world's prompts (eval.prompts=toy, "
              f"eval.scorers={list(cfg.eval.scorers)}), not prompts of your data; set eval.prompts and "
              "eval.scorers (README \"Your own data\") or eval.enabled=false", flush=True)
