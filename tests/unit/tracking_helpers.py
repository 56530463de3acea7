"""Real inputs for the tracking tests: a stage's history from a tiny training run, its metrics.json
in the shape :func:`spin_ray.stages.run_stage` writes, and an evaluation report written by the
report's own writer."""

from __future__ import annotations

import torch
from PIL import Image
from train_helpers import make_plan, pair_rows

from spin_ray.config_load import from_dict
from spin_ray.eval.metrics import Summary, WinRate
from spin_ray.eval.report_files import write_metrics_json
from spin_ray.progress import write_progress
from spin_ray.rundir import RunDir
from spin_ray.train_loop import Optimization, StepRunner, TrainState, run_steps

STEPS = 3


def train_history(components, rundir: RunDir | None = None, stage: str = "iter_1") -> list[dict]:
    """``STEPS`` real SPIN steps of the tiny UNet on the CPU, reporting every step; with ``rundir``
    each report also goes to the stage's progress file as rank 0 writes it (with the metrics)."""
    torch.manual_seed(0)
    plan = make_plan(steps=STEPS, log_every=1, checkpoint_every=0, beta=20.0)
    unet = components.unet.train()
    runner = StepRunner(plan, unet, None, components.scheduler, torch.device("cpu"))
    rows = pair_rows(components, plan.batch_size * STEPS)
    batches = [{key: value[i * 2:(i + 1) * 2] for key, value in rows.items()} for i in range(STEPS)]

    def report(metrics: dict, checkpoint) -> None:
        if rundir is not None:
            write_progress(rundir.path(rundir.stage_progress(stage)), int(metrics["step"]), STEPS,
                           metrics.get("loss"), metrics=metrics)

    state = run_steps(plan, TrainState(), batches, runner, Optimization.for_plan(unet, plan), report=report)
    return state.history


def write_stage_metrics(rundir: RunDir, stage: str, history: list[dict], loss_type: str = "spin") -> None:
    """The stage's metrics.json with the fields :func:`spin_ray.stages.run_stage` records."""
    rundir.write_json_atomic(rundir.stage_metrics(stage), {
        "iteration": 1, "loss_type": loss_type, "beta": 20.0, "lr": 1e-3, "peak_lr": 1e-3, "steps": STEPS,
        "n_samples": 2 * STEPS, "seconds": 1.5, "history": history,
    })


def write_report(rundir: RunDir) -> dict:
    """report/metrics.json (the report's own writer) and a 40x24 image grid; returns the summaries."""
    summaries = {
        "base": {"toy_reward": Summary(mean=0.25, median=0.2, std=0.1, n=8)},
        "iter_1": {"toy_reward": Summary(mean=0.75, median=0.7, std=0.05, n=8)},
    }
    win_rates = {"iter_1": {"toy_reward": WinRate(win_rate=0.875, tie_share=0.0, num_prompts=8)}}
    out = rundir.local_path(rundir.report())
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out, summaries, win_rates, baseline="base")
    Image.new("RGB", (40, 24), (200, 30, 10)).save(out / "image_grid.png")
    return summaries


def tracking_config(tmp_path, backends: list[str], **tracking):
    return from_dict({"run_dir": str(tmp_path / "run"), "tracking": {"backends": backends, **tracking}})


def wandb_history(run_file) -> list[dict]:
    """The history rows of a wandb run file (``run-<id>.wandb``), parsed with wandb's own protobuf
    ``Record``. wandb 0.31 ships no Python reader for the file (its writer is the Go core), so
    this reads the framing by hand: a 7-byte header, then LevelDB-log records in 32 KiB blocks,
    each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pieces, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
