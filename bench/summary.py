"""Summarize benchmark results: headline figures against the performance targets, then the
scaling table from the measured per-GPU rates.

Reads ``generation.json`` and ``train_step.json`` (each the last line a bench printed) from a
results directory, as ``bench/gpu.sh`` writes them. Run: ``python -m bench.summary bench/results``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import scaling
from bench.common import emit_json, print_table

TARGETS = {
    "generation_vs_stock_gpu": 1.5,
    "generation_vs_stock_cpu": 1.0,
    "precomputed_step_time_vs_online": 0.8,
    "memory_saved_in_reference_unets": 1.0,
}
"""Issue 9's targets: generator speed-up over stock diffusers (at least), precomputed/online
step time (at most), peak memory saved by precomputing, in reference UNets (at least)."""


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def generation_rows(record: dict) -> tuple[list[list[object]], float | None]:
    """Rows per variant and the best 'ours' images/s (None when none ran)."""
    ours = {k: v for k, v in record["images_per_s"].items() if k in ("ours", "ours_fast", "ours_compiled")}
    best = max(ours, key=ours.get) if ours else None
    on_gpu = record["machine"]["device"].startswith("cuda")
    target = TARGETS["generation_vs_stock_gpu" if on_gpu else "generation_vs_stock_cpu"]
    rows = []
    for name, value in record["images_per_s"].items():
        speedup = record["ratio_vs_stock_latent"][name]
        rows.append([f"generation {name}", f"{value:.3g} images/s", f"{speedup:.2f}x stock",
                     _pct(record["mfu"].get(name)), f">= {target}x" if name == best else ""])
    return rows, ours.get(best) if best else None


def train_rows(record: dict) -> list[list[object]]:
    rows = [[f"train step {mode}", f"{value:.3g} samples/s", "", _pct(record["mfu"][mode]), ""]
            for mode, value in record["samples_per_s"].items()]
    rows.append(["train step time precomputed/online", f"{record['time_ratio_precomputed_vs_online']:.3f}", "",
                 "", f"<= {TARGETS['precomputed_step_time_vs_online']}"])
    if record.get("memory_saved_bytes") is not None:
        rows.append(["peak memory saved by precomputing",
                     f"{record['memory_saved_bytes'] / 2**30:.2f} GiB",
                     f"{record['memory_saved_in_reference_unets']:.2f} reference UNets", "",
                     f">= {TARGETS['memory_saved_in_reference_unets']} UNet"])
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"MFU {value:.1%}"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="directory with generation.json and train_step.json")
    parser.add_argument("--samples", type=int, default=scaling.PAPER_ITERATION_1_SAMPLES)
    parser.add_argument("--startup", type=float, default=120.0)
    args = parser.parse_args(argv)
    generation, train = load(args.results, "generation"), load(args.results, "train_step")
    rows, gen_rate = generation_rows(generation) if generation else ([], None)
    rows += train_rows(train) if train else []
    train_rate = train["samples_per_s"]["precomputed"] if train else None
    print_table(f"summary of {args.results}", ["figure", "value", "relative", "MFU", "target"], rows)
    record: dict[str, object] = {"bench": "summary", "gen_images_per_s": gen_rate, "train_samples_per_s": train_rate}
    if gen_rate and train_rate:
        record["scaling"] = scaling.main(["--gen-images-per-s", str(gen_rate), "--train-samples-per-s",
                                          str(train_rate), "--samples", str(args.samples),
                                          "--startup", str(args.startup)])
    return emit_json(record)


if __name__ == "__main__":
    main()
