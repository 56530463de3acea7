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

``mode: grid`` (per-iteration search, :mod:`~spin_ray.sweep.grid`). For each self-play
iteration k, every trial trains theta_k from the same theta_{k-1} with its own hyperparameters
(grid points x ``num_samples`` draws of the random keys), all reading one shared,
once-generated set of theta_{k-1}'s opponents. Each trial is scored on held-out prompts (never
by its training loss, which is not comparable across beta); the best trial's model is
published as ``iter_<k>/model`` and is the opponent and starting point of iteration k+1.

``mode: pbt`` (population-based self-play, :mod:`~spin_ray.sweep.pbt`). Each trial runs the
whole self-play loop and reports the held-out score after every iteration with a checkpoint
(a pointer to its model). Ray Tune's ``PopulationBasedTraining`` (synchronous) replaces the
worst trials by clones of the best: a clone continues from the winner's model, which becomes
its next opponent, with perturbed hyperparameters. The final winner's lineage is published as
``iter_1/model`` ... ``iter_K/model``.

Each trial is a Ray Tune function trainable that builds and fits its own ``TorchTrainer``
(through :func:`spin_ray.stages.run_stage`, the Ray Train V2 pattern). Layout (every place is
named by :mod:`spin_ray.run_layout`)::

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
the run directory, so it is opt-in (:mod:`spin_ray.sweep.resume`, docs/SECURITY.md); without
``--resume`` a run directory that holds a sweep is refused. A failed trial does not stop the
sweep; it is listed with its error and never wins.

Modules, one reason to change each: :mod:`~spin_ray.sweep.config` (the ``sweep:`` section),
:mod:`~spin_ray.sweep.trials` (trial records, scoring, the winner), :mod:`~spin_ray.sweep.summary`
(trials.md, the beta plot, winner.json), :mod:`~spin_ray.sweep.tuner` (driving Ray Tune),
:mod:`~spin_ray.sweep.context` (what the trials share), :mod:`~spin_ray.sweep.grid`,
:mod:`~spin_ray.sweep.pbt`, :mod:`~spin_ray.sweep.publish` (the winner as theta_k),
:mod:`~spin_ray.sweep.resume` (opt-in resume), :mod:`~spin_ray.sweep.run` (``run_sweep``) and
:mod:`~spin_ray.sweep.job` (the command line).
"""

from spin_ray.sweep.config import (
    AVERAGE_METRIC,
    Dimension,
    SweepConfig,
    SweepError,
    apply_sweep_overrides,
    dump_sweep_config,
    load_sweep,
    parse_sweep,
    split_overrides,
)
from spin_ray.sweep.job import run_sweep_job
from spin_ray.sweep.pbt import pbt_rows
from spin_ray.sweep.resume import claim_run_dir, may_restore
from spin_ray.sweep.run import SweepResult, run_sweep
from spin_ray.sweep.summary import plot_beta_vs_metric, trials_markdown
from spin_ray.sweep.trials import (
    TrialRow,
    lineage_chain,
    max_samples,
    rows_from_results,
    score_model,
    select_winner,
)
from spin_ray.sweep.tuner import trial_resources

__all__ = [
    "AVERAGE_METRIC",
    "Dimension",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "TrialRow",
    "apply_sweep_overrides",
    "claim_run_dir",
    "dump_sweep_config",
    "lineage_chain",
    "load_sweep",
    "max_samples",
    "may_restore",
    "parse_sweep",
    "pbt_rows",
    "plot_beta_vs_metric",
    "rows_from_results",
    "run_sweep",
    "run_sweep_job",
    "score_model",
    "select_winner",
    "split_overrides",
    "trial_resources",
    "trials_markdown",
]
