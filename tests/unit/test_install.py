"""The install: ``make demo`` installs the runtime dependencies only, ``make test`` adds the dev
extra, and the S3 stack of the dev extra is pinned (left open, pip backtracks for minutes)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands ``make <target>`` would run for a fresh virtual environment (nothing runs)."""
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_installs_without_the_dev_extra_and_test_with_it(tmp_path):
    demo = [line for line in dry_run("demo", tmp_path / "venv") if "pip install" in line]
    assert demo and not any("dev" in line for line in demo), demo
    assert any(line.endswith("pip install -e .") for line in demo), demo
    for target in ("test", "lint", "unit"):
        assert any("pip install -e '.[dev]'" in line for line in dry_run(target, tmp_path / "venv")), target


def locked_versions() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    return {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([\w.]+)", text, re.M)}


def test_the_s3_stack_is_pinned_to_the_lock_and_the_image():
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pins = dict(re.fullmatch(r"([\w.\-]+)==([\w.]+)", item).groups() for item in dev if "==" in item)
    assert {"s3fs", "aiobotocore", "boto3"} <= pins.keys(), dev
    locked = locked_versions()
    assert {name: locked[name] for name in pins} == pins
    assert f'"s3fs=={pins["s3fs"]}"' in (REPO / "docker" / "Dockerfile").read_text()
