"""Mutation testing of the core modules with mutmut, summarised in mutation-report.json.

``make mutation`` runs this from the repository root. mutmut (configured in pyproject.toml,
``[tool.mutmut]``: the files it mutates, the fast unit tests it runs, the pytest options) copies
``spin_ray/`` into ``mutants/``, makes every mutant of the functions selected below, and for each
one runs the selected tests that call the mutated function; a mutant is *killed* when a test
fails. This script picks the functions (:data:`SELECTION`), runs mutmut, reads its per-file
results (``mutants/<file>.meta``) and writes ``mutation-report.json``::

    {"killed": K, "survived": S, "timeout": T, "total": N, "no_tests": .., "other": ..,
     "killed_fraction": K / N, "modules": {"spin_ray.loss": {... the same counts ...}, ...},
     "survivors": [{"name": ..., "status": "survived", "diff": "- old  =>  + new"}, ...],
     "command": ..., "date": ..., "mutmut": <version>, "duration_s": ...}

``total`` counts every selected mutant; ``no_tests`` (no selected test calls the function) and
``other`` (mutmut's "suspicious", "segfault", "not checked", ...) are listed among the
survivors too, since no test caught them. docs/TESTING.md records the result and explains the
equivalent mutants. Not part of ``make test``: a full run takes about 20 minutes on an idle 2-core
machine, over an hour when other jobs share it.

Usage: python scripts/mutation_report.py [--max-children N] [--reuse] [--only GLOB ...] [--report-only]
  --reuse       keep mutants/ from an earlier run (mutmut regenerates changed functions only)
  --only GLOB   run only the mutants matching these mutmut names (e.g. 'spin_ray.loss.x_h2_weight*');
                the report then covers only them
  --report-only do not run mutmut; summarise what mutants/ holds (e.g. after a resumed run)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "mutation-report.json"
MUTANTS = ROOT / "mutants"

ALL = ("*",)
SELECTION: dict[str, tuple[str, ...]] = {
    # module: the functions (and Class.method names) to mutate; ALL for every one.
    "spin_ray.loss": ALL,
    "spin_ray.train_step": ALL,
    # The loop, the step runner, the metrics window, the train state and the checkpoints; not
    # load_models (model loading and device placement: its bf16 branch needs CUDA, and its tests
    # load UNets, ~10 s a mutant; tests/unit/test_mutation_kills_training.py and
    # tests/unit/test_gpu_training.py cover it).
    "spin_ray.train_loop": (
        "run_steps", "optimizer_step", "on_every_rank", "count_nonfinite", "_device_of", "_maybe_report",
        "save_checkpoint", "load_checkpoint", "read_history",
        "StepRunner.__init__", "StepRunner.forward_backward", "MetricWindow.add", "MetricWindow.pop",
        "TrainState.to_json", "TrainState.from_json", "Optimization.for_plan", "CheckpointRequest.save",
    ),
    # The model layer's noise and sampling. sample_latents itself is decorated (@torch.no_grad)
    # and mutmut does not mutate decorated functions; its helpers are here.
    "spin_ray.diffusion": (
        "row_noise_and_timesteps", "noisy_latents", "training_target", "predict_noise",
        "_negative_batch", "_row_normal",
    ),
    # Config coercion (a value against its field's annotation, nested sections, unknown keys)
    # and the parsing of command-line overrides.
    "spin_ray.config_validate": (
        "coerce", "build_dataclass", "field_types", "_type_name", "_join", "unknown_key_message",
    ),
    "spin_ray.config_load": ("parse_override", "apply_overrides", "_deep_copy", "_set_path"),
}

# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code), folded into the report's classes.
KILLED_CODES = {1, 3}
SURVIVED_CODES = {0}
TIMEOUT_CODES = {24, -24, 36, 152, 255}
NO_TESTS_CODES = {5, 33}


def status_of(exit_code: int | None) -> str:
    if exit_code in KILLED_CODES:
        return "killed"
    if exit_code in SURVIVED_CODES:
        return "survived"
    if exit_code in TIMEOUT_CODES:
        return "timeout"
    if exit_code in NO_TESTS_CODES:
        return "no_tests"
    return "other"


def mutant_globs(selection: dict[str, tuple[str, ...]]) -> list[str]:
    """mutmut's mutant names: ``<module>.x_<function>__mutmut_<n>`` and
    ``<module>.xǁ<Class>ǁ<method>__mutmut_<n>``."""
    globs = []
    for module, functions in selection.items():
        for function in functions:
            if function == "*":
                globs.append(f"{module}.x*")
            elif "." in function:
                cls, method = function.split(".", 1)
                globs.append(f"{module}.xǁ{cls}ǁ{method}__mutmut_*")
            else:
                globs.append(f"{module}.x_{function}__mutmut_*")
    return globs


def module_of(name: str) -> str:
    """``spin_ray.loss.x_h2_weight__mutmut_3`` -> ``spin_ray.loss``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return name.rsplit(".", 1)[0]


def read_results(globs: list[str]) -> dict[str, int | None]:
    """Every selected mutant's exit code, from mutmut's ``mutants/**/*.py.meta`` files."""
    results: dict[str, int | None] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            if any(fnmatch.fnmatchcase(name, g) for g in globs):
                results[name] = code
    return results


def one_line_diff(name: str) -> str:
    """The mutant's changed lines, ``- old  =>  + new`` (from ``mutmut show``'s unified diff)."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            diff = get_diff_for_mutant(name)
        finally:
            os.chdir(cwd)
    except Exception:  # a newer mutmut: fall back to its command line
        diff = subprocess.run([str(Path(sys.executable).with_name("mutmut")), "show", name], cwd=ROOT,
                              capture_output=True, text=True, check=False).stdout
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return f"- {' / '.join(removed)}  =>  + {' / '.join(added)}"


def summarise(results: dict[str, int | None]) -> dict:
    def counts(statuses: Counter) -> dict:
        total = sum(statuses.values())
        record = {key: statuses.get(key, 0) for key in ("killed", "survived", "timeout", "no_tests", "other")}
        record["total"] = total
        record["killed_fraction"] = round(record["killed"] / total, 4) if total else None
        return record

    overall: Counter = Counter()
    by_module: dict[str, Counter] = {}
    for name, code in results.items():
        status = status_of(code)
        overall[status] += 1
        by_module.setdefault(module_of(name), Counter())[status] += 1
    survivors = [
        {"name": name, "status": status_of(code), "exit_code": code, "diff": one_line_diff(name)}
        for name, code in sorted(results.items()) if status_of(code) not in ("killed", "timeout")
    ]
    return {**counts(overall), "modules": {m: counts(c) for m, c in sorted(by_module.items())},
            "survivors": survivors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    parser.add_argument("--reuse", action="store_true", help="keep mutants/ from an earlier run")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="only these mutant names (mutmut globs)")
    parser.add_argument("--report-only", action="store_true", help="do not run mutmut; summarise mutants/")
    args = parser.parse_args(argv)

    globs = args.only or mutant_globs(SELECTION)
    mutmut = [str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(args.max_children), *globs]
    started = time.time()
    if not args.report_only:
        if not args.reuse and MUTANTS.exists():
            shutil.rmtree(MUTANTS)
        log = ROOT / "mutants-run.log"
        print(f"running: {shlex.join(mutmut)}  (output in {log.name})", flush=True)
        with log.open("w") as out:
            rc = subprocess.run(mutmut, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        MUTANTS.mkdir(exist_ok=True)
        shutil.move(log, MUTANTS / log.name)
        if rc != 0:
            print(f"mutmut failed (exit {rc}); see mutants/{log.name}", file=sys.stderr)
            return rc
    results = read_results(globs)
    if not results:
        print("no mutant results under mutants/", file=sys.stderr)
        return 1
    report = summarise(results)
    report.update({
        "command": shlex.join(["python", "scripts/mutation_report.py", *(argv if argv is not None else sys.argv[1:])]),
        "mutmut_command": shlex.join(["mutmut", *mutmut[1:]]),
        "mutmut": metadata.version("mutmut"),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(time.time() - started),
    })
    REPORT.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"{REPORT.name}: killed {report['killed']}/{report['total']} ({report['killed_fraction']:.1%}), "
          f"survived {report['survived']}, timeout {report['timeout']}, no tests {report['no_tests']}, "
          f"other {report['other']}")
    for module, record in report["modules"].items():
        print(f"  {module:22s} killed {record['killed']:4d}/{record['total']:<4d} ({record['killed_fraction']:.1%})"
              f"  survived {record['survived']}  timeout {record['timeout']}  no tests {record['no_tests']}")
    for survivor in report["survivors"]:
        print(f"  {survivor['status']:9s} {survivor['name']}: {survivor['diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
