"""The sweep job's command line (``jobs/sweep.py``): the shared parser of :mod:`spin_ray.cli`,
plus ``--resume``, and one line per published iteration at the end."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from spin_ray.cli import REPO_ROOT, build_parser, guarded, holding_run_dir
from spin_ray.rundir import RunDir
from spin_ray.sweep.config import SweepConfig, dump_sweep_config, load_sweep
from spin_ray.sweep.run import run_sweep
from spin_ray.sweep.summary import fmt, fmt_params

DESCRIPTION = "Ray Tune sweeps over self-play hyperparameters: per-iteration search and population-based self-play."
DEFAULT_SWEEP_CONFIG = REPO_ROOT / "configs" / "sweep_beta.yaml"


def run_sweep_job(argv: Sequence[str] | None = None) -> int:
    """``python jobs/sweep.py [--config FILE] [--resume] [key=value ...]``; errors the user can
    fix are one line and exit code 2 (:func:`spin_ray.cli.guarded`)."""
    parser = build_parser(
        DESCRIPTION, extra_sections={"sweep": SweepConfig},
        config_help="a config with a sweep: section (default: configs/sweep_beta.yaml)",
        overrides_help="dotted keys of the config or of the sweep section, e.g. train.lr=1e-5 "
                       "sweep.max_concurrent_trials=2 'sweep.space.loss.beta={grid: [2000, 5000]}'")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep already in run_dir; Ray Tune unpickles its saved state, "
                             "so use it only for a run directory whose writers you trust")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return guarded(lambda: _sweep_main(args), debug=args.debug, verbose=args.verbose)


def _sweep_main(args: Any) -> int:
    cfg, sweep = load_sweep(args.config or DEFAULT_SWEEP_CONFIG, args.overrides)
    if args.print_config:
        print(dump_sweep_config(cfg, sweep), end="", flush=True)
        return 0
    with holding_run_dir(cfg):
        result = run_sweep(cfg, sweep, resume=args.resume)
    for k, winner in sorted(result.winners.items()):
        print(f"iteration {k}: trial {winner.trial_id} won with {sweep.metric} = {fmt(winner.score)} "
              f"({fmt_params(winner.params)}) -> {result.models[RunDir.iteration(k)]}", flush=True)
    return 0
