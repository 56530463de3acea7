"""One local Ray instance for the whole integration session (never someone else's cluster)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """Start a private local Ray (4 logical CPUs, no dashboard); shut it down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
