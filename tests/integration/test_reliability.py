"""Faults injected into a real run: killed drivers, generation actors and training workers,
leftovers of killed writers, files cut off mid-write.

Processes are stopped and killed by their own PID: a driver is a subprocess we started (it
attaches to this session's Ray, so Ray cleans up after it), Ray actors are found in the GCS
actor table of this session's Ray (``ray._private.state.actors()``: ``ray.util.state`` needs
the dashboard, which the session fixture does not start). A process is frozen (SIGSTOP)
before it is killed, so what it had written when it died is known exactly. Every run has the
same tiny settings and seed, so the faulted run must end with the very weights of the
uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from spin_ray.config import load_config
from spin_ray.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 128  # the shared tiny pipeline: 16x16 latents
STEPS = 6
BATCH = 2
N_SAMPLES = STEPS * BATCH
N_BATCHES = N_SAMPLES // BATCH  # opponent files of an uninterrupted run
RESUMED = re.compile(r"resumed training from checkpoint at step (\d+)")
DRIVER_RESUMED = re.compile(r"training resumes from its Ray Train checkpoint at step (\d+)")


def write_config(path: Path, tiny_pipeline_dir: Path, data: Path, run_dir: Path, **extra) -> Path:
    """The whole config of a run as one file: the drivers get ``--config path`` and the runs in
    this process ``load_config(path)``, so every run of a test is the same command (without
    ``--config`` the job script would start from configs/default.yaml instead)."""
    from spin_ray.config import dump_config

    values = {
        "run_dir": str(run_dir), "seed": 7, "model.pretrained": str(tiny_pipeline_dir),
        "model.resolution": RESOLUTION, "data.path": str(data), "data.prepare_batch_size": 8,
        "generation.num_inference_steps": 4, "generation.guidance_scale": 2.0, "generation.batch_size": BATCH,
        "train.steps": STEPS, "train.batch_size": BATCH, "train.warmup_steps": 0, "train.lr": 1e-3,
        "loss.beta": 10.0,  # small enough that the loss does not saturate: every step moves theta
        "train.num_workers": 1, "train.log_every": 1, "train.checkpoint_every": 1, "train.max_failures": 2,
        "self_play.iterations": 1, "eval.enabled": False,
    }
    values.update(extra)
    path.write_text(dump_config(load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])))
    return path


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory) -> Path:
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "train.parquet", n_rows=N_SAMPLES, seed=4,
                                  resolution=RESOLUTION)


def unet_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", use_safetensors=True).state_dict()


def assert_same_weights(model_dir: str | Path, reference: dict[str, torch.Tensor]) -> None:
    """Bit for bit: a resumed run on CPU with fixed seeds must end exactly where an uninterrupted one ends."""
    weights = unet_weights(model_dir)
    assert weights.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(weights[k], reference[k])]
    worst = max((float((weights[k] - reference[k]).abs().max()) for k in differing), default=0.0)
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run (max abs diff {worst:.3g})"


@pytest.fixture(scope="module")
def reference(ray_local, tiny_pipeline_dir, toy_parquet, tmp_path_factory) -> dict[str, torch.Tensor]:
    """theta_1 of an uninterrupted run."""
    from spin_ray.self_play import run

    folder = tmp_path_factory.mktemp("ref")
    result = run(load_config(write_config(folder / "config.yaml", tiny_pipeline_dir, toy_parquet, folder / "run")))
    weights = unet_weights(result.models["iter_1"])
    assert any(not torch.equal(weights[k], v) for k, v in unet_weights(tiny_pipeline_dir).items())
    return weights


# ----------------------------------------------------------------------------- watching the run


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def opponent_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "iter_1" / "opponents").glob("*.parquet"))


def modified_times(files: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in files}


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has recorded in its snapshot (what a restart resumes from)."""
    snapshots = list((run_dir / "iter_1" / "train").glob("*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return []
    try:
        return [r["metrics"]["step"] for r in json.loads(snapshots[0].read_text())["checkpoint_results"]]
    except (ValueError, KeyError):  # being rewritten right now
        return []


def latest_step(run_dir: Path) -> int:
    """The step of the last registered checkpoint (read again if the snapshot is being rewritten)."""
    return max(wait_until(lambda: registered_steps(run_dir), 60, "a readable checkpoint snapshot"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_opponent_ids(run_dir: Path) -> list[int]:
    from spin_ray.opponents import cached_files

    files, ids = cached_files(str(run_dir / "iter_1" / "opponents"))
    rows = [i for f in files for i in pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()]
    assert sorted(rows) == sorted(ids.tolist()), "a sample was read twice"
    return rows


# ----------------------------------------------------------------------------- finding and killing


def is_generator(class_name: str) -> bool:
    """Ray Data names the generation actors ``MapWorker(...MapBatches(OpponentGenerator)...)``."""
    return class_name.startswith("MapWorker(") and "MapBatches(OpponentGenerator)" in class_name


def is_train_worker(class_name: str) -> bool:
    return class_name == "RayTrainWorker"


def actor_table() -> dict[str, dict]:
    from ray._private import state

    return state.actors()


def live_actor(matches, job: str) -> tuple[str, int] | None:
    """(ActorID, PID) of a live actor of ``job`` whose class name ``matches``."""
    for actor_id, info in actor_table().items():
        if info["State"] == "ALIVE" and info["Pid"] and info["JobID"] == job and matches(info["ActorClassName"]):
            return actor_id, info["Pid"]
    return None


def actors_of(matches, job: str) -> list[dict]:
    """Every actor of ``job`` whose class name ``matches``, dead ones included."""
    return [info for info in actor_table().values() if info["JobID"] == job and matches(info["ActorClassName"])]


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_for_driver_cleanup(own_job: str) -> None:
    """Ray kills what a dead driver owned; wait for it, so the rerun has the whole cluster.
    Detached actors outlive their driver by design (Ray Train's placement-group cleaner)."""

    def leftovers() -> list[str]:
        return [a["ActorClassName"] for a in actor_table().values()
                if a["State"] != "DEAD" and a["JobID"] != own_job and not a["IsDetached"]]

    wait_until(lambda: not leftovers(), 120, "the killed driver's actors to be cleaned up", interval=0.5)


class Driver:
    """``jobs/self_play.py`` as a subprocess attached to this session's Ray, killed by its PID."""

    def __init__(self, config: Path, log_path: Path, own_job: str):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONUNBUFFERED"] = "1"  # the log shows the workers' lines as they come
        self.log_path, self.own_job = log_path, own_job
        self.log_file = log_path.open("w")
        # cwd: Ray puts the driver's working directory on its workers' sys.path (spin_ray is not installed here)
        # --verbose: the test times its kills by the workers' own lines ("resumed training from ...")
        command = [sys.executable, str(REPO / "jobs" / "self_play.py"), "--verbose", "--config", str(config)]
        self.process = subprocess.Popen(command, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                        start_new_session=True)
        self.job = ""

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.process.poll() is None:
            kill(self.process.pid)
        self.process.wait()
        self.log_file.close()
        if exc_type is None:  # after a failure, leave Ray to clean up without hiding the failure
            wait_for_driver_cleanup(self.own_job)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, condition, what: str, timeout: float = 600):
        """``condition()``'s first truthy value; fails at once, with the log, if the driver exits."""

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the driver exited ({self.process.returncode}) before {what}:\n"
                                     f"{self.log()[-4000:]}")
            return condition()

        return wait_until(ready, timeout, what)

    def wait_for_actor(self, matches, what: str) -> tuple[str, int]:
        """(ActorID, PID) of this driver's live actor of a class (learns the driver's job id)."""
        if not self.job:
            self.job = self.wait(lambda: next((info["JobID"] for info in actor_table().values()
                                               if info["JobID"] != self.own_job and info["State"] == "ALIVE"
                                               and not info["IsDetached"]), None), "the driver's first actor")
        return self.wait(lambda: live_actor(matches, self.job), what)

    def kill(self) -> None:
        kill(self.process.pid)
        self.process.wait()
        assert self.process.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- the faults


def plant_leftovers_of_killed_writes(run_dir: Path) -> None:
    """What earlier drivers killed mid-write leave behind: a prepared table without DONE (with a
    truncated shard), a half-written opponent batch, a model directory without DONE and a
    publish staging directory."""
    (run_dir / "prepared" / "data").mkdir(parents=True)
    (run_dir / "prepared" / "data" / "shard_0.parquet").write_bytes(b"PAR1 truncated")
    opponents = run_dir / "iter_1" / "opponents"
    opponents.mkdir(parents=True)
    (opponents / ".part-00000000000000000000-deadbeef.parquet.tmp").write_bytes(b"PAR1 truncated")
    (run_dir / "iter_1" / "model" / "unet").mkdir(parents=True)
    (run_dir / "iter_1" / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (run_dir / "iter_1" / ".model.publish-0123456789ab" / "unet").mkdir(parents=True)


@pytest.mark.slow
def test_killed_driver_generation_actor_and_training_worker_lose_no_work(
        ray_local, reference, tiny_pipeline_dir, toy_parquet, tmp_path, capfd):
    """One run, faulted at every stage, rerun each time with the same command:

    0. leftovers of writers killed during preparation, generation and publishing are on disk;
    1. the driver is killed during generation (its generation actor frozen at its first batch);
    2. rerun: a generation actor is killed while it still has batches to do (Ray Data restarts
       it and redoes them), then the training worker once a checkpoint is registered (Ray Train
       replaces it and resumes, ``train.max_failures``), then the driver once the replacement
       has registered a checkpoint of its own;
    3. rerun to the end: the prepared table and every opponent batch on disk are reused,
       training resumes from the last checkpoint, and theta_1 is bit for bit the reference's.
    """
    from spin_ray.self_play import run

    run_dir = tmp_path / "run"
    plant_leftovers_of_killed_writes(run_dir)
    own_job = ray_local.get_runtime_context().get_job_id()
    config = write_config(tmp_path / "config.yaml", tiny_pipeline_dir, toy_parquet, run_dir,
                          **{"cluster.address": ray_local.get_runtime_context().gcs_address})

    # 1. The driver, during generation.
    with Driver(config, tmp_path / "driver1.log", own_job) as first:
        _, generator = first.wait_for_actor(is_generator, "a generation actor")
        first.wait(lambda: opponent_files(run_dir), "the first opponent batch")
        freeze(generator)
        first.kill()
        kill(generator)
    prepared = snapshot(run_dir / "prepared")
    assert (run_dir / "prepared" / "DONE").is_file() and "data/shard_0.parquet" not in prepared
    after_first = modified_times(opponent_files(run_dir))
    assert 0 < len(after_first) < N_BATCHES

    # 2. A generation actor, the training worker, the driver.
    with Driver(config, tmp_path / "driver2.log", own_job) as second:
        generator_id, generator = second.wait_for_actor(is_generator, "a generation actor")
        second.wait(lambda: len(opponent_files(run_dir)) > len(after_first), "a new opponent batch")
        freeze(generator)
        at_generator_kill = len(opponent_files(run_dir))
        kill(generator)
        assert at_generator_kill < N_BATCHES, "generation finished before its actor could be killed"
        second.wait(lambda: actor_table()[generator_id]["NumRestarts"] >= 1, "Ray Data to restart the actor")
        second.wait(lambda: len(opponent_files(run_dir)) > at_generator_kill, "the restarted actor's batches")

        second.wait(lambda: registered_steps(run_dir), "the first checkpoint")
        _, worker = second.wait_for_actor(is_train_worker, "the training worker")
        freeze(worker)
        at_worker_kill, resumes = latest_step(run_dir), len(RESUMED.findall(second.log()))
        kill(worker)
        assert at_worker_kill < STEPS, "training finished before its worker could be killed"
        resumed_at = int(second.wait(lambda: RESUMED.findall(second.log())[resumes:], "the new worker to resume")[-1])
        second.wait(lambda: max(registered_steps(run_dir) or [0]) > resumed_at, "the new worker's checkpoint")
        _, worker = second.wait_for_actor(is_train_worker, "the new training worker")
        freeze(worker)
        at_driver_kill = latest_step(run_dir)
        second.kill()
        kill(worker)
        assert at_driver_kill < STEPS, "training finished before the driver could be killed"
    log = second.log()
    assert "prepared " not in log, "the prepared table was encoded again"
    assert not (run_dir / "iter_1" / "DONE").exists()
    assert len(actors_of(is_train_worker, second.job)) == 2, "exactly one worker group should be replaced"
    after_second = modified_times(opponent_files(run_dir))
    assert {name: after_second.get(name) for name in after_first} == after_first, "opponent batches were rewritten"

    # 3. To the end.
    capfd.readouterr()
    result = run(load_config(config))
    output = capfd.readouterr().out

    assert snapshot(run_dir / "prepared") == prepared and "prepared " not in output, "preparation was redone"
    after_third = modified_times(opponent_files(run_dir))
    assert {name: after_third.get(name) for name in after_second} == after_second, "opponent batches were rewritten"
    assert len(read_opponent_ids(run_dir)) == N_SAMPLES
    # The replaced worker group ran the pipeline again; the generator read back the batches
    # written before instead of generating them again, and the restarted actor its redone one.
    assert len(after_third) == N_BATCHES, f"batches generated twice: {sorted(after_third)}"
    # In this process the session's Ray keeps the workers' lines in its logs (quiet console):
    # the driver's own line says where training resumes.
    resumed_again = [int(step) for step in DRIVER_RESUMED.findall(output)]
    assert len(resumed_again) == 1 and resumed_at < resumed_again[0] < STEPS, (resumed_at, output[-3000:])
    assert (run_dir / "iter_1" / "DONE").is_file() and (run_dir / "iter_1" / "model" / "DONE").is_file()
    assert not list((run_dir / "iter_1").glob(".model.publish-*")), "the dead publish was not cleaned up"
    history = json.loads((run_dir / "iter_1" / "metrics.json").read_text())["history"]
    assert [m["step"] for m in history] == list(range(1, STEPS + 1))
    assert_same_weights(result.models["iter_1"], reference)
    print(f"opponent batches on disk: {len(after_first)} when the driver was killed, {at_generator_kill} when "
          f"the generation actor was, {len(after_second)} after the second driver, {len(after_third)} in all; "
          f"training worker killed after step {at_worker_kill}, resumed at step {resumed_at}, driver killed "
          f"after step {at_driver_kill}, resumed at step {resumed_again[0]}")


# ----------------------------------------------------------------------------- a batch file cut off


class WriterKilled(BaseException):
    """Stands for SIGKILL: nothing in the writer catches it, so no cleanup runs."""


def opponent_batch(first_id: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(first_id)
    return {
        "sample_id": np.arange(first_id, first_id + 2, dtype=np.int64),
        "noise_seed": np.arange(2, dtype=np.int64) + 100 * first_id,
        "latents_syn": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
        "ref_mse_syn": rng.random(2).astype(np.float32),
    }


def test_an_opponent_batch_cut_off_mid_write_is_never_read(tmp_path, monkeypatch):
    """No Ray cluster needed: spin_ray.opponents writes and reads."""
    import pyarrow.parquet

    from spin_ray.opponents import cached_files, write_batch

    folder = str(tmp_path / "opponents")
    good = [write_batch(folder, opponent_batch(i)) for i in (0, 2)]
    real_write_table = pyarrow.parquet.write_table

    def dies_halfway(table, where, **kwargs):
        real_write_table(table, where, **kwargs)
        where.truncate(where.tell() // 2)  # half the file reached the disk, then the process died
        raise WriterKilled

    monkeypatch.setattr(pyarrow.parquet, "write_table", dies_halfway)
    with pytest.raises(WriterKilled):
        write_batch(folder, opponent_batch(4))
    monkeypatch.undo()
    # An exception reaching the writer removes its temporary file (RunDir.open_atomic); a real
    # SIGKILL runs no cleanup and leaves it, half written, under the writer's temporary name.
    assert not [p for p in Path(folder).iterdir() if p.name.endswith(".tmp")]
    whole = Path(good[0]).read_bytes()
    (Path(folder) / f".{Path(good[0]).name.replace('-', '-killed-', 1)}.x1y2z3.tmp").write_bytes(
        whole[: len(whole) // 2])
    leftovers = [p for p in Path(folder).iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".part-") and leftovers[0].stat().st_size > 0

    files, ids = cached_files(folder)
    assert sorted(files) == sorted(good) and ids.tolist() == [0, 1, 2, 3]

    # The actor is restarted and the batch redone: a whole file now, read once. A batch
    # written twice (the actor died after its rename) is read once too.
    redone = write_batch(folder, opponent_batch(4))
    write_batch(folder, opponent_batch(2))
    files, ids = cached_files(folder)
    assert ids.tolist() == [0, 1, 2, 3, 4, 5] and len(files) == 3 and redone in files
    rows = pq.read_table(files).to_pydict()
    assert sorted(rows["sample_id"]) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.asarray(pq.read_table(redone).column("latents_syn").to_pylist()),
                                  opponent_batch(4)["latents_syn"])
