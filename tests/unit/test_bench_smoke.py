"""The CPU benchmarks run end to end at their smallest settings and end with a parseable JSON line.

No timing assertions (machines are noisy); the checks are on the structure and on figures that
do not depend on time: sampler agreement with stock diffusers, FLOP accounting, memory keys.
The Ray iteration bench runs only its plain variant here (it still starts Ray and prepares the
real table with Ray Data; marked slow); the streaming pipeline it compares against is
spin_ray.self_play.run, which the integration tests run.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    """Import ``bench.<name>`` from the repository root (bench/ is not an installed package)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return lambda name: importlib.import_module(f"bench.{name}")


@pytest.fixture
def workdir(tmp_path: Path, tiny_pipeline_dir: Path) -> Path:
    """A bench work dir that already holds the session's tiny pipeline (same seed and size)."""
    (tmp_path / "tiny_pipeline").symlink_to(tiny_pipeline_dir, target_is_directory=True)
    return tmp_path


def last_json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.strip()]
    return json.loads(lines[-1])


def positive_finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values.values())


def test_generation_bench(bench, workdir, capsys):
    generation = bench("generation")
    returned = generation.main(["--size", "tiny", "--device", "cpu", "--batch-size", "1", "--steps", "2",
                                "--warmup", "0", "--repeats", "1", "--workdir", str(workdir)])
    record = last_json_line(capsys.readouterr().out)
    assert record == json.loads(json.dumps(returned, sort_keys=True))
    assert record["bench"] == "generation" and record["batch_size"] == 1 and record["steps"] == 2
    assert set(record["images_per_s"]) == {"stock_latent", "stock_decode", "ours", "ours_fast", "generator"}
    assert positive_finite(record["images_per_s"])
    assert record["ratio_vs_stock_latent"]["stock_latent"] == 1.0
    # same UNet, seeds, steps and guidance: our sampler reproduces diffusers' latents
    assert record["max_abs_diff_vs_stock"]["ours"] < 1e-4
    assert record["max_abs_diff_vs_stock"]["ours_fast"] < 1e-3
    # guidance on: two UNet sample-forwards per step
    assert record["tflop_per_image"] == pytest.approx(2 * 2 * record["tflop_per_forward"])
    assert record["mfu"]["ours"] is None  # no peak FLOP/s known for a CPU


def test_generation_bench_mfu_with_a_given_peak(bench, workdir, capsys):
    generation = bench("generation")
    generation.main(["--size", "tiny", "--device", "cpu", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--variants", "ours", "--peak-tflops", "1", "--workdir", str(workdir)])
    record = last_json_line(capsys.readouterr().out)
    assert set(record["images_per_s"]) == {"stock_latent", "ours"}
    expected = record["tflop_per_image"] * record["images_per_s"]["ours"] / 1.0
    assert record["mfu"]["ours"] == pytest.approx(expected)


def test_generation_bench_drops_a_variant_that_cannot_compile(bench, workdir, capsys, monkeypatch):
    generation = bench("generation")
    prepare = generation.prepare_unet_for_inference

    def no_compiler(unet, device, *, dtype, channels_last=True, compile=False):
        if compile:
            raise RuntimeError("no C++ compiler")
        return prepare(unet, device, dtype=dtype, channels_last=channels_last)

    monkeypatch.setattr(generation, "prepare_unet_for_inference", no_compiler)
    generation.main(["--size", "tiny", "--device", "cpu", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--variants", "ours", "--compile", "--workdir", str(workdir)])
    record = last_json_line(capsys.readouterr().out)
    assert set(record["images_per_s"]) == {"stock_latent", "ours"}
    assert "no C++ compiler" in record["errors"]["ours_compiled"]


def test_train_step_bench(bench, workdir, capsys):
    train_step = bench("train_step")
    # --no-memory: the per-mode child processes take ~10 s each to import torch; measured below in-process
    train_step.main(["--size", "tiny", "--device", "cpu", "--batch-size", "1", "--warmup", "0", "--repeats", "1",
                     "--no-memory", "--workdir", str(workdir)])
    record = last_json_line(capsys.readouterr().out)
    assert record["bench"] == "train_step"
    assert set(record["samples_per_s"]) == {"precomputed", "online"}
    assert positive_finite(record["samples_per_s"])
    # the online reference adds theta_k's forward on both latents: 8 forwards' worth, against 6
    flops = record["tflop_per_sample"]
    assert flops["online"] == pytest.approx(flops["precomputed"] * 8 / 6)
    assert record["peak_memory_bytes"] is None and record["memory_saved_bytes"] is None
    assert record["reference_unet_bytes"] == record["policy_unet_bytes"] > 0


def test_train_step_peak_memory_measurement(bench, workdir):
    train_step = bench("train_step")
    args = train_step.parse_args(["--size", "tiny", "--device", "cpu", "--batch-size", "1", "--warmup", "0"])
    peak = train_step.peak_memory_child(vars(args), str(workdir), "online")
    assert 0 < peak <= train_step.peak_rss_bytes()  # VmHWM only grows


def test_scaling_model_balances_generation_and_training(bench, capsys):
    scaling = bench("scaling")
    # g = 1 image/s, s = 3 samples/s per GPU: the balanced split of 8 GPUs is G = 6, T = 2
    plan = scaling.plan_iteration(8, 600, gen_rate=1.0, train_rate=3.0, startup=10.0)
    assert (plan.gen_gpus, plan.train_gpus) == (6, 2)
    assert plan.seconds == pytest.approx(600 / 6 + 10)
    single = scaling.plan_iteration(1, 600, gen_rate=1.0, train_rate=3.0, startup=10.0)
    assert single.shared and single.seconds == pytest.approx(600 + 200 + 10)
    with pytest.raises(ValueError, match="positive rates"):
        scaling.plan_iteration(4, 600, gen_rate=0.0, train_rate=3.0, startup=0.0)

    # SD-1.5 FLOPs per item: 100 sampling forwards (+2 reference forwards when precomputed) per
    # opponent image; 6 forwards' worth (+2 when online) per training sample. The per-forward
    # figure itself is derived from the architecture in
    # test_fast_path.test_sd15_unet_flop_count_equals_the_count_derived_from_the_architecture.
    forward = scaling.SD15_TFLOP_PER_FORWARD
    assert scaling.sd15_tflop_per_item("precomputed") == pytest.approx((forward * 102, forward * 6))
    assert scaling.sd15_tflop_per_item("online") == pytest.approx((forward * 100, forward * 8))

    record = scaling.main(["--gpus", "1,8,64", "--samples", "1000"])
    assert last_json_line(capsys.readouterr().out)["bench"] == "scaling"
    assert [p["gpus"] for p in record["plans"]] == [1, 8, 64]
    times = [p["seconds"] for p in record["plans"]]
    assert times[0] > times[1] > times[2]
    assert record["balanced_gen_to_train_ratio"] == pytest.approx(
        record["train_samples_per_s_per_gpu"] / record["gen_images_per_s_per_gpu"])


@pytest.mark.slow
def test_iteration_bench_plain_variant(bench, tmp_path, capsys):
    iteration = bench("iteration")
    record = iteration.main(["--train-steps", "2", "--batch-size", "2", "--steps", "2", "--rows", "4",
                             "--variants", "plain", "--workdir", str(tmp_path)])
    assert last_json_line(capsys.readouterr().out) == json.loads(json.dumps(record, sort_keys=True))
    assert record["bench"] == "iteration" and record["samples"] == 4
    assert {"plain", "prepare", "ray_init"} <= set(record["seconds"])
    assert record["ratio_vs_plain"] == {"plain": 1.0}
    # the plain loop trained and published a model, and cached its 2 batches of opponents
    assert (tmp_path / "run" / "plain" / "model" / "model_index.json").is_file()
    assert len(list((tmp_path / "run" / "plain" / "opponents").glob("*.parquet"))) == 2


def test_toy_schedule_runs_spin_and_sft_without_ray(bench, capsys):
    """The Ray-free schedule trial at its smallest: base, SFT and one SPIN iteration scored."""
    results = bench("toy_schedule").main(["--iterations", "1", "--steps", "2", "--batch-size", "4", "--rows", "8",
                                          "--prompts", "2", "--sampler-steps", "2", "--sft",
                                          "--real-flaws", "0.6"])
    assert set(results) == {"base", "sft", "iter_1"}
    assert all(0.0 <= value <= 1.0 for value in results.values())
    assert last_json_line(capsys.readouterr().out)["toy_reward"] == results
