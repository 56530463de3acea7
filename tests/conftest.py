"""Shared fixtures: a tiny Stable Diffusion pipeline on disk, loaded through the production path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spin_ray.diffusion import SDComponents, load_components
from spin_ray.tiny import save_tiny_pipeline

# Tiny models gain little from intra-op threads, and two OpenMP threads on a shared 2-core
# machine (Ray workers, other test processes) spin-wait each other into 10-50x slowdowns.
# An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

TINY_SEED = 0
TINY_LATENT_SIZE = 16
"""Latent side of the shared tiny pipeline; its images are 8x larger (128 px)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline (seed 0, 16x16 latents, 128x128 images) saved once per
    session in diffusers format; treat it as read-only."""
    return save_tiny_pipeline(
        tmp_path_factory.mktemp("tiny_sd") / "pipeline", seed=TINY_SEED, sample_size=TINY_LATENT_SIZE
    )


@pytest.fixture
def tiny_components(tiny_pipeline_dir: Path) -> SDComponents:
    """A fresh load of the tiny pipeline per test (tests may change its weights)."""
    return load_components(str(tiny_pipeline_dir), local_files_only=True)


@pytest.fixture
def no_ray(monkeypatch):
    """``self_play.run`` without Ray or a model: Ray's start is a no-op and theta_0 is the
    placeholder ``/models/base`` (tests replace the stages they exercise themselves)."""
    import spin_ray.ray_session
    import spin_ray.self_play
    from spin_ray import stages

    monkeypatch.setattr(spin_ray.ray_session, "ensure_ray", lambda *args, **kwargs: True)  # a private instance
    monkeypatch.setattr(spin_ray.self_play, "check_cluster", lambda cfg, private: "no Ray in this test")
    monkeypatch.setattr(stages, "resolve_base_model", lambda cfg, rundir: "/models/base")
