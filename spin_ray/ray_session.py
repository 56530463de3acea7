"""Connecting to Ray: join the cluster we run on, or start a private local instance."""

from __future__ import annotations

import os
import sys

LOCAL_ENV = {
    # Ray 2.60 starts 32 parquet footer-reading actors (each a process) for every read_parquet,
    # whatever the number of files: on a laptop, most of an iteration's pipeline start-up.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
    # Ray Train's controller polls its workers this often (default 2 s): it notices a finished
    # training that much later, once per stage.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Settings of a private local instance (docs/PERFORMANCE.md); the environment overrides each.
Clusters keep Ray's defaults."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started a local instance.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins that cluster.
    Without either, or with ``address="local"``, a private local instance starts with the
    dashboard off: nothing listens beyond this machine. Its logical CPU count is at least 4
    so that the generation actors, the training workers and the read tasks can be scheduled
    together on a 2-core laptop (torch in each Ray worker uses one thread), with the
    settings of :data:`LOCAL_ENV`.
    """
    import ray

    if ray.is_initialized():
        return False
    log_data_progress_as_lines()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return False
    # Set in this process (Ray Data may plan a read here) and so in the local Ray's
    # processes, which inherit this environment.
    for name, value in LOCAL_ENV.items():
        os.environ.setdefault(name, value)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


def log_data_progress_as_lines() -> None:
    """When this process's output is not a terminal (``ray job submit`` logs, CI), Ray Data
    reports pipeline progress as periodic log lines: its default distributed progress bars
    reach such output as a flood of cursor-movement escape codes. Call before building datasets."""
    if not sys.stdout.isatty():
        from ray.data import DataContext

        DataContext.get_current().use_ray_tqdm = False
