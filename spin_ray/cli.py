"""One command line for every job: ``python jobs/<job>.py [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from spin_ray.config import Config, ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


def parse_args(argv: list[str], description: str) -> tuple[Path | None, list[str]]:
    """Split ``argv`` into the config file and the ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config keys, e.g. loss.beta=[2000,5000] train.lr=1e-5")
    args = parser.parse_args(argv)
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return path, args.overrides


def run_job(job: Callable[[Config], object], argv: list[str] | None = None, description: str = "") -> int:
    """Load the config from the command line and run ``job``; config errors exit with 2."""
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv, description)
    try:
        job(load_config(path, overrides))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0
