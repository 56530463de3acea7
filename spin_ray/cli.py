"""One command line for every job: ``python jobs/<job>.py [--config FILE] [key=value ...]``.

``--help`` lists every config key (:mod:`spin_ray.config_help`); ``--print-config`` prints the
resolved config as YAML and exits. An error the user can fix (:class:`spin_ray.errors.UserError`:
config, data, model path, run directory), also one raised inside a Ray task, prints one line
and exits with code 2; ``--debug`` shows its traceback instead. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from spin_ray.config import Config, dump_config, load_config
from spin_ray.config_help import keys_help
from spin_ray.errors import find_user_error

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
USER_ERROR_EXIT = 2
"""Exit code of an error the user can fix (the same as argparse's usage errors)."""


def build_parser(description: str, *, config_help: str | None = None, overrides_help: str | None = None,
                 extra_sections: Mapping[str, type] | None = None) -> argparse.ArgumentParser:
    """The options every job shares; the epilog lists the config keys (plus ``extra_sections``)."""
    parser = argparse.ArgumentParser(description=description, epilog=keys_help(extra_sections),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=config_help or f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file and overrides) as YAML and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors that are otherwise one line (config, data, model, storage)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, its workers' and the actors' own output on the console too (it goes to "
                             "Ray's log files otherwise; the run prints where)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=overrides_help or "dotted config keys, e.g. loss.beta=[2000,5000] train.lr=1e-5; "
                                               "the keys are listed below")
    return parser


def add_rerun_flags(parser: argparse.ArgumentParser) -> None:
    """``--restart-from`` and ``--accept-config-change``: what a rerun does with finished stages
    whose config changed (:mod:`spin_ray.rerun_check`)."""
    parser.add_argument("--restart-from", action="append", default=[], metavar="STAGE",
                        help="redo STAGE (prepared, baseline_<name> or iter_<k>) and every stage built on it: "
                             "they are moved aside to <stage>.stale-<time>, then made again with this config "
                             "(repeatable)")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="keep finished stages although keys they depend on changed; the change is recorded "
                             "in <run_dir>/config_history.jsonl")


def rerun_choice(args: argparse.Namespace):
    """The :class:`~spin_ray.rerun_check.RerunChoice` of parsed :func:`add_rerun_flags` options."""
    from spin_ray.rerun_check import RerunChoice

    return RerunChoice(restart_from=tuple(args.restart_from), accept_config_change=args.accept_config_change)


def parse_args(argv: Sequence[str], description: str, *, rerun_flags: bool = False) -> argparse.Namespace:
    """Parse a plain job's command line; ``config`` is the default config when not given;
    ``rerun_flags`` adds :func:`add_rerun_flags`."""
    parser = build_parser(description)
    if rerun_flags:
        add_rerun_flags(parser)
    args = parser.parse_args(list(argv))
    if args.config is None and DEFAULT_CONFIG.exists():
        args.config = DEFAULT_CONFIG
    return args


def run_job(job: Callable[..., object], argv: Sequence[str] | None = None, description: str = "", *,
            rerun_flags: bool = False) -> int:
    """Load the config from the command line and run ``job``; returns the exit code. With
    ``rerun_flags`` the job takes ``--restart-from``/``--accept-config-change`` too and is
    called as ``job(cfg, rerun_choice)``."""
    args = parse_args(sys.argv[1:] if argv is None else argv, description, rerun_flags=rerun_flags)

    def main() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="", flush=True)
            return 0
        with holding_run_dir(cfg):
            if rerun_flags:
                job(cfg, rerun_choice(args))
            else:
                job(cfg)
        return 0

    return guarded(main, debug=args.debug, verbose=args.verbose)


def holding_run_dir(cfg: Config):
    """The run directory's lease for this job (:mod:`spin_ray.run_lease`): one driver at a time."""
    from spin_ray.run_lease import RunLease
    from spin_ray.rundir import RunDir

    return RunLease(RunDir(cfg.run_dir), stale_s=cfg.cluster.lease_stale_s)


def guarded(main: Callable[[], int], *, debug: bool = False, verbose: bool = False) -> int:
    """Run ``main``; a :class:`~spin_ray.errors.UserError` (also wrapped by Ray) becomes one
    line on stderr and exit code 2, unless ``debug`` (then it propagates with its traceback).
    ``verbose`` lets Ray's own output through to the console (:mod:`spin_ray.ray_session`)."""
    from spin_ray.ray_session import set_verbose

    set_verbose(verbose)
    try:
        return main()
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None or debug:
            raise
        print(f"{user_error.label}: {_one_line(str(user_error))}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT


def _one_line(message: str) -> str:
    # Messages that quote another library's error (YAML, diffusers) may hold line breaks.
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
