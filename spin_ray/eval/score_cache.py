"""Stored scores: a model's scored rows are kept in the run dir and reused while still valid.

An evaluation directory (``eval/[<set>/]<model>/`` of :meth:`~spin_ray.run_layout.RunLayout.eval`,
or a sweep trial's) holds ``scores.parquet`` (one row per image; its PNG kept for the grid's
images) and DONE, written last, which records the fingerprint of what the scores depend on
(prompts, seeds, steps, guidance, resolution, scorers, model version). Scores whose DONE
records the same fingerprint are read back; otherwise they are computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.config import Config
from spin_ray.eval import scoring  # scoring.generate_and_score, looked up at call time (tests replace it)
from spin_ray.rundir import RunDir

log = logging.getLogger(__name__)


def scores_fingerprint(cfg: Config, model: str, prompts: Sequence[str]) -> dict[str, Any]:
    """Everything a model's stored scores depend on (JSON types only, compared after a JSON round trip)."""
    e = cfg.eval
    return {
        "model": model,
        "model_version": _model_version(model),
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest(),
        "num_prompts": len(prompts),
        "num_images_per_prompt": e.num_images_per_prompt,
        "seed": e.seed,
        "num_inference_steps": e.num_inference_steps,
        "guidance_scale": e.guidance_scale,
        "resolution": cfg.model.resolution,
        "scorers": list(e.scorers),
        "scorer_paths": {name: e.scorer_paths.get(name) for name in e.scorers},
        "scorer_options": {name: e.scorer_options.get(name, {}) for name in e.scorers},
    }


def _model_version(model: str) -> str | None:
    """The publish id in a model directory's DONE (a model retrained in place gets a new one)."""
    try:
        if "://" in model:
            parent, leaf = model.rstrip("/").rsplit("/", 1)
        else:
            local = Path(model).expanduser()
            parent, leaf = str(local.parent), local.name
        folder = RunDir(parent)
        return folder.read_done(leaf).get("publish_id") if folder.is_done(leaf) else None
    except (OSError, ValueError, AttributeError):
        return None


def model_scores(cfg: Config, rundir: RunDir, rel: str, model: str, prompts: Sequence[str]) -> pa.Table:
    """The scored rows of ``model`` on ``prompts``: from ``rel`` when its DONE matches
    :func:`scores_fingerprint`, else generated, stored in ``rel`` and marked done."""
    fingerprint = json.loads(json.dumps(scores_fingerprint(cfg, model, prompts)))
    stored = _stored_scores(rundir, rel, fingerprint)
    if stored is not None:
        return stored
    rundir.remove_incomplete(rel)
    started = time.time()
    # Said before the work: loading the model and the scorers takes a while on its own.
    print(f"[eval] {rel}: generating {len(prompts) * cfg.eval.num_images_per_prompt} images "
          f"({len(prompts)} prompts x {cfg.eval.num_images_per_prompt}) and scoring them with "
          f"{', '.join(cfg.eval.scorers)}", flush=True)
    table = scoring.generate_and_score(model, prompts, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / rundir.EVAL_SCORES_FILE
        pq.write_table(table, local)
        rundir.upload_file(local, rundir.eval_scores(rel))
    seconds = time.time() - started
    rundir.mark_done(rel, {"fingerprint": fingerprint, "num_rows": table.num_rows, "seconds": seconds})
    print(f"[eval] {rel}: {table.num_rows} images generated and scored in {seconds:.1f}s", flush=True)
    return table


def _stored_scores(rundir: RunDir, rel: str, fingerprint: dict[str, Any]) -> pa.Table | None:
    """The scores in ``rel`` if they are done with this ``fingerprint``; done with another one,
    they are removed (and None returned)."""
    if not rundir.is_done(rel):
        return None
    if rundir.read_done(rel).get("fingerprint") != fingerprint:
        log.warning("%s: stored scores were made with other settings or another model version; redoing them",
                    rundir.path(rel))
        rundir.remove(rel)
        return None
    from spin_ray.safe_parquet import read_table_checked  # refuses extension-typed columns

    scores = rundir.eval_scores(rel)
    with rundir.open_read(scores) as handle:
        table = read_table_checked(handle, where=rundir.path(scores))
    print(f"[eval] {rel}: stored scores reused ({table.num_rows} images; same settings and model version)",
          flush=True)
    return table
