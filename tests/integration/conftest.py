"""One local Ray instance for the whole integration session (never someone else's cluster)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """Start a private local Ray (4 logical CPUs, dashboard on loopback), as the jobs do; shut it down at the end.

    While it runs, the jobs the tests start as subprocesses meet "another Ray instance on the
    machine", as users do (tests/integration/test_default_run.py checks their console)."""
    import ray

    from spin_ray.ray_session import ensure_ray

    ensure_ray("local", num_cpus=4)
    yield ray
    ray.shutdown()
