"""Ray Tune sweeps over self-play hyperparameters: per-iteration search and population-based self-play.

A sweep is a normal config plus a top-level ``sweep:`` section (:class:`SweepConfig`). Its
``space`` is written with the same dotted keys as command-line overrides::

    sweep:
      mode: grid                        # or pbt
      metric: toy                       # a scorer of spin_ray.rewards, or "average"
      space:
        loss.beta: {grid: [2000, 5000]}
        train.lr: {loguniform: [1.0e-6, 1.0e-4]}
        train.steps: {choice: [50, 200, 500]}

``mode: grid`` (per-iteration search). For each self-play iteration k, every trial trains
theta_k from the same theta_{k-1} with its own hyperparameters (grid points x
``num_samples`` draws of the random keys), all reading one shared, once-generated set of
theta_{k-1}'s opponents. Each trial is scored on held-out prompts (never by its training
loss, which is not comparable across beta); the best trial's model is published as
``iter_<k>/model`` and is the opponent and starting point of iteration k+1.

``mode: pbt`` (population-based self-play). Each trial runs the whole self-play loop and
reports the held-out score after every iteration with a checkpoint (a pointer to its
model). Ray Tune's ``PopulationBasedTraining`` (synchronous) replaces the worst trials by
clones of the best: a clone continues from the winner's model, which becomes its next
opponent, with perturbed hyperparameters. The final winner's lineage is published as
``iter_1/model`` ... ``iter_K/model``.

Each trial is a Ray Tune function trainable that builds and fits its own ``TorchTrainer``
(through :func:`spin_ray.stages.run_stage`, the Ray Train V2 pattern). Layout::

    <run_dir>/sweep/sweep.json                 the search (to refuse resuming another one)
    <run_dir>/sweep/iter_<k>/opponent.json     theta_{k-1} that the trials played against
    <run_dir>/sweep/iter_<k>/opponents/        its opponents, generated once for all trials
    <run_dir>/sweep/iter_<k>/trial_<id>/       one trial: model/, train/, eval/, metrics.json, score.json
    <run_dir>/sweep/iter_<k>/tune/             Ray Tune's experiment state (grid mode)
    <run_dir>/sweep/iter_<k>/trials.md         table of trials: hyperparameters, score, winner
    <run_dir>/sweep/iter_<k>/beta_vs_metric.png
    <run_dir>/sweep/iter_<k>/winner.json
    <run_dir>/sweep/pbt/trial_<id>/iter_<k>/   pbt mode: one trial's iteration k (+ lineage.json)
    <run_dir>/sweep/pbt/tune/                  Ray Tune's experiment state (pbt mode)
    <run_dir>/iter_<k>/model, metrics.json, config.yaml, DONE   the published theta_k, as jobs/self_play.py writes it

Rerunning the same sweep with ``--resume`` (``run_sweep(..., resume=True)``) resumes it:
published iterations are skipped, Ray Tune restores an unfinished experiment
(``Tuner.restore(..., resume_errored=True)``), finished trials keep their results and
unfinished ones resume from their Ray Train checkpoints. Restoring unpickles Tune's state from
the run directory, so it is opt-in (:mod:`spin_ray.sweep_resume`, docs/SECURITY.md); without
``--resume`` a run directory that holds a sweep is refused. A failed trial does not stop the
sweep; it is listed with its error and never wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_ray.config import (
    Config,
    dump_config,
    per_iteration,
    with_overrides,
)
from spin_ray.rundir import RunDir, iteration_number
from spin_ray.stages import (
    Prepared,
    ensure_prepared,
    generate_opponents,
    resolve_base_model,
    run_sft_baseline,
    run_stage,
    samples_per_iteration,
)
from spin_ray.sweep_config import (
    AVERAGE_METRIC,
    SAMPLE_KEYS,
    Dimension,
    SweepConfig,
    SweepError,
    dump_sweep_config,
    head_node_resource,
    load_sweep,
    trial_resources,
)
from spin_ray.sweep_resume import SWEEP_DIR, claim_run_dir, may_restore

PBT_DIR = f"{SWEEP_DIR}/pbt"
TUNE_NAME = "tune"
SCORE_FILE = "score.json"
LINEAGE_FILE = "lineage.json"
POINTER_FILE = "model.json"
TRIALS_TABLE = "trials.md"
BETA_PLOT = "beta_vs_metric.png"
WINNER_FILE = "winner.json"
BASE = "base"
"""Opponent name of iteration 1: theta_0, the base model."""
ITERATION_KEY = "self_play_iteration"
"""Reported with every result; PBT's time attribute."""


# ----------------------------------------------------------------------------- trials and winners


@dataclass(frozen=True)
class TrialRow:
    """One trial's result in one self-play iteration."""

    trial_id: str
    params: dict[str, Any]
    """The searched keys' values (dotted key -> value)."""
    score: float | None
    """Held-out ``sweep.metric``; None when the trial failed before scoring."""
    error: str | None = None
    model: str | None = None
    """Run-dir-relative directory of the trained model."""
    opponent: str | None = None
    """Run-dir-relative model directory of the opponent (``base`` for theta_0)."""
    beta: float | None = None
    """The beta this trial trained with (searched or from the config)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None and math.isfinite(self.score)


def select_winner(rows: Sequence[TrialRow]) -> TrialRow:
    """The trial with the highest score; failed trials never win; a tie goes to the first row."""
    valid = [row for row in rows if row.ok]
    if not valid:
        errors = "; ".join(f"trial {row.trial_id}: {row.error or 'no score'}" for row in rows) or "no trials ran"
        raise SweepError(f"no trial finished with a score ({errors})")
    return max(valid, key=lambda row: row.score)


def lineage_chain(rows_by_iteration: Mapping[int, Sequence[TrialRow]], final: TrialRow, iterations: int
                  ) -> dict[int, TrialRow]:
    """The models the final winner descends from: iteration k -> the row whose model was the
    opponent (and starting point) of iteration k+1's member, back to iteration 1."""
    chain = {iterations: final}
    for k in range(iterations, 1, -1):
        parent = next((row for row in rows_by_iteration.get(k - 1, []) if row.model == chain[k].opponent), None)
        if parent is None:
            raise SweepError(f"iteration {k}: the opponent {chain[k].opponent!r} of trial {chain[k].trial_id} "
                             f"is not among iteration {k - 1}'s scored models")
        chain[k - 1] = parent
    return dict(sorted(chain.items()))


def trials_markdown(rows: Sequence[TrialRow], winner: TrialRow, metric: str, iteration: int,
                    published: TrialRow | None = None) -> str:
    """The per-iteration table: one row per trial with its hyperparameters, score and status.

    ``published`` (pbt: the final winner's lineage) is marked when it is not the best trial.
    """
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    header = ["trial", *keys, "beta", metric, "status"]
    lines = [f"# Iteration {iteration}: {len(rows)} trials, ranked by held-out {metric}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = "failed: " + (row.error or "no score") if not row.ok else ""
        if row.trial_id == winner.trial_id:
            status = "**winner**"
        if published is not None and row.trial_id == published.trial_id and published.trial_id != winner.trial_id:
            status = (status + " published").strip()
        cells = [row.trial_id, *(_fmt(row.params.get(key)) for key in keys), _fmt(row.beta),
                 _fmt(row.score) if row.score is not None else "-", status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = published or winner
    lines += ["", f"Winner: trial {winner.trial_id}, {metric} = {_fmt(winner.score)}.",
              f"Published as iter_{iteration}/model: trial {chosen.trial_id} ({chosen.model})."]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def plot_beta_vs_metric(rows: Sequence[TrialRow], winner: TrialRow, metric: str, iteration: int,
                        out_path: str | Path) -> Path:
    """Scatter plot of each scored trial's ``metric`` against its beta; the winner is starred."""
    from matplotlib.figure import Figure

    scored = [row for row in rows if row.ok and row.beta is not None]
    figure = Figure(figsize=(5.0, 3.5), dpi=100, layout="constrained")
    axis = figure.subplots()
    axis.scatter([row.beta for row in scored], [row.score for row in scored], label="trials")
    if winner.beta is not None:
        axis.scatter([winner.beta], [winner.score], marker="*", s=200, color="tab:red", label="winner")
    betas = [row.beta for row in scored if row.beta > 0]
    if betas and max(betas) / min(betas) >= 10:
        axis.set_xscale("log")
    axis.set_xlabel("beta")
    axis.set_ylabel(f"held-out {metric}")
    axis.set_title(f"iteration {iteration}: {metric} vs beta")
    axis.legend(fontsize=8)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def rows_from_results(results: Iterable[Any], metric: str) -> list[TrialRow]:
    """TrialRows from Ray Tune results (``ResultGrid`` items: ``path``, ``config``, ``metrics``,
    ``error``), sorted by trial id; a failed trial keeps the last line of its error (the exception)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        error = None
        if result.error is not None:
            error = (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1]
        score = metrics.get(metric) if error is None else None
        rows.append(TrialRow(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")),
            params=_plain(dict(result.config or {})), score=None if score is None else float(score), error=error,
            model=metrics.get("model"), opponent=metrics.get("opponent"), beta=metrics.get("beta"),
        ))
    return sorted(rows, key=lambda row: row.trial_id)


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """Tune may hand numpy scalars; the config and JSON want Python numbers."""
    return {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}


def max_samples(cfg: Config, space: Mapping[str, Dimension], iteration: int) -> int:
    """The most samples any trial of ``iteration`` trains on: the shared opponents cover it,
    and a trial that needs fewer reads a prefix (the sample table is the same prefix-wise)."""
    keys = [key for key in SAMPLE_KEYS if key in space]
    combos = itertools.product(*(space[key].values for key in keys))
    return max(samples_per_iteration(with_overrides(cfg, dict(zip(keys, combo, strict=True))), iteration)
               for combo in combos)


# ----------------------------------------------------------------------------- scoring


def score_model(cfg: Config, rundir: RunDir, eval_rel: str, model_rel: str, metric: str) -> float:
    """Held-out score of one model (higher is better).

    ``eval.num_images_per_prompt`` images for each prompt of the first ``eval.prompts`` set
    (at most ``eval.max_prompts``), from fixed seeds (``eval.seed``), ``eval.num_inference_steps``
    DDIM steps and ``eval.guidance_scale``; best-of-N per prompt, then the mean of ``metric``
    over prompts (the paper's protocol, :mod:`spin_ray.evaluation`). The Ray Data pipeline of
    :mod:`spin_ray.eval_run` generates and scores (on ``eval.gpus_per_actor`` GPUs); the scores
    are cached in ``eval_rel``.
    """
    from spin_ray import eval_report, eval_run, evaluation
    from spin_ray.prompts import load_prompts

    scorers = list(cfg.eval.scorers) if metric == AVERAGE_METRIC else [metric]
    scoring_cfg = with_overrides(cfg, {"eval.scorers": scorers})
    prompts = load_prompts(eval_run.prompt_set_paths(cfg.eval.prompts)[0], cfg.eval.max_prompts,
                           cfg.eval.max_prompt_file_bytes)
    table = eval_run.model_scores(scoring_cfg, rundir, eval_rel, rundir.path(model_rel), prompts)
    scores = eval_report.gather_scores(table.to_pydict(), scorers, len(prompts), cfg.eval.num_images_per_prompt)
    result = evaluation.evaluate_models({"model": scores}, normalise=cfg.eval.normalise_average)["model"]
    return float(result.summary[evaluation.AVERAGE if metric == AVERAGE_METRIC else metric].mean)


# ----------------------------------------------------------------------------- entry points


@dataclass
class SweepResult:
    """What a sweep produced: the published models and each iteration's winner."""

    run_dir: str
    models: dict[str, str] = field(default_factory=dict)
    """base, (sft,) iter_1, ..., iter_K -> local model directory."""
    winners: dict[int, TrialRow] = field(default_factory=dict)
    """Iteration -> the trial whose model became ``iter_<k>/model``."""


@dataclass(frozen=True)
class _Shared:
    """What every trial of a sweep needs; picklable (Ray Tune ships it with the trainable)."""

    cfg: Config
    sweep: SweepConfig
    rundir: RunDir
    base_model: str
    prepared: Prepared
    resume: bool = False
    """Restore an unfinished Tune experiment found in the run dir (``--resume``)."""


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
    shared = _Shared(cfg=cfg, sweep=sweep, rundir=rundir, base_model=base_model,
                     prepared=ensure_prepared(cfg, rundir, base_model), resume=resume)
    result = SweepResult(run_dir=cfg.run_dir, models={BASE: base_model})
    if cfg.self_play.sft_baseline:
        result.models["sft"] = run_sft_baseline(cfg, rundir, base_model=base_model, prepared=shared.prepared)
    if sweep.mode == "pbt":
        result.winners = _run_pbt(shared)
    else:
        for k in range(1, cfg.self_play.iterations + 1):
            result.winners[k] = _search_iteration(shared, k)
    for k in range(1, cfg.self_play.iterations + 1):
        result.models[f"iter_{k}"] = rundir.local_copy(f"iter_{k}/model")
    if cfg.eval.enabled:
        from spin_ray.eval_run import evaluate_models

        evaluate_models(cfg, rundir, result.models)
    return result


DEFAULT_SWEEP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep_beta.yaml"


def run_sweep_job(argv: Sequence[str] | None = None) -> int:
    """``python jobs/sweep.py [--config FILE] [--resume] [key=value ...]``; errors the user can
    fix are one line and exit code 2 (:func:`spin_ray.cli.guarded`)."""
    from spin_ray.cli import build_parser, guarded

    parser = build_parser(
        __doc__.splitlines()[0], extra_sections={"sweep": SweepConfig},
        config_help="a config with a sweep: section (default: configs/sweep_beta.yaml)",
        overrides_help="dotted keys of the config or of the sweep section, e.g. train.lr=1e-5 "
                       "sweep.max_concurrent_trials=2 'sweep.space.loss.beta={grid: [2000, 5000]}'")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep already in run_dir; Ray Tune unpickles its saved state, "
                             "so use it only for a run directory whose writers you trust")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return guarded(lambda: _sweep_main(args), debug=args.debug)


def _sweep_main(args: Any) -> int:
    cfg, sweep = load_sweep(args.config or DEFAULT_SWEEP_CONFIG, args.overrides)
    if args.print_config:
        print(dump_sweep_config(cfg, sweep), end="", flush=True)
        return 0
    result = run_sweep(cfg, sweep, resume=args.resume)
    for k, winner in sorted(result.winners.items()):
        print(f"iteration {k}: trial {winner.trial_id} won with {sweep.metric} = {_fmt(winner.score)} "
              f"({_fmt_params(winner.params)}) -> {result.models[f'iter_{k}']}", flush=True)
    return 0


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_fmt(value)}" for key, value in params.items())


def _absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: make local paths absolute."""
    changes = {}
    for key, value in {"run_dir": cfg.run_dir, "model.pretrained": cfg.model.pretrained,
                       "data.path": cfg.data.path}.items():
        if value and value != "toy" and "://" not in value and (key == "run_dir" or Path(value).expanduser().exists()):
            changes[key] = os.path.abspath(Path(value).expanduser())
    prompts = cfg.eval.prompts if isinstance(cfg.eval.prompts, list) else [cfg.eval.prompts]
    if any(p and Path(p).expanduser().exists() for p in prompts):
        absolute = [os.path.abspath(Path(p).expanduser()) if p and Path(p).expanduser().exists() else p
                    for p in prompts]
        changes["eval.prompts"] = absolute if isinstance(cfg.eval.prompts, list) else absolute[0]
    return with_overrides(cfg, changes) if changes else cfg


def _run_tuner(trainable: Any, shared: _Shared, *, storage_rel: str, param_space: dict[str, Any],
               scheduler: Any = None, stop: dict[str, Any] | None = None, **parameters: Any):
    """Fit a new Tune experiment in ``storage_rel/tune``, or restore and finish the one there.
    ``trainable`` is called with each trial's config, ``shared`` and ``parameters``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = shared.sweep
    trainable = tune.with_resources(tune.with_parameters(trainable, shared=shared, **parameters),
                                    trial_resources(sweep, head_node_resource()))
    storage_path = shared.rundir.path(storage_rel)
    experiment = f"{storage_path}/{TUNE_NAME}"
    if may_restore(experiment, resume=shared.resume):
        print(f"[sweep] resuming the Ray Tune experiment in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=sweep.seed),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=storage_path, stop=stop,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        )
    return tuner.fit()


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------- per-iteration search


def _search_iteration(shared: _Shared, k: int) -> TrialRow:
    """Iteration k: trials train theta_k from theta_{k-1} on shared opponents; publish the best."""
    rundir, sweep = shared.rundir, shared.sweep
    rel, sweep_rel = f"iter_{k}", f"{SWEEP_DIR}/iter_{k}"
    if rundir.is_done(rel) and rundir.last_done_iteration() >= k:
        return _published_row(rundir, k)
    opponent_rel = BASE if k == 1 else f"iter_{k - 1}/model"
    _set_aside_if_stale(rundir, k, _opponent_identity(rundir, opponent_rel))
    opponents_rel = f"{sweep_rel}/opponents"
    _ensure_shared_opponents(shared, opponents_rel, opponent_rel, k)
    results = _run_tuner(_grid_trial, shared, storage_rel=sweep_rel,
                         param_space={key: dim.to_tune() for key, dim in sweep.space.items()}, iteration=k)
    # A failed trial reported nothing: its beta comes from its hyperparameters.
    rows = [row if row.beta is not None else dataclasses.replace(row, beta=_trial_beta(shared.cfg, row.params, k))
            for row in rows_from_results(results, sweep.metric)]
    winner = select_winner(rows)
    _write_iteration_report(rundir, k, rows, winner, winner, sweep.metric)
    _publish(shared, k, winner)
    print(f"[sweep] iteration {k}: trial {winner.trial_id} wins with {sweep.metric} = {winner.score:.6g} "
          f"({_fmt_params(winner.params)})", flush=True)
    return winner


def _published_row(rundir: RunDir, k: int) -> TrialRow:
    """The winner of an already published iteration (one published by jobs/self_play.py has no sweep record)."""
    winner_rel = f"{SWEEP_DIR}/iter_{k}/{WINNER_FILE}"
    if rundir.exists(winner_rel):
        return _row_from_json(rundir.read_json(winner_rel))
    return TrialRow(trial_id="self_play", params={}, score=None, model=f"iter_{k}/model")


def _opponent_identity(rundir: RunDir, opponent_rel: str) -> dict[str, Any]:
    """Which theta_{k-1} an iteration plays against; a republished model gets a new publish id."""
    if opponent_rel == BASE:
        return {"opponent": BASE}
    return {"opponent": opponent_rel, "publish_id": rundir.read_done(opponent_rel).get("publish_id")}


def _set_aside_if_stale(rundir: RunDir, k: int, identity: dict[str, Any]) -> None:
    """Trials of iteration k that played against another theta_{k-1} (an earlier iteration was
    redone) are moved aside, never deleted; the same for a stale published iter_k."""
    stamp = int(time.time())
    sweep_rel = f"{SWEEP_DIR}/iter_{k}"
    marker = f"{sweep_rel}/opponent.json"
    if rundir.exists(sweep_rel) and (not rundir.exists(marker) or rundir.read_json(marker) != identity):
        rundir.fs.mv(rundir.fs_path(sweep_rel), rundir.fs_path(f"{sweep_rel}.stale-{stamp}"), recursive=True)
    if rundir.is_done(f"iter_{k}"):
        rundir.fs.mv(rundir.fs_path(f"iter_{k}"), rundir.fs_path(f"iter_{k}.stale-{stamp}"), recursive=True)
    if not rundir.exists(marker):
        rundir.write_json_atomic(marker, identity)


def _ensure_shared_opponents(shared: _Shared, opponents_rel: str, opponent_rel: str, k: int) -> None:
    """Generate theta_{k-1}'s opponents once, for the trial that trains on the most samples."""
    rundir = shared.rundir
    if rundir.is_done(opponents_rel):
        return
    n_samples = max_samples(shared.cfg, shared.sweep.space, k)
    started = time.time()
    generate_opponents(shared.cfg, rundir, opponents_rel, model_path=_model_path(shared, opponent_rel),
                       prepared=shared.prepared, iteration=k, n_samples=n_samples)
    rundir.mark_done(opponents_rel, {"n_samples": n_samples, "opponent": opponent_rel,
                                     "seconds": time.time() - started})
    print(f"[sweep] iteration {k}: generated {n_samples} opponents of {opponent_rel} for all trials "
          f"in {time.time() - started:.1f}s", flush=True)


def _model_path(shared: _Shared, model_rel: str) -> str:
    return shared.base_model if model_rel == BASE else shared.rundir.local_copy(model_rel)


def _grid_trial(config: dict[str, Any], shared: _Shared, iteration: int) -> None:
    """Ray Tune trainable: train theta_k (k = ``iteration``) with this trial's hyperparameters, score it, report."""
    from ray import tune

    _quiet_data_progress()
    k, params = iteration, _plain(config)
    trial_id = tune.get_context().get_trial_id()
    rel = f"{SWEEP_DIR}/iter_{k}/trial_{trial_id}"
    opponent_rel = BASE if k == 1 else f"iter_{k - 1}/model"
    cfg = with_overrides(shared.cfg, params)
    # Every pair is already in the shared opponents folder, but the pipeline still starts its
    # generator pool: one CPU actor instead of generation.num_actors GPUs that would idle.
    idle_generator = {"generation.num_actors": 1, "generation.gpus_per_actor": 0.0}
    run_stage(with_overrides(cfg, idle_generator), shared.rundir, rel, model_path=_model_path(shared, opponent_rel),
              base_model=shared.base_model, prepared=shared.prepared, iteration=k, loss_type=cfg.loss.type,
              opponents_rel=f"{SWEEP_DIR}/iter_{k}/opponents")
    row = _score_and_record(cfg, shared, rel, trial_id, params, opponent_rel, k)
    tune.report(_report_metrics(row, shared.sweep.metric, k))


def _score_and_record(cfg: Config, shared: _Shared, rel: str, trial_id: str, params: dict[str, Any],
                      opponent_rel: str, k: int) -> TrialRow:
    """Score the model trained in ``rel`` (cached in ``rel/eval``) and record it in ``rel/score.json``."""
    score = score_model(cfg, shared.rundir, f"{rel}/eval", f"{rel}/model", shared.sweep.metric)
    row = TrialRow(trial_id=trial_id, params=params, score=score, model=f"{rel}/model", opponent=opponent_rel,
                   beta=float(per_iteration(cfg.loss.beta, k)))
    shared.rundir.write_json_atomic(f"{rel}/{SCORE_FILE}", {**_row_json(row), "metric": shared.sweep.metric,
                                                            "iteration": k})
    return row


def _trial_beta(cfg: Config, params: Mapping[str, Any], k: int) -> float:
    """The beta a trial with hyperparameters ``params`` trains iteration k with."""
    return float(per_iteration(with_overrides(cfg, dict(params)).loss.beta, k))


def _quiet_data_progress() -> None:
    """No Ray Data progress bars from a trial: those of concurrent trials would interleave in
    the driver's log (Tune's status table shows the sweep's progress)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _report_metrics(row: TrialRow, metric: str, k: int) -> dict[str, Any]:
    return {metric: row.score, ITERATION_KEY: k, "model": row.model, "opponent": row.opponent, "beta": row.beta}


def _row_json(row: TrialRow) -> dict[str, Any]:
    return dataclasses.asdict(row)


def _row_from_json(values: Mapping[str, Any]) -> TrialRow:
    names = {f.name for f in dataclasses.fields(TrialRow)}
    return TrialRow(**{key: value for key, value in values.items() if key in names})


# ----------------------------------------------------------------------------- reports and publishing


def _write_iteration_report(rundir: RunDir, k: int, rows: Sequence[TrialRow], best: TrialRow,
                            published: TrialRow, metric: str) -> None:
    sweep_rel = f"{SWEEP_DIR}/iter_{k}"
    with tempfile.TemporaryDirectory() as tmp:
        table = trials_markdown(rows, best, metric, k, published=published)
        plot = plot_beta_vs_metric(rows, best, metric, k, Path(tmp) / BETA_PLOT)
        rundir.write_text_atomic(f"{sweep_rel}/{TRIALS_TABLE}", table)
        rundir.upload_file(plot, f"{sweep_rel}/{BETA_PLOT}")
    rundir.write_json_atomic(f"{sweep_rel}/{WINNER_FILE}", {
        **_row_json(published), "iteration": k, "metric": metric, "published": f"iter_{k}/model",
        "best_trial": best.trial_id, "best_score": best.score,
        "trials": [_row_json(row) for row in rows],
    })


def _publish(shared: _Shared, k: int, winner: TrialRow) -> None:
    """The winner's model becomes ``iter_<k>/model`` (with its metrics and config), then DONE."""
    rundir, rel = shared.rundir, f"iter_{k}"
    stage_rel = winner.model.rsplit("/", 1)[0]
    if rundir.is_done(rel):
        if rundir.read_done(rel).get("source") == winner.model:
            return
        rundir.fs.mv(rundir.fs_path(rel), rundir.fs_path(f"{rel}.stale-{int(time.time())}"), recursive=True)
    rundir.remove_incomplete(rel)
    rundir.publish_dir(rundir.local_copy(winner.model), f"{rel}/model", info={"source": winner.model})
    metrics = rundir.read_json(f"{stage_rel}/metrics.json")
    metrics["sweep"] = {"trial": winner.trial_id, "params": winner.params, "score": winner.score,
                        "metric": shared.sweep.metric, "source": winner.model}
    rundir.write_json_atomic(f"{rel}/metrics.json", metrics)
    rundir.write_text_atomic(f"{rel}/config.yaml", dump_config(with_overrides(shared.cfg, winner.params)))
    rundir.mark_done(rel, {"source": winner.model, "trial": winner.trial_id, "score": winner.score})


# ----------------------------------------------------------------------------- population-based self-play


def _run_pbt(shared: _Shared) -> dict[int, TrialRow]:
    """Every trial runs the self-play loop; PBT clones the best; the final winner's lineage is published."""
    from ray.tune.schedulers import PopulationBasedTraining

    cfg, rundir, sweep = shared.cfg, shared.rundir, shared.sweep
    iterations = cfg.self_play.iterations
    if not rundir.is_done(PBT_DIR):
        _ensure_shared_opponents(shared, _pbt_first_opponents(), BASE, 1)
        scheduler = PopulationBasedTraining(
            time_attr=ITERATION_KEY, metric=sweep.metric, mode="max",
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations={key: dim.to_mutation() for key, dim in sweep.space.items()},
            quantile_fraction=sweep.quantile_fraction, resample_probability=sweep.resample_probability,
            synch=True,
        )
        # PBT draws whom to clone and how to perturb from Python's global random module.
        random.seed(sweep.seed)
        _run_tuner(_pbt_trial, shared, storage_rel=PBT_DIR, scheduler=scheduler,
                   param_space={key: dim.to_tune() for key, dim in sweep.space.items()},
                   stop={ITERATION_KEY: iterations})
    rows_by_iteration = pbt_rows(rundir)
    missing = [k for k in range(1, iterations + 1) if not rows_by_iteration.get(k)]
    if missing:
        raise SweepError(f"pbt: no trial finished iterations {missing}; see {rundir.path(PBT_DIR)}")
    best = {k: select_winner(rows_by_iteration[k]) for k in range(1, iterations + 1)}
    chain = lineage_chain(rows_by_iteration, best[iterations], iterations)
    for k in range(1, iterations + 1):
        _write_iteration_report(rundir, k, rows_by_iteration[k], best[k], chain[k], sweep.metric)
        _publish(shared, k, chain[k])
    rundir.mark_done(PBT_DIR, {"winner": chain[iterations].trial_id, "score": chain[iterations].score})
    return chain


def _pbt_first_opponents() -> str:
    return f"{PBT_DIR}/opponents_iter_1"


def pbt_rows(rundir: RunDir) -> dict[int, list[TrialRow]]:
    """Iteration -> the scored stages of every PBT trial (``sweep/pbt/trial_*/iter_<k>/score.json``)."""
    rows: dict[int, list[TrialRow]] = {}
    pattern = rundir.fs_path(PBT_DIR) + "/trial_*/iter_*/" + SCORE_FILE
    rundir.fs.invalidate_cache(rundir.fs_path(PBT_DIR))
    for path in sorted(rundir.fs.glob(pattern)):
        k = iteration_number(path.rstrip("/").split("/")[-2])
        if k is not None:
            values = json.loads(rundir.fs.cat_file(path))
            rows.setdefault(k, []).append(_row_from_json(values))
    return {k: sorted(found, key=lambda row: row.trial_id) for k, found in sorted(rows.items())}


def _pbt_trial(config: dict[str, Any], shared: _Shared) -> None:
    """Ray Tune trainable: self-play from the last checkpoint (its own, or a clone's) to the end,
    reporting the held-out score and a pointer to the model after every iteration."""
    from ray import tune

    _quiet_data_progress()
    params = _plain(config)
    trial_id = tune.get_context().get_trial_id()
    cfg = with_overrides(shared.cfg, params)
    done, opponent_rel = _restore_pointer(tune.get_checkpoint())
    for k in range(done + 1, cfg.self_play.iterations + 1):
        rel = f"{PBT_DIR}/trial_{trial_id}/iter_{k}"
        _claim_stage(shared.rundir, rel, {"opponent": opponent_rel, "params": params})
        run_stage(cfg, shared.rundir, rel, model_path=_model_path(shared, opponent_rel),
                  base_model=shared.base_model, prepared=shared.prepared, iteration=k, loss_type=cfg.loss.type,
                  opponents_rel=_pbt_first_opponents() if k == 1 else None)
        row = _score_and_record(cfg, shared, rel, trial_id, params, opponent_rel, k)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / POINTER_FILE).write_text(json.dumps({"iteration": k, "model": row.model,
                                                              "trial": trial_id}))
            tune.report(_report_metrics(row, shared.sweep.metric, k), checkpoint=tune.Checkpoint.from_directory(tmp))
        opponent_rel = row.model


def _restore_pointer(checkpoint: Any) -> tuple[int, str]:
    """(last finished iteration, its model) from a PBT checkpoint; (0, base) without one. After an
    exploit the checkpoint is the cloned trial's: its model is the next opponent and start."""
    if checkpoint is None:
        return 0, BASE
    with checkpoint.as_directory() as path:
        pointer = json.loads((Path(path) / POINTER_FILE).read_text())
    return int(pointer["iteration"]), str(pointer["model"])


def _claim_stage(rundir: RunDir, rel: str, lineage: dict[str, Any]) -> None:
    """A trial's stage dir belongs to one (opponent, hyperparameters); after an exploit the
    trial's older attempt at this iteration is moved aside, never mixed with the new one."""
    lineage = json.loads(json.dumps(lineage))
    marker = f"{rel}/{LINEAGE_FILE}"
    if rundir.exists(rel):
        if rundir.exists(marker) and rundir.read_json(marker) == lineage:
            return
        rundir.fs.mv(rundir.fs_path(rel), rundir.fs_path(f"{rel}.stale-{int(time.time())}"), recursive=True)
    rundir.write_json_atomic(marker, lineage)
