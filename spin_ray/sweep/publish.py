"""A sweep's winner becomes theta_k: its model, metrics and config published as iteration k.

The published ``iter_<k>`` is laid out as ``jobs/self_play.py`` writes it (model, metrics.json,
config.yaml, DONE), so the evaluation, the report and a later self-play run read it the same
way; its metrics carry the winning trial under ``sweep``.
"""

from __future__ import annotations

from spin_ray.config import dump_config, with_overrides
from spin_ray.hub_upload import upload_stage_model
from spin_ray.model_card import publish_model_card
from spin_ray.sweep.context import SweepContext
from spin_ray.sweep.trials import TrialRow


def publish_winner(shared: SweepContext, k: int, winner: TrialRow) -> None:
    """The winner's model becomes iteration k's model (with its metrics and config), then DONE.

    An iteration already published from this winner is kept; one published from another
    trial is set aside (never deleted) and replaced."""
    rundir = shared.rundir
    rel, stage = rundir.iteration(k), rundir.stage_of_model_dir(winner.model)
    if rundir.is_done(rel):
        if rundir.read_done(rel).get("source") == winner.model:
            return
        rundir.set_aside(rel, f"was published from another trial than {winner.model}")
    rundir.remove_incomplete(rel)
    rundir.publish_dir(rundir.local_copy(winner.model), rundir.stage_model(rel), info={"source": winner.model})
    metrics = rundir.read_json(rundir.stage_metrics(stage))
    metrics["sweep"] = {"trial": winner.trial_id, "params": winner.params, "score": winner.score,
                        "metric": shared.sweep.metric, "source": winner.model}
    rundir.write_json_atomic(rundir.stage_metrics(rel), metrics)
    rundir.write_text_atomic(rundir.stage_config(rel), dump_config(with_overrides(shared.cfg, winner.params)))
    publish_model_card(shared.cfg, rundir, rel)
    upload_stage_model(shared.cfg, rundir, rel)
    rundir.mark_done(rel, {"source": winner.model, "trial": winner.trial_id, "score": winner.score})
