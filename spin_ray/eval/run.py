"""Evaluation at scale: N images per prompt from every model, every scorer, one report per prompt set.

The paper's protocol (SPIN-Diffusion, Yuan et al. 2024, Sec. 5): each model generates
``eval.num_images_per_prompt`` images per prompt from the same seeds, every scorer scores
every image (:mod:`spin_ray.eval.scoring`), best-of-N picks one image per prompt, and the
table reports mean and median per scorer plus win rates against a baseline model
(:mod:`spin_ray.eval.report`, arithmetic in :mod:`spin_ray.eval.metrics`).

Two entry points: :func:`run_evaluation` for ``jobs/evaluate.py`` (``eval.models``) and
:func:`evaluate_models` after self-play or a sweep (the run's own models). Layout in the run
directory (:class:`~spin_ray.run_layout.RunLayout`; one prompt set: no ``<set>/`` level)::

    eval/[<set>/]<model>/     scores.parquet + DONE (spin_ray.eval.score_cache: reused while valid)
    report/[<set>/]           metrics.json, report.md, metrics.png, image_grid.png,
                              <metric>_over_iterations.png (self-play models),
                              training_curves.png (stages trained in this run dir)
"""

from __future__ import annotations

from collections.abc import Mapping

from spin_ray.config import Config, dump_config
from spin_ray.eval import score_cache  # score_cache.model_scores, looked up at call time (tests replace it)
from spin_ray.eval.checks import check_eval_config, check_models, published_location, resolve_model
from spin_ray.eval.prompt_sets import load_prompts, prompt_set_names, prompt_set_paths
from spin_ray.eval.report import SummaryTable, write_prompt_set_report
from spin_ray.rundir import RunDir


def evaluate_models(cfg: Config, rundir: RunDir, models: Mapping[str, str]) -> dict[str, SummaryTable]:
    """Evaluate the models of a self-play run and write ``<run_dir>/report/``.

    Args:
        models: name -> model directory, in report order (``base``, ``sft``, ``iter_1``, ...).

    Returns:
        prompt set name -> model -> metric -> Summary (the best-of-N table).
    """
    return _evaluate(cfg, rundir, {name: published_location(rundir, name, path) for name, path in models.items()})


def run_evaluation(cfg: Config) -> dict[str, SummaryTable]:
    """``jobs/evaluate.py``: evaluate ``eval.models`` on ``eval.prompts`` into ``cfg.run_dir``.

    Returns prompt set name -> model -> metric -> Summary; the reports are in
    ``<run_dir>/report/`` (one prompt set) or ``<run_dir>/report/<set>/`` (several).
    """
    from spin_ray.ray_session import ensure_ray

    check_models(cfg.eval.models)
    check_eval_config(cfg.eval)
    models = {name: resolve_model(name, location) for name, location in cfg.eval.models.items()}
    rundir = RunDir(cfg.run_dir)
    rundir.write_run_config(dump_config(cfg))
    ensure_ray(cfg.cluster.address)
    return _evaluate(cfg, rundir, models)


def _evaluate(cfg: Config, rundir: RunDir, models: dict[str, str]) -> dict[str, SummaryTable]:
    check_models(models)
    check_eval_config(cfg.eval)
    paths = prompt_set_paths(cfg.eval.prompts)
    nested = len(paths) > 1
    results = {}
    for name, path in zip(prompt_set_names(paths), paths, strict=True):
        prompts = load_prompts(path, cfg.eval.max_prompts, cfg.eval.max_prompt_file_bytes)
        prompt_set = name if nested else None
        tables = {model: score_cache.model_scores(cfg, rundir, rundir.eval(model, prompt_set), location, prompts)
                  for model, location in models.items()}
        results[name] = write_prompt_set_report(cfg.eval, rundir, rundir.report(prompt_set), path, prompts, tables,
                                                models, cfg.model.resolution)
    return results
