"""Connecting to Ray: join the cluster we run on, or start a private local instance.

Quiet by default (issue 14): the console shows spin-ray's own lines; Ray's, its workers' and
the actors' output stays in Ray's log files, whose place :func:`ensure_ray` prints once.
``--verbose`` (:func:`set_verbose`) brings that output back to the console.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

LOCAL_ENV = {
    # Ray 2.60 starts 32 parquet footer-reading actors (each a process) for every read_parquet,
    # whatever the number of files: on a laptop, most of an iteration's pipeline start-up.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
    # Ray Train's controller polls its workers this often (default 2 s): it notices a finished
    # training that much later, once per stage.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # The raylet waits this long for its agents (dashboard agent, metrics agent) to start and
    # then aborts, and ray.init fails with "The current node timed out during startup". Ray
    # 2.60 waits 15 s; a busy 2-core laptop took over 15 s to start the agents (seen here at
    # load 8-20). Two minutes instead.
    "RAY_agent_register_timeout_ms": "120000",
}
"""Settings of a private local instance (docs/PERFORMANCE.md); the environment overrides each.
Clusters keep Ray's defaults."""

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's state API (used by Ray Train's own actors) finds the dashboard's API server."""

_settings = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """Whether Ray's and the workers' own output reaches the console (``--verbose``)."""
    _settings["verbose"] = bool(verbose)


def is_verbose() -> bool:
    return _settings["verbose"]


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started a local instance.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins that cluster.
    Without either, or with ``address="local"``, a private local instance starts whose
    dashboard listens on loopback only (nothing listens beyond this machine). Its logical CPU
    count is at least 4 so that the generation actors, the training workers and the read
    tasks can be scheduled together on a 2-core laptop (torch in each Ray worker uses one
    thread), with the settings of :data:`LOCAL_ENV`.
    """
    import ray

    if ray.is_initialized():
        return False
    verbose = is_verbose()
    log_data_progress_as_lines()
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=verbose, **quiet)
        _after_init(verbose)
        return False
    # Set in this process (Ray Data may plan a read here) and so in the local Ray's
    # processes, which inherit this environment.
    for name, value in LOCAL_ENV.items():
        os.environ.setdefault(name, value)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    port = free_loopback_port()
    # Ray Train's PlacementGroupCleaner asks the state API whether the controller lives. The
    # state API needs the dashboard's API server, and without an address it looks for "the"
    # Ray instance on this machine: with the dashboard off it fails every second ("Failed to
    # query Ray Train Controller actor state"), and with another Ray running (a notebook, a
    # second job) it raises "Found multiple active Ray instances". So the private instance
    # runs its dashboard on loopback and tells its processes, which inherit this environment,
    # where it is.
    # include_dashboard=None, not True: a dashboard that does not come up within Ray's startup
    # timeout (60 s; seen on a 2-core machine under heavy load) is logged and the run goes on
    # without it (Ray Train's cleaner then only complains in Ray's logs), instead of failing.
    # The variable is set only while Ray starts its processes (they inherit it), then restored:
    # a subprocess this driver starts later (`ray start`, `ray job submit`, a test's job) must
    # not be pointed at this private instance.
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=None, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=verbose, **quiet)
    finally:
        if previous is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous
    _after_init(verbose)
    return True


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _after_init(verbose: bool) -> None:
    """Quiet the driver's own Ray loggers and say once where Ray's output went."""
    if verbose:
        return
    import diffusers.utils.logging
    import transformers.utils.logging
    from ray.data import DataContext
    from ray.util.debug import log_once

    # spin-ray shows its own progress (spin_ray.progress); Ray Data's bars and per-operator
    # log lines, and the loading and saving bars of diffusers and transformers, are not wanted.
    DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # switched off on purpose: no warning that it is
    # Ray Data logs to its own file (ray-data.log in the session's logs) and to the console; only
    # the console handler is silenced, so the file keeps everything. Among what it would print:
    # the full traceback of an error in our own pipeline code (a bad image), which reaches the
    # user anyway as the exception, in one line when it is theirs to fix (spin_ray.cli.guarded).
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL + 1)
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    where = ray_logs_dir()
    if where:
        print(f"Ray's own output (workers, actors, Ray Data and Ray Train logs) goes to {where}; "
              "--verbose shows it here", flush=True)


def ray_logs_dir() -> str | None:
    """The log directory of the Ray session this process is connected to (on this node), or
    None when Ray does not say (a private attribute: its absence only loses the hint)."""
    try:
        import ray._private.worker

        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except (AttributeError, ImportError):
        return None


def log_data_progress_as_lines() -> None:
    """When this process's output is not a terminal (``ray job submit`` logs, CI), Ray Data
    reports pipeline progress as periodic log lines: its default distributed progress bars
    reach such output as a flood of cursor-movement escape codes. Call before building datasets."""
    if not sys.stdout.isatty():
        from ray.data import DataContext

        DataContext.get_current().use_ray_tqdm = False
