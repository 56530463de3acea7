"""Evaluation: generate N images per prompt from each model, score them, report best-of-N.

One reason to change per module:

- :mod:`~spin_ray.eval.metrics`: the protocol's arithmetic (best-of-N, averages, bootstrap, win rates);
- :mod:`~spin_ray.eval.prompt_sets`: the prompt sets (``eval.prompts``) and their names;
- :mod:`~spin_ray.eval.rows`: the pipeline's rows (columns, seeds) and reading scores back;
- :mod:`~spin_ray.eval.scoring`: the Ray Data generate-and-score pipeline and its actors;
- :mod:`~spin_ray.eval.score_cache`: stored scores, reused while their fingerprint matches;
- :mod:`~spin_ray.eval.checks`: config and model checks, where the actors find a model;
- :mod:`~spin_ray.eval.report`: scored rows -> a prompt set's report in the run dir;
- :mod:`~spin_ray.eval.figures`: which figures a report gets, and their data;
- :mod:`~spin_ray.eval.report_files`, :mod:`~spin_ray.eval.image_grid`, :mod:`~spin_ray.eval.plots`:
  metrics.json and report.md, the image grid, the matplotlib figures;
- :mod:`~spin_ray.eval.run`: the orchestration (:func:`run_evaluation`, :func:`evaluate_models`).

Importing the package loads neither torch, diffusers nor matplotlib (every actor process
imports it); the modules that need them import them where they are used.
"""

from spin_ray.eval.checks import check_eval_config, check_models, resolve_model
from spin_ray.eval.metrics import AVERAGE, Summary, WinRate
from spin_ray.eval.prompt_sets import PromptSetError, load_prompts, prompt_set_names, prompt_set_paths
from spin_ray.eval.report import SummaryTable
from spin_ray.eval.rows import gather_scores, image_seed, prompt_rows
from spin_ray.eval.run import evaluate_models, run_evaluation
from spin_ray.eval.score_cache import model_scores, scores_fingerprint

__all__ = [
    "AVERAGE", "PromptSetError", "Summary", "SummaryTable", "WinRate", "check_eval_config", "check_models",
    "evaluate_models", "gather_scores", "image_seed", "load_prompts", "model_scores", "prompt_rows",
    "prompt_set_names", "prompt_set_paths", "resolve_model", "run_evaluation", "scores_fingerprint",
]
