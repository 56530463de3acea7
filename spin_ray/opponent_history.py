"""Opponents from earlier iterations (``self_play.opponent_history``): which iterations, which of
their cached rows, and copying them into the current stage's cache with its own reference errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.config import Config
from spin_ray.rundir import RunDir
from spin_ray.stage_plans import generator_spec, label_resources

HISTORY_TAG = 0x415
"""Mixed into the seed of :func:`choose_history_rows`, so the draw is no other draw of ``cfg.seed``."""



@dataclass(frozen=True)
class HistoryShare:
    """The opponent rows an earlier iteration gives iteration k (``self_play.opponent_history``)."""

    iteration: int
    """j < k: the iteration whose cache (``iter_<j>/opponents/``, theta_{j-1}'s opponents) they come from."""
    files: list[str]
    """Its cached opponent files (:func:`spin_ray.opponents.cached_files`)."""
    sample_ids: list[int]
    """The chosen rows' sample ids, sorted."""



def history_sources(rundir: RunDir, iteration: int, history: int) -> list[tuple[int, str]]:
    """(j, j's opponent cache) for the earlier iterations whose opponents iteration k mixes in
    with ``self_play.opponent_history`` = N: j = k-1 .. k-N+1, those >= 1, newest first."""
    return [(j, rundir.opponents(j)) for j in range(iteration - 1, max(iteration - history, 0), -1)]



def choose_history_rows(sample_ids, share: int, *, seed: int, iteration: int, source: int) -> list[int]:
    """``share`` of ``sample_ids`` (all when there are no more), drawn without replacement by a
    generator seeded with (``seed``, :data:`HISTORY_TAG`, ``iteration``, ``source``); sorted.
    Depends on the set of ids only, so a rerun draws the same rows."""
    import numpy as np

    ids = np.unique(np.asarray(sample_ids, dtype=np.int64))
    if len(ids) <= share:
        return ids.tolist()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), HISTORY_TAG, int(iteration), int(source)]))
    return np.sort(rng.choice(ids, size=share, replace=False)).tolist()



def opponent_history(cfg: Config, rundir: RunDir, iteration: int, n_samples: int,
                     history: int | None = None) -> tuple[int, list[HistoryShare]]:
    """How iteration k's ``n_samples`` opponents are mixed with ``history`` (default
    ``self_play.opponent_history``) = N: equal shares. The h = min(N, k) opponents theta_{k-1} ..
    theta_{k-h} each give ``n_samples // h`` rows: every earlier iteration j = k-1 .. k-h+1 from
    its cache (:func:`choose_history_rows`; fewer when it holds fewer), and theta_{k-1} generates
    the rest for new real rows. Returns (rows theta_{k-1} generates, the earlier iterations' shares)."""
    from spin_ray.opponents import cached_files

    sources = history_sources(rundir, iteration, cfg.self_play.opponent_history if history is None else history)
    share = n_samples // (len(sources) + 1)
    shares = []
    for j, rel in sources:
        files, ids = cached_files(rundir.path(rel))
        if not files:
            raise FileNotFoundError(f"[{rundir.iteration(iteration)}] self_play.opponent_history: iteration {j}'s "
                                    f"opponents are not in {rundir.path(rel)} (a finished iteration keeps them)")
        shares.append(HistoryShare(j, files, choose_history_rows(ids, share, seed=cfg.seed, iteration=iteration,
                                                                 source=j)))
    return n_samples - sum(len(s.sample_ids) for s in shares), shares



def copy_history(cfg: Config, rundir: RunDir, opponents_rel: str, shares: list[HistoryShare], *, model_path: str,
                 iteration: int) -> int:
    """Copy the earlier iterations' chosen opponent rows into this stage's cache ``opponents_rel``
    with the reference errors of this stage's opponent ``model_path`` (Ray Data actors,
    :class:`~spin_ray.generation.HistoryReference`); rows already there (a rerun) are skipped.
    Returns the number of rows copied now."""
    import numpy as np
    import ray.data

    from spin_ray.generation import HistoryReference
    from spin_ray.opponents import cached_files

    spec = generator_spec(cfg, rundir, opponents_rel, model_path, iteration)
    _, present = cached_files(spec.opponents_dir)
    copied = 0
    for share in shares:
        missing = np.setdiff1d(np.asarray(share.sample_ids, dtype=np.int64), present)
        if not len(missing):
            continue
        print(f"[{opponents_rel}] mixing in {len(missing)} opponents of iter_{share.iteration} "
              f"(self_play.opponent_history), reference errors by {model_path}", flush=True)
        rows = ray.data.read_parquet(share.files).map_batches(_only_ids, fn_kwargs={"ids": missing},
                                                              batch_format="numpy")
        rows = rows.repartition(target_num_rows_per_block=cfg.generation.batch_size).map_batches(
            HistoryReference, fn_constructor_args=(spec,),
            compute=ray.data.ActorPoolStrategy(size=cfg.generation.num_actors),
            batch_size=cfg.generation.batch_size, num_gpus=cfg.generation.gpus_per_actor or None,
            resources=label_resources(cfg.cluster.generation_node_label))
        copied += sum(len(batch["sample_id"]) for batch in rows.iter_batches(batch_size=None, batch_format="numpy"))
    return copied



def _only_ids(batch, ids):
    import numpy as np

    keep = np.isin(np.asarray(batch["sample_id"]), ids)
    return {name: np.asarray(values)[keep] for name, values in batch.items()}
