"""The Ray Train glue of spin_ray.trainer, without a Ray cluster.

The loop itself is tested in test_train_loop.py; here, what Ray adds: the report callback
hands ``ray.train.report`` the metrics on every rank and a checkpoint saved by rank 0 only,
and a worker resumes from the checkpoint Ray Train gives it. What one optimizer step applies
is checked through the real worker loop: accumulated micro-batches give one large batch's
gradient, and the learning rate follows the plan's schedule. Ray Train's own snapshot, cut
off by a kill, is set aside instead of failing every rerun. ``ray.train.report`` is replaced
by a recorder, and for the whole worker loop the rest of ``ray.train``'s per-worker API by a
single-worker stand-in; ``ray.train.Checkpoint.from_directory`` needs no cluster.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_tensors, make_plan, optimizer_tensors, pair_rows, weights

from spin_ray.train_loop import (
    STATE_FILE,
    CheckpointRequest,
    Optimization,
    TrainPlan,
    TrainState,
    optimizer_step,
)
from spin_ray.trainer import (
    RAY_SNAPSHOT_FILE,
    _restore,
    ray_report,
    set_aside_unreadable_snapshot,
    train_loop_per_worker,
)

CPU = torch.device("cpu")


class ReportRecorder:
    """Replaces ``ray.train.report``: keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.reports: list[tuple[dict, Path | None]] = []
        self.saved_paths: list[Path] = []

    def __call__(self, metrics: dict, checkpoint=None) -> None:
        saved = None
        if checkpoint is not None:
            saved = self.folder / f"checkpoint_{len(self.saved_paths) + 1}"
            shutil.copytree(checkpoint.path, saved)
            self.saved_paths.append(saved)
        self.reports.append((metrics, saved))


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> ReportRecorder:
    import ray.train

    recorder = ReportRecorder(tmp_path)
    monkeypatch.setattr(ray.train, "report", recorder)
    return recorder


# ----------------------------------------------------------------------------- the report callback


def test_ray_report_saves_a_checkpoint_on_rank_0_that_restore_reads_back(tiny_components, recorder, capsys):
    """Rank 0's checkpoint reaches ``ray.train.report``; :func:`_restore` puts theta, AdamW,
    the schedule and the state back into fresh objects from that Ray checkpoint."""
    import ray.train

    plan = make_plan()
    optim = Optimization.for_plan(tiny_components.unet, plan)
    for p in optim.model.parameters():
        p.grad = torch.full_like(p, 0.01)
    assert optimizer_step(optim, plan.max_grad_norm)
    state = TrainState(step=1, first_batch_time=1.5, history=[{"step": 1, "loss": 0.5}])
    ray_report(0)({"step": 1, "loss": 0.5}, CheckpointRequest(optim, state))

    [(metrics, saved)] = recorder.reports
    assert metrics == {"step": 1, "loss": 0.5} and json.loads((saved / STATE_FILE).read_text())["step"] == 1
    fresh = Optimization.for_plan(copy_of(tiny_components.unet, zeroed=True), plan)
    restored = _restore(ray.train.Checkpoint.from_directory(str(saved)), fresh)
    assert restored == state
    assert_same_tensors(weights(fresh.model), weights(optim.model))
    assert_same_tensors(optimizer_tensors(fresh.optimizer), optimizer_tensors(optim.optimizer))
    assert fresh.lr_scheduler.state_dict() == optim.lr_scheduler.state_dict()
    assert "resumed training from checkpoint at step 1" in capsys.readouterr().out
    assert _restore(None, fresh) == TrainState()


def copy_of(model: torch.nn.Module, *, zeroed: bool) -> torch.nn.Module:
    model = copy.deepcopy(model)
    if zeroed:
        for p in model.parameters():
            p.data.zero_()
    return model


def test_other_ranks_report_without_saving(recorder):
    """``ray.train.report`` is a barrier: every rank calls it, only rank 0 writes the checkpoint."""

    class Unsaveable:
        def save(self, path):
            raise AssertionError("only rank 0 saves")

    ray_report(1)({"step": 3}, Unsaveable())
    ray_report(0)({"step": 4}, None)
    assert recorder.reports == [({"step": 3}, None), ({"step": 4}, None)]


# ----------------------------------------------------------------------------- what a step applies


@pytest.fixture
def one_worker(monkeypatch, recorder, tiny_pipeline_dir):
    """Runs :func:`train_loop_per_worker` as the only worker of a Ray Train run, without Ray:
    ``ray.train``'s per-worker calls are replaced (rank 0 of 1, the CPU, the given checkpoint
    to resume from (default: none), a dataset shard that cuts the given rows into batches in
    order as ``iter_torch_batches(drop_last=True)`` does), ``ray.train.report`` by ``recorder``. Models
    load from the tiny pipeline (``plan.init_model_path`` is set to it); everything else is the
    production path: models, optimizer, schedule, step runner, accumulation, reports.

    Returns ``run(plan, rows, checkpoint=None) -> list of the optimizer steps seen``, each
    ``{"lr": the lr it ran at, "grads": the gradients it applied}``, taken by a global
    optimizer pre-step hook (after clipping, before the update).
    """
    import ray.train
    import ray.train.torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    class Context:
        def get_world_rank(self) -> int:
            return 0

        def get_world_size(self) -> int:
            return 1

    class Shard:
        def __init__(self, rows: dict[str, torch.Tensor]):
            self.rows = rows

        def iter_torch_batches(self, *, batch_size: int, drop_last: bool, device: torch.device):
            assert drop_last
            count = len(self.rows["sample_id"])
            for start in range(0, count - batch_size + 1, batch_size):
                yield {key: value[start:start + batch_size].to(device) for key, value in self.rows.items()}

    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    steps: list[dict] = []

    def record(optimizer, args, kwargs) -> None:
        steps.append({"lr": optimizer.param_groups[0]["lr"],
                      "grads": [p.grad.detach().clone() for group in optimizer.param_groups
                                for p in group["params"] if p.grad is not None]})

    def run(plan: TrainPlan, rows: dict[str, torch.Tensor], checkpoint=None) -> list[dict]:
        steps.clear()
        recorder.reports.clear()
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard(rows))
        train_loop_per_worker({"plan": replace(plan, init_model_path=str(tiny_pipeline_dir))})
        return list(steps)

    handle = register_optimizer_step_pre_hook(record)
    yield run
    handle.remove()


@pytest.mark.parametrize("loss_type", ["spin", "sft"])
def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_twice_as_large(
        one_worker, tiny_components, loss_type):
    """Both losses are means over the batch's rows, so for rows 1..2b split into halves A, B:

        grad L(A u B) = grad (1/2b) sum_i l_i = (1/2) grad L(A) + (1/2) grad L(B)

    (each row's l_i depends on its own row only: its seed fixes its t and eps, and the UNet
    treats the rows of a batch independently). With gradient_accumulation_steps = 2 the step
    runner backpropagates L(A)/2 and L(B)/2 into the same .grad, so the optimizer step must see
    the gradient of one batch of 2b. Without the division it would see twice that. The
    gradients are compared, not the updated weights: AdamW's first update is about
    lr * g / |g| per weight, the same for g and 2g, and clipping (off here, max_grad_norm=0)
    would rescale both to the same norm too. beta is small so that the SPIN logits stay near 0,
    where every row contributes a gradient (at beta 2000 the softplus saturates).
    """
    rows = pair_rows(tiny_components, 4)
    plan = make_plan(loss_type=loss_type, beta=20.0, steps=1, max_grad_norm=0.0, warmup_steps=0,
                     lr_schedule="constant", checkpoint_every=0)
    accumulated = one_worker(replace(plan, batch_size=2, gradient_accumulation_steps=2), rows)
    one_batch = one_worker(replace(plan, batch_size=4, gradient_accumulation_steps=1), rows)

    assert len(accumulated) == len(one_batch) == 1  # one optimizer step each
    grads_accumulated, grads_one_batch = accumulated[0]["grads"], one_batch[0]["grads"]
    assert len(grads_accumulated) == len(grads_one_batch) == len(list(tiny_components.unet.parameters()))
    total_norm = torch.stack([g.norm() for g in grads_one_batch]).norm()
    assert total_norm > 1e-3  # a real gradient, so a factor 2 cannot hide in zeros
    for g_acc, g_one in zip(grads_accumulated, grads_one_batch, strict=True):
        torch.testing.assert_close(g_acc, g_one, rtol=1e-4, atol=1e-6 * total_norm.item())


def lr_after(schedule: str, step: int, *, warmup: int, total: int) -> float:
    """Factor on the base lr after ``step`` optimizer steps: step/warmup during warm-up, then 1
    (``constant``) or (total - step) / (total - warmup), down to 0 at ``total`` (``linear``)."""
    if step < warmup:
        return step / warmup
    return 1.0 if schedule == "constant" else max(0.0, (total - step) / (total - warmup))


@pytest.mark.parametrize(("schedule", "used", "reported"), [
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25], [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_the_worker_loop_runs_each_step_at_the_plans_scheduled_lr(one_worker, recorder, tiny_components,
                                                                  schedule, used, reported):
    """6 steps, 2 of warm-up, base lr 1e-3: optimizer step k runs at lr x lr_after(k - 1) (the
    first warm-up step at 0, as diffusers' schedules start), and the lr reported after step k
    is the schedule's value after k steps, lr x lr_after(k): the lr step k + 1 will use."""
    base_lr, warmup, total = 1e-3, 2, 6
    plan = make_plan(lr=base_lr, steps=total, warmup_steps=warmup, lr_schedule=schedule, batch_size=1,
                     checkpoint_every=0, log_every=1)
    steps = one_worker(plan, pair_rows(tiny_components, total))

    assert used == [lr_after(schedule, k - 1, warmup=warmup, total=total) for k in range(1, total + 1)]
    assert reported == [lr_after(schedule, k, warmup=warmup, total=total) for k in range(1, total + 1)]
    assert [step["lr"] for step in steps] == pytest.approx([base_lr * f for f in used], abs=1e-12)
    assert [metrics["step"] for metrics, _ in recorder.reports] == list(range(1, total + 1))
    assert [metrics["lr"] for metrics, _ in recorder.reports] == pytest.approx(
        [base_lr * f for f in reported], abs=1e-12)


def test_a_worker_resumes_from_the_checkpoint_ray_train_gives_it(one_worker, recorder, tiny_components):
    """A worker restarted with Ray Train's checkpoint of step 1 trains steps 2 and 3 only, on
    the micro-batches after the ones it trained on, and ends where an uninterrupted run ends."""
    import ray.train
    from safetensors.torch import load_file

    rows = pair_rows(tiny_components, 3)
    plan = make_plan(beta=20.0, steps=3, batch_size=1, checkpoint_every=1, log_every=1)
    assert len(one_worker(plan, rows)) == 3
    first, last = recorder.saved_paths[0], recorder.saved_paths[-1]
    uninterrupted = load_file(last / "unet" / "diffusion_pytorch_model.safetensors")
    history = [json.loads(line) for line in (last / "metrics.jsonl").read_text().splitlines()]

    steps = one_worker(plan, rows, checkpoint=ray.train.Checkpoint.from_directory(str(first)))
    assert len(steps) == 2 and [m["step"] for m, _ in recorder.reports] == [2, 3]
    resumed = recorder.saved_paths[-1]
    assert_same_tensors(load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors"), uninterrupted)
    resumed_history = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed_history] == [m["step"] for m in history] == [1, 2, 3]
    assert resumed_history[0] == history[0]  # the restored history carries over unchanged


# ----------------------------------------------------------------------------- Ray Train's snapshot


@pytest.mark.parametrize("content", [b"", b'{"ray_version": "2.60.0", "checkpoint_results": [{"vers', b"\xff\xfe{"])
def test_a_snapshot_cut_off_mid_write_is_set_aside(tmp_path, content, capsys):
    """Ray Train rewrites its snapshot in place: a kill during the write leaves it empty or cut off."""
    (tmp_path / "iter_1").mkdir()
    (tmp_path / "iter_1" / RAY_SNAPSHOT_FILE).write_bytes(content)
    (tmp_path / "iter_1" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    aside = set_aside_unreadable_snapshot(str(tmp_path), "iter_1")
    assert aside is not None and Path(aside).parent == tmp_path / "iter_1"
    assert Path(aside).name.startswith(f"{RAY_SNAPSHOT_FILE}.unreadable-") and Path(aside).read_bytes() == content
    assert not (tmp_path / "iter_1" / RAY_SNAPSHOT_FILE).exists()
    assert (tmp_path / "iter_1" / "checkpoint_2026-01-01_00-00-00.000000").is_dir()  # nothing else is touched
    assert "this training starts over" in capsys.readouterr().out


def test_a_readable_or_missing_snapshot_is_left_alone(tmp_path):
    assert set_aside_unreadable_snapshot(str(tmp_path), "iter_1") is None
    (tmp_path / "iter_1").mkdir()
    snapshot = tmp_path / "iter_1" / RAY_SNAPSHOT_FILE
    snapshot.write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": []}))
    before = snapshot.stat().st_mtime_ns
    assert set_aside_unreadable_snapshot(str(tmp_path), "iter_1") is None
    assert snapshot.stat().st_mtime_ns == before and [p.name for p in (tmp_path / "iter_1").iterdir()] == [
        RAY_SNAPSHOT_FILE]


def test_a_snapshot_on_an_object_store_is_set_aside_too():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/run/iter_1/train/iter_1/" + RAY_SNAPSHOT_FILE, b'{"cut off')
    aside = set_aside_unreadable_snapshot("memory://bucket/run/iter_1/train", "iter_1")
    assert aside is not None and fs.cat_file(aside) == b'{"cut off'
    assert not fs.exists("/bucket/run/iter_1/train/iter_1/" + RAY_SNAPSHOT_FILE)
    fs.rm("/bucket/run", recursive=True)


def test_fit_sets_a_cut_off_snapshot_aside_before_ray_train_reads_it(tmp_path, monkeypatch):
    import ray.train.torch

    from spin_ray import trainer

    snapshot = tmp_path / "iter_1" / RAY_SNAPSHOT_FILE
    snapshot.parent.mkdir()
    snapshot.write_bytes(b'{"ray_version": "2.6')
    seen = {}

    class RecordingTrainer:
        def __init__(self, *args, **kwargs):
            seen["snapshot at construction"] = snapshot.exists()
            seen["name"] = kwargs["run_config"].name

        def fit(self):
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", RecordingTrainer)
    assert trainer.fit(make_plan(), None, name="iter_1", storage_path=str(tmp_path), num_workers=1,
                       use_gpu=False) == "result"
    assert seen == {"snapshot at construction": False, "name": "iter_1"}
    assert len(list(snapshot.parent.glob(f"{RAY_SNAPSHOT_FILE}.unreadable-*"))) == 1
