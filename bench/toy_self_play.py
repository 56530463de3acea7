"""Does self-play help in the toy world? The default run repeated over several seeds.

    python -m bench.toy_self_play [--seeds 0 1 2 3 4] [--config configs/default.yaml] [key=value ...]

Each seed runs the whole default schedule (base -> SFT baseline, SPIN iterations) in its
own run directory and reads the toy reward from the run's report. Prints, for every model
and for the gains of the last SPIN iteration over the base model and over SFT, the mean
over seeds with its 95% interval (Student's t over seeds), the standard deviation and the
per-seed values, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from spin_ray.cli import DEFAULT_CONFIG
from spin_ray.config import load_config
from spin_ray.self_play import run

METRIC = "toy"


def run_seed(config: Path, overrides: list[str], seed: int, root: Path) -> dict[str, float]:
    """Mean toy reward per model (base, sft, iter_1, ...) of one seeded run."""
    cfg = load_config(config, [*overrides, f"seed={seed}", f"run_dir={root / f'seed_{seed}'}",
                               "eval.enabled=true", "self_play.sft_baseline=true"])
    run(cfg)
    metrics = json.loads((Path(cfg.run_dir) / "report" / "metrics.json").read_text())
    return {model: row[METRIC]["mean"] for model, row in metrics["summaries"].items()}


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Mean over seeds, its 95% interval (Student's t; NaN for one seed), std, per-seed values."""
    from scipy.stats import t as student_t

    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    half = student_t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "std": std,
            "per_seed": [round(v, 4) for v in values]}


def _line(name: str, row: dict, signed: bool = False) -> str:
    mean = f"{row['mean']:+.3f}" if signed else f"{row['mean']:.3f}"
    return (f"  {name:>18}: {mean}  95% [{row['ci_low']:.3f}, {row['ci_high']:.3f}]  std {row['std']:.3f}  "
            f"{row['per_seed']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--root", type=Path, default=Path("runs/bench_toy"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    per_seed = [run_seed(args.config, args.overrides, seed, args.root) for seed in args.seeds]
    iterations = sorted((m for m in per_seed[0] if m.startswith("iter_")), key=lambda m: int(m.split("_")[1]))
    last = iterations[-1]
    figures = {
        "seeds": args.seeds,
        "mean_reward": {m: spread([s[m] for s in per_seed]) for m in ["base", "sft", *iterations]},
        f"{last}_minus_base": spread([s[last] - s["base"] for s in per_seed]),
        f"{last}_minus_sft": spread([s[last] - s["sft"] for s in per_seed]),
        "sft_minus_base": spread([s["sft"] - s["base"] for s in per_seed]),
    }
    means = [figures["mean_reward"][m]["mean"] for m in iterations]
    figures["spin_non_decreasing"] = all(b >= a for a, b in zip(means, means[1:], strict=False))
    print(f"\ntoy reward ({METRIC}, best-of-N mean over held-out prompts), {len(args.seeds)} seeds")
    for model, row in figures["mean_reward"].items():
        print(_line(model, row))
    for key in [f"{last}_minus_base", f"{last}_minus_sft", "sft_minus_base"]:
        print(_line(key, figures[key], signed=True))
    print(f"  SPIN mean non-decreasing over iterations: {figures['spin_non_decreasing']}")
    print(json.dumps({"bench": "toy_self_play", **figures}))
    return figures


if __name__ == "__main__":
    main()
