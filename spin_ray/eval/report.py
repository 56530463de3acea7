"""A prompt set's report: scored rows in, the report folder of the run dir out.

:mod:`spin_ray.eval.scoring` generates and scores the images (one row per image); this
module turns those rows into what a reader looks at: the scorer -> (P, N) score arrays,
best-of-N summaries and win rates against the baseline (arithmetic in
:mod:`spin_ray.eval.metrics`), the figures (:mod:`spin_ray.eval.figures`) and the text files
(:mod:`spin_ray.eval.report_files`), built in a local folder and copied into the run dir.

It is kept apart from the pipeline so that the report can be rebuilt and tested from stored
scores without Ray, torch or a model: nothing here imports them (nor matplotlib, until a
report is written).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_ray.eval import metrics
from spin_ray.eval.figures import write_report_figures
from spin_ray.eval.metrics import ModelEvaluation, Summary
from spin_ray.eval.rows import gather_scores
from spin_ray.rundir import RunDir

if TYPE_CHECKING:
    import pyarrow as pa

    from spin_ray.config import EvalConfig

SummaryTable = dict[str, dict[str, Summary]]
"""model -> metric -> Summary."""


def choose_baseline(configured: str, model_names: Sequence[str]) -> str:
    """``eval.baseline`` when it is one of the models, else the first model."""
    return configured if configured in model_names else model_names[0]


def write_prompt_set_report(eval_cfg: EvalConfig, rundir: RunDir, report_rel: str, prompt_set: str,
                            prompts: Sequence[str], tables: Mapping[str, pa.Table], models: Mapping[str, str],
                            resolution: int) -> SummaryTable:
    """Best-of-N, summaries and win rates from the scored rows; write the report files to
    ``report_rel`` (built locally, then copied into the run dir). Returns model -> metric -> Summary."""
    from spin_ray.eval.report_files import REPORT_MARKDOWN, write_report  # matplotlib: only once writing

    columns = {model: table.to_pydict() for model, table in tables.items()}
    scores = {model: gather_scores(columns[model], eval_cfg.scorers, len(prompts), eval_cfg.num_images_per_prompt)
              for model in tables}
    evaluations = metrics.evaluate_models(scores, normalise=eval_cfg.normalise_average)
    summaries = {model: result.summary for model, result in evaluations.items()}
    baseline = choose_baseline(eval_cfg.baseline, list(tables))
    win_rates = metrics.win_rates_against(evaluations, baseline)
    metadata = _metadata(eval_cfg, prompt_set, len(prompts), models, evaluations, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        figures = write_report_figures(tmp, rundir, prompts, columns, summaries, eval_cfg.seed, resolution)
        write_report(tmp, summaries, win_rates or None, baseline, metadata, figures)
        for file in sorted(Path(tmp).iterdir()):
            rundir.upload_file(file, f"{report_rel}/{file.name}")
    print(f"[eval] report for {prompt_set} ({len(prompts)} prompts x {eval_cfg.num_images_per_prompt} images): "
          f"{rundir.path(report_rel, REPORT_MARKDOWN)}", flush=True)
    return summaries


def _metadata(eval_cfg: EvalConfig, prompt_set: str, num_prompts: int, models: Mapping[str, str],
              evaluations: Mapping[str, ModelEvaluation], resolution: int) -> dict[str, Any]:
    """metrics.json's ``metadata``: the settings the numbers come from, and each model's
    best-of-N choice per prompt."""
    return {
        "prompt_set": prompt_set, "num_prompts": num_prompts,
        "num_images_per_prompt": eval_cfg.num_images_per_prompt, "num_inference_steps": eval_cfg.num_inference_steps,
        "guidance_scale": eval_cfg.guidance_scale, "seed": eval_cfg.seed, "resolution": resolution,
        "scorers": list(eval_cfg.scorers), "normalise_average": eval_cfg.normalise_average,
        "models": dict(models),
        "best_indices": {model: result.best_indices.tolist() for model, result in evaluations.items()},
    }
