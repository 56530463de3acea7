"""Can the cluster hold an iteration at all? Checked before any work, so a small cluster fails
with a message instead of stalling.

An iteration runs three kinds of work at once (docs/DESIGN.md section 3.1): the generation
actors holding theta_k (``generation.num_actors``, one CPU each, ``generation.gpus_per_actor``
GPUs), the training workers (``train.num_workers``, one CPU each, a GPU each with
``train.use_gpu``) and Ray Data's tasks that read and repartition the rows on their way to the
generators (one CPU). They stream into each other, so all must be placed together: on a Ray head
started with 2 CPUs the generator and the trainer take both and Ray Data's repartition waits for
a CPU forever (``backpressured:tasks(ResourceBudget)``), with no output and no end.

On a fixed cluster (no autoscaler) the requests are packed onto the nodes' total resources
(first fit, largest first: each actor or worker needs all of its resources on one node); if they
do not fit, :class:`ClusterTooSmallError` names what is needed and what is there. On an
autoscaling cluster the node types are known only to the autoscaler, which reports requests no
node type can satisfy (``ray status``: "cannot be scheduled"); there the check is skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spin_ray.config import Config
from spin_ray.errors import UserError

DATA_TASK_CPUS = 1.0
"""Ray Data's read and repartition tasks run one at a time at least, on one CPU."""


class ClusterTooSmallError(UserError):
    """The cluster cannot hold an iteration's actors, workers and data tasks at once."""

    label = "cluster too small"


@dataclass(frozen=True)
class Request:
    """``count`` placements of ``bundle`` (resource name -> amount), each on a single node."""

    what: str
    count: int
    bundle: Mapping[str, float]


def iteration_requests(cfg: Config) -> list[Request]:
    """What one self-play iteration asks Ray for, as the stages ask it (the generation pool's
    ``map_batches`` actors, Ray Train's workers and Ray Data's tasks)."""
    gen = {"CPU": 1.0, "GPU": cfg.generation.gpus_per_actor}
    if cfg.cluster.generation_node_label:
        gen[cfg.cluster.generation_node_label] = 0.001
    train = {"CPU": 1.0, "GPU": 1.0 if cfg.train.use_gpu else 0.0}
    if cfg.cluster.train_node_label:
        train[cfg.cluster.train_node_label] = 0.001
    return [
        Request("generation actors (generation.num_actors)", cfg.generation.num_actors, gen),
        Request("training workers (train.num_workers)", cfg.train.num_workers, train),
        Request("Ray Data's read/repartition task", 1, {"CPU": DATA_TASK_CPUS}),
    ]


def unplaced(requests: Sequence[Request], nodes: Sequence[Mapping[str, float]]) -> list[str]:
    """The requests (``what``) that do not fit on ``nodes`` (each a node's total resources) when
    all are placed together, first fit with the largest bundles first; empty when all fit."""
    free = [dict(node) for node in nodes]
    placements = [(request.what, request.bundle) for request in requests for _ in range(request.count)]
    placements.sort(key=lambda item: (item[1].get("GPU", 0.0), item[1].get("CPU", 0.0)), reverse=True)
    missing = []
    for what, bundle in placements:
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v)), None)
        if node is None:
            missing.append(what)
            continue
        for key, amount in bundle.items():
            node[key] = node.get(key, 0.0) - amount
    return missing


def _describe(requests: Sequence[Request]) -> str:
    return "; ".join(f"{r.count} x {_bundle(r.bundle)} for {r.what}" for r in requests if r.count)


def _bundle(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"


def check_fits(cfg: Config, nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise :class:`ClusterTooSmallError` when an iteration cannot be placed on ``nodes``."""
    requests = iteration_requests(cfg)
    missing = unplaced(requests, nodes)
    if not missing:
        return
    there = ", ".join(_bundle({k: v for k, v in n.items() if k in ("CPU", "GPU") or "node:" not in k})
                      for n in nodes) or "no nodes"
    raise ClusterTooSmallError(
        f"this cluster cannot run an iteration: it needs, at once, {_describe(requests)}; the nodes have "
        f"{there}; left without a place: {', '.join(sorted(set(missing)))}. Give the cluster more CPUs "
        f"(`ray start --num-cpus=N`) or lower generation.num_actors / train.num_workers.")


def check_cluster(cfg: Config, *, private: bool = False) -> str:
    """Check the connected Ray cluster (``ray.init`` done); ``private``: it is the local Ray this
    process started (fixed by construction). Returns what was checked, for the log."""
    import ray

    kind = "fixed" if private else _cluster_kind()
    if kind == "autoscaling":
        return "autoscaling cluster: its autoscaler reports requests no node type can hold (`ray status`)"
    if kind == "unknown":
        return "cluster capacity not checked (no autoscaler status from this cluster)"
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    check_fits(cfg, nodes)
    return f"the cluster holds an iteration: {_describe(iteration_requests(cfg))}"


def _cluster_kind(wait_s: float = 15.0) -> str:
    """``fixed``, ``autoscaling`` or ``unknown``, from the status the cluster's monitor publishes in
    the GCS every few seconds: without an autoscaling config the monitor runs a read-only provider
    whose node types are all named ``node_<id>`` (ray.autoscaler._private.util)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    deadline = time.time() + wait_s
    while _internal_kv_initialized():
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        types = set((report.get("node_type_mapping") or {}).values())
        if types:
            return "fixed" if all(t.startswith("node_") for t in types) else "autoscaling"
        if time.time() > deadline:
            break
        time.sleep(1.0)
    return "unknown"
