"""The evaluation pipeline's pure parts, its actors called directly, and its driver logic
(caching, reports, object-store run dirs) with the Ray pipeline replaced by a stand-in."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from spin_ray.config import ConfigError, load_config
from spin_ray.eval import checks, score_cache, scoring
from spin_ray.eval import run as eval_run
from spin_ray.eval.checks import resolve_model
from spin_ray.eval.figures import iteration_series, reference_images, self_play_order, training_histories
from spin_ray.eval.metrics import AVERAGE, Summary
from spin_ray.eval.prompt_sets import load_prompts, prompt_set_names, prompt_set_paths
from spin_ray.eval.report import choose_baseline
from spin_ray.eval.rows import (
    IMAGE_COLUMN,
    ROW_COLUMNS,
    gather_scores,
    grid_images,
    image_seed,
    png_bytes,
    prompt_rows,
)
from spin_ray.eval.scoring import EvalImageGenerator, ImageSpec, ScorerActor, ScorerSpec, scorer_kwargs
from spin_ray.rundir import RunDir
from spin_ray.toy.reward import ToyScorer

# ----------------------------------------------------------------------------- seeds and rows


def test_image_seeds_are_fixed_distinct_and_depend_on_the_eval_seed():
    seeds = {(p, i): image_seed(0, p, i) for p in range(20) for i in range(5)}
    assert len(set(seeds.values())) == 100
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert image_seed(0, 3, 4) == seeds[(3, 4)]  # a pure function of (seed, prompt, image)
    assert image_seed(1, 3, 4) != seeds[(3, 4)]
    assert image_seed(0, 4, 3) != seeds[(3, 4)]


def test_prompt_rows_are_prompt_major_with_one_seed_per_image():
    rows = prompt_rows(["a cat", "a dog"], num_images=3, eval_seed=7)
    assert [(r["prompt_index"], r["prompt"], r["image_index"]) for r in rows] == [
        (0, "a cat", 0), (0, "a cat", 1), (0, "a cat", 2), (1, "a dog", 0), (1, "a dog", 1), (1, "a dog", 2)]
    assert [r["seed"] for r in rows] == [image_seed(7, r["prompt_index"], r["image_index"]) for r in rows]


# ----------------------------------------------------------------------------- gathering


def _shuffled_columns(scores: dict[str, np.ndarray], seed: int = 0) -> dict[str, list]:
    """Rows of (P, N) score arrays in a random order, as the pipeline returns them."""
    num_prompts, num_images = next(iter(scores.values())).shape
    cells = [(p, i) for p in range(num_prompts) for i in range(num_images)]
    order = np.random.default_rng(seed).permutation(len(cells))
    columns: dict[str, list] = {"prompt_index": [], "image_index": []}
    for name in scores:
        columns[name] = []
    for k in order:
        p, i = cells[k]
        columns["prompt_index"].append(p)
        columns["image_index"].append(i)
        for name, array in scores.items():
            columns[name].append(float(array[p, i]))
    return columns


def test_gather_scores_puts_every_row_back_in_its_cell():
    expected = {"toy": np.arange(12, dtype=np.float32).reshape(4, 3), "other": -np.arange(12.0).reshape(4, 3)}
    gathered = gather_scores(_shuffled_columns(expected), ["toy", "other"], num_prompts=4, num_images=3)
    np.testing.assert_array_equal(gathered["toy"], expected["toy"])
    np.testing.assert_array_equal(gathered["other"], expected["other"])
    assert gathered["toy"].dtype == np.float32


def test_gather_scores_rejects_missing_or_repeated_cells_and_columns():
    columns = _shuffled_columns({"toy": np.zeros((2, 2))})
    repeated = {name: values[:-1] + values[:1] for name, values in columns.items()}
    with pytest.raises(ValueError, match="exactly once"):
        gather_scores(repeated, ["toy"], 2, 2)
    with pytest.raises(ValueError, match="outside 2 prompts x 1 images"):
        gather_scores(columns, ["toy"], 2, 1)
    with pytest.raises(ValueError, match=r"lack the columns \['pickscore'\]"):
        gather_scores(columns, ["toy", "pickscore"], 2, 2)


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grid_images_are_image_zero_of_the_first_prompts_in_prompt_order():
    columns = {"prompt_index": [1, 0, 0, 2], "image_index": [0, 1, 0, 0],
               IMAGE_COLUMN: [_png((0, 255, 0)), b"", _png((255, 0, 0)), b""]}
    images = grid_images(columns, num_prompts=2)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 255, 0)]
    with pytest.raises(ValueError, match=r"prompts \[2\]"):
        grid_images(columns, num_prompts=3)


# ----------------------------------------------------------------------------- ordering and naming


def test_self_play_order_sorts_iterations_and_finds_the_sft_baseline():
    assert self_play_order(["base", "sft", "iter_2", "iter_1"]) == (["base", "iter_1", "iter_2"], "sft")
    assert self_play_order(["base", "spin_iter_1", "spin_iter_2"]) == (["base", "spin_iter_1", "spin_iter_2"], None)
    assert self_play_order(["base", "iter_1", "iter_3"]) is None  # a gap: no x-axis position for iter_3
    assert self_play_order(["iter_1", "iter_2"]) is None  # no iteration 0
    assert self_play_order(["base", "other"]) is None
    assert self_play_order(["base", "iter_1", "spin_iter_1"]) is None  # iteration 1 twice


def _interval(mean: float, median: float = 0.0) -> Summary:
    return Summary(mean, median, std=0.1, n=3, ci_low=mean - 0.05, ci_high=mean + 0.1)


def test_iteration_series_plots_spin_across_iterations_and_sft_as_one_point():
    summaries = {
        "base": {"toy": _interval(0.1), AVERAGE: _interval(0.1)},
        "sft": {"toy": _interval(0.2), AVERAGE: _interval(0.2)},
        "iter_1": {"toy": _interval(0.3), AVERAGE: _interval(0.3)},
        "iter_2": {"toy": _interval(0.5, 0.9), AVERAGE: _interval(0.5, 0.9)},
    }
    series = iteration_series(summaries)
    assert list(series) == ["toy"]  # one scorer: its Average would repeat it
    spin, sft = series["toy"]["spin"], series["toy"]["sft"]
    assert (list(spin.x), spin.y, spin.connect) == ([0, 1, 2], [0.1, 0.3, 0.5], True)
    assert spin.low == pytest.approx([0.05, 0.25, 0.45]) and spin.high == pytest.approx([0.2, 0.4, 0.6])
    # SFT: a single marked point beside the last iteration, not a line across iterations.
    assert len(sft.x) == len(sft.y) == 1 and not sft.connect
    assert 2 < sft.x[0] < 2.5 and sft.y == [0.2] and sft.low == pytest.approx([0.15])
    assert "SFT" in sft.label
    median = iteration_series(summaries, "median")["toy"]["spin"]
    assert median.y == [0.0, 0.0, 0.9] and median.low is None  # the interval is the mean's
    assert iteration_series({"a": summaries["base"], "b": summaries["sft"]}) == {}
    two_scorers = {name: {"x": row["toy"], "y": row["toy"], AVERAGE: row["toy"]} for name, row in summaries.items()}
    assert list(iteration_series(two_scorers)) == ["x", "y", AVERAGE]
    assert "sft" not in iteration_series({k: v for k, v in summaries.items() if k != "sft"})["toy"]


def test_reference_images_render_toy_prompts_with_a_fixed_seed_per_column():
    prompts = ["a red circle on a blue background", "a small green square at the left on a white background"]
    images = reference_images(prompts, resolution=32, eval_seed=0)
    assert [image.size for image in images] == [(32, 32)] * 2
    again = reference_images(prompts, resolution=32, eval_seed=0)
    assert [image.tobytes() for image in images] == [image.tobytes() for image in again]
    assert images[0].getpixel((0, 0))[2] > 150  # a blue background
    assert reference_images(["a photo of a cat", *prompts], resolution=32, eval_seed=0) is None


def test_training_histories_read_the_stages_of_the_evaluated_models(tmp_path):
    run = RunDir(tmp_path)
    run.write_json_atomic("iter_2/metrics.json", {"history": [{"step": 1, "loss": 0.6}]})
    run.write_json_atomic("iter_1/metrics.json", {"history": [{"step": 1, "loss": 0.7, "implicit_acc": 0.5}]})
    run.write_json_atomic("baseline_sft/metrics.json", {"history": [{"step": 1, "loss": 0.1}]})
    run.write_text_atomic("iter_3/metrics.json", "not json")
    histories = training_histories(run, ["base", "iter_2", "iter_1", "sft", "iter_3", "iter_4"])
    assert list(histories) == ["sft", "iter_1", "iter_2"]
    assert histories["iter_1"] == [{"step": 1, "loss": 0.7, "implicit_acc": 0.5}]
    assert training_histories(run, ["base", "other"]) == {}


def test_baseline_is_the_configured_model_or_else_the_first():
    assert choose_baseline("base", ["iter_1", "base"]) == "base"
    assert choose_baseline("base", ["sd15", "spin"]) == "sd15"


def test_prompt_set_names_are_short_unique_and_safe():
    paths = ["toy", "/a/pickapic_v2_test_unique.parquet", "/b/PartiPrompts.tsv", "/c/hpsv2 benchmark/",
             "/d/PartiPrompts.tsv"]
    assert prompt_set_names(paths) == ["toy", "pickapic_v2_test_unique", "PartiPrompts", "hpsv2_benchmark",
                                       "PartiPrompts_2"]


def test_scorer_options_from_the_config_strings_become_numbers():
    kwargs = scorer_kwargs({"batch_size": "4", "colour_sigma": "0.2", "clip_path": "/w/clip"}, "cpu", 16)
    assert kwargs == {"device": "cpu", "batch_size": 4, "colour_sigma": 0.2, "clip_path": "/w/clip"}
    assert scorer_kwargs({}, "cuda", 16) == {"device": "cuda", "batch_size": 16}


# ----------------------------------------------------------------------------- config errors


def test_run_evaluation_without_models_names_the_key_before_starting_ray(monkeypatch):
    import spin_ray.ray_session

    started = []
    monkeypatch.setattr(spin_ray.ray_session, "ensure_ray", lambda *a, **k: started.append(a))
    cfg = load_config(None, ["eval.prompts=toy"])
    with pytest.raises(ConfigError, match="eval.models"):
        eval_run.run_evaluation(cfg)
    assert started == []


def test_unknown_scorers_and_missing_prompts_are_config_errors(tiny_pipeline_dir):
    models = [f"eval.models={json.dumps({'base': str(tiny_pipeline_dir)})}"]
    with pytest.raises(ConfigError, match=r"eval.scorers: unknown scorers \['clipscore'\]"):
        eval_run.run_evaluation(load_config(None, models + ["eval.prompts=toy", "eval.scorers=[clipscore]"]))
    with pytest.raises(ConfigError, match="eval.prompts"):
        eval_run.run_evaluation(load_config(None, models + ["eval.scorers=[toy]"]))


def test_resolve_model_checks_local_directories_and_passes_hub_ids(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_pipeline_dir.parent)
    assert resolve_model("base", tiny_pipeline_dir.name) == str(tiny_pipeline_dir.resolve())
    assert resolve_model("base", "stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert resolve_model("base", "s3://bucket/run/iter_1/model") == "s3://bucket/run/iter_1/model"
    with pytest.raises(ConfigError, match=r"eval.models.spin: .* model_index.json"):
        resolve_model("spin", str(tmp_path))
    with pytest.raises(ConfigError, match="eval.models.spin"):
        resolve_model("spin", "runs/missing/iter_1/model")
    # A bare name is a missing local directory here, as in the loaders (spin_ray.diffusion.is_hub_id).
    with pytest.raises(ConfigError, match="eval.models.spin: my-model is not a diffusers pipeline directory"):
        resolve_model("spin", "my-model")


# ----------------------------------------------------------------------------- the actors, called directly


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.asarray([row[name] for row in rows], dtype=object if name == "prompt" else np.int64)
            for name in rows[0]}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_generator_images_depend_on_the_seed_not_on_the_batch(tiny_pipeline_dir):
    generator = EvalImageGenerator(ImageSpec(model=str(tiny_pipeline_dir), resolution=128, num_inference_steps=2,
                                             guidance_scale=2.0, device="cpu"))
    rows = prompt_rows(load_prompts("toy", 2), num_images=2, eval_seed=0)
    together = generator(_batch(rows))
    alone = generator(_batch(rows[3:]))
    assert list(together["prompt_index"]) == [0, 0, 1, 1] and list(together["image_index"]) == [0, 1, 0, 1]
    first = _pixels(together[IMAGE_COLUMN][0])
    assert first.shape == (128, 128, 3)
    assert np.abs(_pixels(together[IMAGE_COLUMN][3]) - _pixels(alone[IMAGE_COLUMN][0])).max() <= 1
    assert np.abs(first - _pixels(together[IMAGE_COLUMN][1])).max() > 1  # another seed, another image


def test_scorer_actor_adds_one_column_per_scorer_and_keeps_only_grid_images():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    prompts = ["a red circle on a blue background"] * 2 + ["a green square on a white background"] * 2
    batch = _batch(prompt_rows(prompts[::2], num_images=2, eval_seed=0))
    batch["prompt"] = np.asarray(prompts, dtype=object)
    batch[IMAGE_COLUMN] = np.asarray([png_bytes(image) for image in images], dtype=object)
    actor = ScorerActor(ScorerSpec(scorers=("toy",), options={"toy": {"colour_sigma": "0.2"}}, grid_prompts=1,
                                   device="cpu"))
    out = actor(batch)
    expected = ToyScorer(colour_sigma=0.2).score(images, prompts)
    np.testing.assert_allclose(out["toy"], expected, rtol=1e-6)
    assert out["toy"].dtype == np.float32
    assert [len(raw) > 0 for raw in out[IMAGE_COLUMN]] == [True, False, False, False]
    assert list(out["seed"]) == list(batch["seed"])


# ----------------------------------------------------------------------------- driver logic, Ray replaced


class FakePipeline:
    """Stands in for :func:`scoring.generate_and_score`: scores are a function of the model
    name's position and the cell, images are flat colours; counts its calls."""

    def __init__(self, model_rank: dict[str, int], scorers: list[str]):
        self.model_rank = model_rank
        self.scorers = scorers
        self.calls: list[str] = []

    def __call__(self, model, prompts, cfg):
        self.calls.append(model)
        rank = self.model_rank[model]
        rows = prompt_rows(prompts, cfg.eval.num_images_per_prompt, cfg.eval.seed)
        columns = {name: [row[name] for row in rows] for name in ROW_COLUMNS}
        for k, name in enumerate(self.scorers):
            columns[name] = [np.float32(rank + 0.1 * row["image_index"] + 0.01 * k) for row in rows]
        columns[IMAGE_COLUMN] = [_png((40 * rank, 0, 0)) if row["image_index"] == 0 else b""
                                          for row in rows]
        return pa.table(columns)


@pytest.fixture
def memory_run():
    url = f"memory://eval-{uuid.uuid4().hex[:8]}"
    run = RunDir(url)
    yield run
    run.fs.rm(run.fs_path(), recursive=True)


def _self_play_cfg(**overrides):
    values = {"eval.prompts": "toy", "eval.max_prompts": 3, "eval.scorers": ["toy"],
              "eval.num_images_per_prompt": 2, "model.resolution": 32, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_evaluate_models_writes_the_report_to_an_object_store_and_reuses_scores(memory_run, monkeypatch):
    models = {"base": "/m/base", "sft": "/m/sft", "iter_1": "/m/iter_1", "iter_2": "/m/iter_2"}
    fake = FakePipeline({path: rank for rank, path in enumerate(models.values())}, ["toy"])
    monkeypatch.setattr(scoring, "generate_and_score", fake)
    cfg = _self_play_cfg()
    for stage in ("baseline_sft", "iter_1", "iter_2"):  # as run_stage leaves them
        memory_run.write_json_atomic(f"{stage}/metrics.json", {"history": [
            {"step": s, "loss": 0.5 / s, "implicit_acc": 0.5 + 0.1 * s, "margin": 0.01 * s} for s in (1, 2, 3)]})

    summaries = eval_run.evaluate_models(cfg, memory_run, models)

    # best-of-2 always picks image 1 (0.1 higher): toy = rank + 0.1 for every prompt.
    table = summaries["toy"]
    assert list(table) == list(models)
    for rank, model in enumerate(models):
        assert table[model]["toy"].mean == pytest.approx(rank + 0.1)
        assert table[model][AVERAGE].median == pytest.approx(rank + 0.1)
    metrics = json.loads(memory_run.read_text("report/metrics.json"))
    assert metrics["baseline"] == "base"
    assert metrics["win_rates"]["iter_2"]["toy"]["win_rate"] == 1.0
    assert metrics["metadata"]["best_indices"]["iter_1"] == [1, 1, 1]
    for name in ["report.md", "metrics.png", "image_grid.png", "toy_over_iterations.png", "training_curves.png"]:
        assert memory_run.exists(f"report/{name}"), name
    assert not memory_run.exists("report/average_over_iterations.png")  # one scorer: it would repeat toy's
    report_md = memory_run.read_text("report/report.md")
    assert "geometric mean" in report_md and "n = 3 prompts x 2 images per prompt" in report_md
    assert "](training_curves.png)" in report_md and "| average" not in report_md
    assert metrics["summaries"]["iter_1"]["toy"]["n"] == 3
    with Image.open(io.BytesIO(memory_run.fs.cat_file(memory_run.fs_path("report/image_grid.png")))) as grid:
        # Toy prompts: a real-data row above the 4 models' rows, 256 px each.
        assert (grid.size[1] - 5 * 256) > 0 and (grid.size[1] - 5 * 256) < 256
    assert memory_run.is_done("eval/iter_2")
    assert memory_run.read_done("eval/iter_2")["num_rows"] == 6

    # A rerun reads the stored scores; changing a setting the scores depend on redoes them.
    fake.calls.clear()
    assert eval_run.evaluate_models(cfg, memory_run, models) == summaries
    assert fake.calls == []
    eval_run.evaluate_models(_self_play_cfg(**{"eval.seed": 1}), memory_run, {"base": "/m/base"})
    assert fake.calls == ["/m/base"]


def test_several_prompt_sets_get_one_report_each(tmp_path, monkeypatch):
    prompt_file = tmp_path / "mine.txt"
    prompt_file.write_text("a red circle on a blue background\na green square on a white background\n")
    fake = FakePipeline({"/m/a": 0, "/m/b": 1}, ["toy"])
    monkeypatch.setattr(scoring, "generate_and_score", fake)
    cfg = _self_play_cfg(**{"eval.prompts": ["toy", str(prompt_file)], "eval.baseline": "b"})
    run = RunDir(tmp_path / "run")

    summaries = eval_run.evaluate_models(cfg, run, {"a": "/m/a", "b": "/m/b"})

    assert list(summaries) == ["toy", "mine"]
    mine = json.loads((tmp_path / "run/report/mine/metrics.json").read_text())
    assert mine["metadata"]["num_prompts"] == 2 and mine["baseline"] == "b"
    assert mine["win_rates"]["a"]["toy"]["win_rate"] == 0.0
    assert (tmp_path / "run/report/toy/image_grid.png").is_file()
    assert (tmp_path / "run/eval/mine/a/DONE").is_file()
    assert not (tmp_path / "run/report/mine/toy_over_iterations.png").exists()  # not self-play models


class ScaleMismatchPipeline:
    """Stands in for :func:`scoring.generate_and_score` with scorers on different scales:
    pickscore (~100x larger) prefers image 0, toy and aesthetic prefer image 1. The plain
    average picks image 0 ((300 + 0 + 0) / 3 > (100 + 1 + 1) / 3); the z-scored average picks
    image 1 (each scorer's z-scores are +-1: -1/3 against +1/3)."""

    def __call__(self, model, prompts, cfg):
        rows = prompt_rows(prompts, cfg.eval.num_images_per_prompt, cfg.eval.seed)
        columns = {name: [row[name] for row in rows] for name in ROW_COLUMNS}
        first = [row["image_index"] == 0 for row in rows]
        columns["pickscore"] = [np.float32(300.0 if f else 100.0) for f in first]
        columns["toy"] = [np.float32(0.0 if f else 1.0) for f in first]
        columns["aesthetic"] = [np.float32(0.0 if f else 1.0) for f in first]
        columns[IMAGE_COLUMN] = [_png((0, 0, 0)) if f else b"" for f in first]
        return pa.table(columns)


@pytest.mark.parametrize(("normalise", "best"), [(False, 0), (True, 1)])
def test_normalise_average_reaches_the_best_of_n_choice_of_the_evaluation(tmp_path, monkeypatch, normalise, best):
    monkeypatch.setattr(scoring, "generate_and_score", ScaleMismatchPipeline())
    cfg = _self_play_cfg(**{"eval.scorers": ["pickscore", "toy", "aesthetic"], "eval.normalise_average": normalise})
    run = RunDir(tmp_path / "run")

    summaries = eval_run.evaluate_models(cfg, run, {"base": "/m/base"})

    metrics = json.loads(run.read_text("report/metrics.json"))
    assert metrics["metadata"]["normalise_average"] is normalise
    assert metrics["metadata"]["best_indices"]["base"] == [best] * 3
    row = summaries["toy"]["base"]
    assert row["pickscore"].mean == pytest.approx([300.0, 100.0][best])
    assert row["toy"].mean == pytest.approx(float(best)) and row["aesthetic"].mean == pytest.approx(float(best))


@pytest.mark.parametrize(("normalise", "average"), [(False, 100.0), (True, 34.0)])
def test_normalise_average_reaches_the_sweeps_held_out_score(tmp_path, monkeypatch, normalise, average):
    from spin_ray import sweep
    from spin_ray.sweep import AVERAGE_METRIC

    fake = ScaleMismatchPipeline()
    monkeypatch.setattr(scoring, "generate_and_score", fake)  # under score_cache.model_scores, as the sweep calls it
    cfg = _self_play_cfg(**{"eval.scorers": ["pickscore", "toy", "aesthetic"], "eval.normalise_average": normalise,
                            "eval.selection_prompts": "toy_selection"})  # what a sweep ranks on
    # best-of-2 is image 0 by the plain average: (300 + 0 + 0) / 3; image 1 by z-scores: (100 + 1 + 1) / 3
    score = sweep.score_model(cfg, RunDir(tmp_path / "run"), "eval/x", "iter_1/model", AVERAGE_METRIC)
    assert score == pytest.approx(average)


def test_stored_scores_are_redone_after_the_model_is_republished(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "unet.bin").write_bytes(b"theta_1")
    model = run.publish_dir(weights, "iter_1/model")
    fake = FakePipeline({model: 0}, ["toy"])
    monkeypatch.setattr(scoring, "generate_and_score", fake)
    cfg = _self_play_cfg()
    prompts = load_prompts("toy", 3)

    score_cache.model_scores(cfg, run, "eval/iter_1", model, prompts)
    score_cache.model_scores(cfg, run, "eval/iter_1", model, prompts)
    assert fake.calls == [model]  # the second call read the stored scores
    first_version = run.read_done("eval/iter_1")["fingerprint"]["model_version"]
    assert first_version == run.read_done("iter_1/model")["publish_id"]

    # Iteration 1 retrained and published again at the same path: a new publish id, new scores.
    run.fs.rm(run.fs_path("iter_1/model"), recursive=True)
    assert run.publish_dir(weights, "iter_1/model") == model
    score_cache.model_scores(cfg, run, "eval/iter_1", model, prompts)
    assert fake.calls == [model, model]
    assert run.read_done("eval/iter_1")["fingerprint"]["model_version"] == run.read_done("iter_1/model")["publish_id"]
    assert run.read_done("eval/iter_1")["fingerprint"]["model_version"] != first_version


def test_reused_scores_are_said(tmp_path, monkeypatch, capsys):
    run = RunDir(tmp_path / "run")
    fake = FakePipeline({"/m/base": 0}, ["toy"])
    monkeypatch.setattr(scoring, "generate_and_score", fake)
    cfg = _self_play_cfg()
    prompts = load_prompts("toy", 3)

    score_cache.model_scores(cfg, run, "eval/base", "/m/base", prompts)
    assert "reused" not in capsys.readouterr().out
    score_cache.model_scores(cfg, run, "eval/base", "/m/base", prompts)
    assert capsys.readouterr().out == "[eval] eval/base: stored scores reused (6 images; same settings and model version)\n"


# ----------------------------------------------------------------------------- shipped configs


def test_eval_paper_config_is_the_papers_protocol_with_loader_ready_paths():
    import inspect

    from spin_ray.rewards.aesthetic import load_aesthetic

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "eval_paper.yaml")
    e = cfg.eval
    assert (e.num_images_per_prompt, e.guidance_scale, e.num_inference_steps) == (5, 7.5, 50)
    assert cfg.model.resolution == 512 and not e.normalise_average
    assert sorted(e.scorers) == ["aesthetic", "hpsv2", "imagereward", "pickscore"]
    assert list(e.models) == ["base", "spin_iter_1"] and e.baseline == "base"
    assert prompt_set_names(prompt_set_paths(e.prompts)) == [
        "pickapic_v2_test_unique", "PartiPrompts", "hpsv2_benchmark"]
    assert e.scorer_paths["hpsv2"].endswith("HPS_v2_compressed.pt")  # HPSv2.0, as in the paper
    # Every scorer gets its weights, and only through keywords its loader takes.
    assert set(e.scorer_paths) | set(e.scorer_options) == set(e.scorers)
    assert set(e.scorer_options["aesthetic"]) <= set(inspect.signature(load_aesthetic).parameters)


def test_eval_toy_config_evaluates_the_default_runs_models_on_the_toy_world():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "eval_toy.yaml")
    assert cfg.eval.scorers == ["toy"] and cfg.eval.prompts == "toy" and cfg.model.resolution == 32
    assert self_play_order(list(cfg.eval.models)) == (["base", "iter_1", "iter_2"], "sft")


def test_a_model_in_an_object_store_run_dir_is_fetched_by_the_actor(memory_run, tiny_pipeline_dir):
    memory_run.publish_dir(tiny_pipeline_dir, "iter_1/model")
    url = memory_run.path("iter_1", "model")
    local = Path(scoring._local_model(url))
    assert (local / "model_index.json").read_text() == (tiny_pipeline_dir / "model_index.json").read_text()
    assert scoring._local_model(url) == str(local)  # the second actor reuses the copy
    assert score_cache._model_version(url) == memory_run.read_done("iter_1/model")["publish_id"]
    assert scoring._local_model(str(tiny_pipeline_dir)) == str(tiny_pipeline_dir)
    # evaluate_models hands the actors the run's own finished models by URL, others as they are.
    memory_run.mark_done("iter_1", {})
    assert checks.published_location(memory_run, "iter_1", "/tmp/driver-copy") == url
    assert checks.published_location(memory_run, "iter_2", "/m/iter_2") == "/m/iter_2"
