"""The report's Fig. 7: each stage's checkpoint scores on the selection prompts against the
training step (selection_curves.png), read from the stages' selection_curve.json."""

from __future__ import annotations

import numpy as np
from PIL import Image

from spin_ray.eval.figures import selection_curves, write_report_figures
from spin_ray.eval.metrics import Summary
from spin_ray.eval.plots import SELECTION_CURVES, Curve, plot_selection_curves
from spin_ray.eval.report_files import write_report
from spin_ray.eval.rows import png_bytes
from spin_ray.rundir import RunDir


def stage(rundir: RunDir, rel: str, steps: int, scores: dict[int, float] | None, published: int | None = None):
    rundir.write_json_atomic(rundir.stage_metrics(rel), {"steps": steps, "history": []})
    if scores is not None:
        rundir.write_json_atomic(rundir.stage_selection_curve(rel), {
            "metric": "average", "prompt_set": "toy_selection", "scorers": ["toy"], "steps": steps,
            "published_step": published or max(scores),
            "points": [{"step": s, "toy": v, "average": v} for s, v in scores.items()]})


def test_iterations_continue_the_step_axis_and_baselines_start_at_zero(tmp_path):
    rundir = RunDir(tmp_path / "run")
    stage(rundir, "baseline_sft", 6, {2: 0.5, 4: 0.7, 6: 0.6}, published=4)
    stage(rundir, "iter_1", 10, {5: 0.55, 10: 0.6})
    stage(rundir, "iter_2", 8, None)  # no checkpoints scored: no line, but its steps still shift iteration 3
    stage(rundir, "iter_3", 4, {4: 0.65})

    curves, metric, prompt_set = selection_curves(rundir, ["base", "sft", "iter_1", "iter_2", "iter_3"])

    assert list(curves) == ["sft", "iter_1", "iter_3"]
    assert (metric, prompt_set) == ("toy", "toy_selection")  # one scorer: the average is that scorer
    assert curves["sft"] == Curve(steps=[2, 4, 6], values=[0.5, 0.7, 0.6], published=4, offset=0)
    assert curves["iter_1"] == Curve(steps=[5, 10], values=[0.55, 0.6], published=10, offset=0)
    assert curves["iter_3"] == Curve(steps=[22], values=[0.65], published=22, offset=18)
    assert selection_curves(rundir, ["base", "iter_2"])[0] == {}


def test_the_figure_is_written_and_linked_from_the_report(tmp_path):
    rundir = RunDir(tmp_path / "run")
    stage(rundir, "baseline_sft", 6, {2: 0.5, 4: 0.7, 6: 0.6}, published=4)
    stage(rundir, "iter_1", 4, {2: 0.55, 4: 0.6})
    stage(rundir, "iter_2", 4, {2: 0.62, 4: 0.66})
    out = tmp_path / "report"
    image = png_bytes(Image.new("RGB", (32, 32), "white"))
    columns = {name: {"prompt_index": [0], "image_index": [0], "image": [image]}
               for name in ("base", "sft", "iter_1", "iter_2")}
    summaries = {name: {"toy": Summary(mean=0.5, median=0.5)} for name in columns}
    figures = write_report_figures(str(out), rundir, ["a red circle on a blue background"], columns, summaries,
                                   eval_seed=0, resolution=32)
    assert SELECTION_CURVES in figures and "selection prompts (toy_selection)" in figures[SELECTION_CURVES]
    with Image.open(out / SELECTION_CURVES) as image:
        assert image.size == (600, 380)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    colours = {(31, 119, 180), (255, 127, 14), (44, 160, 44)}  # matplotlib's C0, C1, C2: one line per stage
    assert all(((pixels - colour) ** 2).sum(axis=-1).min() == 0 for colour in colours)
    write_report(str(out), summaries, None, "base", {}, figures)
    assert f"![{SELECTION_CURVES}]({SELECTION_CURVES})" in (out / "report.md").read_text()


def test_nothing_is_drawn_without_points(tmp_path):
    assert plot_selection_curves(tmp_path, {}, "toy", "toy_selection") is None
    assert plot_selection_curves(tmp_path, {"sft": Curve(steps=[], values=[])}, "toy", "toy_selection") is None
    assert not (tmp_path / SELECTION_CURVES).exists()
