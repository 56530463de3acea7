"""Connecting to Ray: join the cluster we run on, or start a private local instance."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started a local instance.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins that cluster.
    Without either, a local instance starts with the dashboard off: nothing listens
    beyond this machine. Its logical CPU count is at least 4 so that the generation
    actors, the training workers and the read tasks can be scheduled together on a
    2-core laptop (torch in each Ray worker uses one thread).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True
