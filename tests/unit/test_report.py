"""Reports: files exist, the numbers in them are the ones given, images have the promised size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from spin_ray.eval.image_grid import IMAGE_GRID, save_image_grid, wrap_text
from spin_ray.eval.metrics import AVERAGE, Summary, WinRate
from spin_ray.eval.plots import (
    METRICS_PLOT,
    TRAINING_CURVES,
    Series,
    plot_metrics,
    plot_over_iterations,
    plot_training_curves,
    value_limits,
)
from spin_ray.eval.report_files import (
    DETAIL_INTERVALS,
    METRICS_JSON,
    REPORT_MARKDOWN,
    TABLE_MEAN,
    TABLE_MEDIAN,
    paper_columns,
    paper_rows,
    write_metrics_json,
    write_report,
)

SUMMARIES = {
    "sd15": {
        "hpsv2": Summary(0.2699, 0.2705),
        "aesthetic": Summary(5.7691, 5.8000),
        "imagereward": Summary(0.8159, 0.9000),
        "pickscore": Summary(21.1983, 21.2000),
        AVERAGE: Summary(7.0133, 7.0426),
    },
    "spin_iter3": {
        "hpsv2": Summary(0.2874, 0.2880),
        "aesthetic": Summary(6.2481, 6.2500),
        "imagereward": Summary(1.1274, 1.2000),
        "pickscore": Summary(22.0024, 22.0100),
        AVERAGE: Summary(7.4163, 7.4370),
    },
}
WIN_RATES = {
    "spin_iter3": {
        "hpsv2": WinRate(0.625, 0.25, 4),
        "aesthetic": WinRate(1.0, 0.0, 4),
        "imagereward": WinRate(0.5, 0.0, 4),
        "pickscore": WinRate(0.875, 0.25, 4),
        AVERAGE: WinRate(0.75, 0.0, 4),
    }
}


def _number_or_text(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


def parse_markdown_tables(text: str) -> dict[str, dict[str, dict[str, float | str]]]:
    """'## Title' -> row label -> column -> number (or the cell's text), for every table in the report."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
            tables[title] = {}
        elif line.startswith("|") and not re.fullmatch(r"\|(---\|)+", line):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                tables[title][cells[0]] = {column: _number_or_text(value)
                                          for column, value in zip(header[1:], cells[1:], strict=True)}
    return tables


def test_write_report_files_hold_the_given_numbers(tmp_path):
    paths = write_report(tmp_path, SUMMARIES, WIN_RATES, baseline="sd15", metadata={"iteration": 3})
    assert {path.name for path in paths.values()} == {METRICS_JSON, REPORT_MARKDOWN, METRICS_PLOT}

    payload = json.loads((tmp_path / METRICS_JSON).read_text())
    assert payload["baseline"] == "sd15"
    assert payload["metadata"] == {"iteration": 3}
    assert payload["summaries"]["sd15"][AVERAGE] == {"mean": 7.0133, "median": 7.0426}
    assert payload["summaries"]["spin_iter3"]["pickscore"]["mean"] == 22.0024
    assert payload["win_rates"]["spin_iter3"]["hpsv2"] == {"win_rate": 0.625, "tie_share": 0.25, "num_prompts": 4}

    tables = parse_markdown_tables((tmp_path / REPORT_MARKDOWN).read_text())
    assert set(tables) == {TABLE_MEAN, TABLE_MEDIAN, "Table 3: winning rate against sd15 (%)", "Figures",
                           DETAIL_INTERVALS, "Detail: ties against sd15 (%)"}
    headers = {"hpsv2": "HPS", "aesthetic": "Aesthetic", "imagereward": "ImageReward", "pickscore": "PickScore",
               AVERAGE: "Average"}
    rows = {"sd15": "Base (`sd15`)", "spin_iter3": "spin_iter3"}  # sd15 is the baseline: the Base row
    for statistic, title in (("mean", TABLE_MEAN), ("median", TABLE_MEDIAN)):
        assert list(tables[title]) == list(rows.values())
        for model, row in SUMMARIES.items():
            assert list(tables[title][rows[model]]) == list(headers.values())  # the paper's order, Average last
            for metric, summary in row.items():
                cell = tables[title][rows[model]][headers[metric]]
                assert cell == pytest.approx(getattr(summary, statistic), abs=5e-5)
    win_table = tables["Table 3: winning rate against sd15 (%)"]
    assert list(win_table) == list(rows.values())
    assert set(win_table["Base (`sd15`)"].values()) == {"-"}
    assert win_table["spin_iter3"] == {headers[m]: pytest.approx(100 * r.win_rate)
                                       for m, r in WIN_RATES["spin_iter3"].items()}
    assert tables["Detail: ties against sd15 (%)"]["spin_iter3"]["PickScore"] == pytest.approx(25.0)
    assert payload["paper_tables"] == {"rows": ["sd15", "spin_iter3"], "labels": rows,
                                       "columns": ["hpsv2", "aesthetic", "imagereward", "pickscore", AVERAGE]}


def test_json_without_win_rates(tmp_path):
    path = write_metrics_json(tmp_path / "nested", SUMMARIES)
    payload = json.loads(path.read_text())
    assert payload["win_rates"] == {} and payload["baseline"] is None
    assert not list((tmp_path / "nested").glob("*.tmp"))


def test_win_rates_need_the_baseline_name(tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        write_report(tmp_path, SUMMARIES, WIN_RATES)


def test_rows_with_different_metrics_are_rejected(tmp_path):
    broken = {"a": {"x": Summary(1.0, 1.0)}, "b": {"y": Summary(1.0, 1.0)}}
    with pytest.raises(ValueError, match="model 'b' has metrics \\['y'\\]"):
        write_report(tmp_path, broken)


def test_metrics_plot_has_one_panel_per_metric(tmp_path):
    path = plot_metrics(tmp_path, SUMMARIES, statistic="median")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (300 * 5, 350)
        # Something was drawn: the plot is not a blank canvas.
        assert np.asarray(image.convert("L")).std() > 10
    with pytest.raises(ValueError, match="statistic"):
        plot_metrics(tmp_path, SUMMARIES, statistic="max")


def test_iteration_plot(tmp_path):
    path = plot_over_iterations(tmp_path, {"spin": [21.2, 21.6, 21.9, 22.0], "sft": [21.2, 21.4]}, "pickscore")
    assert path.name == "pickscore_over_iterations.png"
    with Image.open(path) as image:
        assert image.size == (500, 350)


def test_image_grid_size_and_cells(tmp_path):
    colours = {"sd15": (255, 0, 0), "spin": (0, 0, 255)}
    prompts = ["a photo of a cat", "a very long prompt " * 10, "a bowl of fruit"]
    images = {model: [Image.new("RGB", (64, 64), colour)] * len(prompts) for model, colour in colours.items()}
    images["spin"][1] = Image.new("RGB", (64, 32), (0, 0, 255))  # non-square: padded, not cropped
    path = save_image_grid(tmp_path, images, prompts, cell_size=64, label_width=100, header_height=30)
    assert path.name == IMAGE_GRID
    with Image.open(path) as grid:
        # The long prompt wraps onto 3 lines: the header grows beyond the 30 px asked for.
        header = grid.size[1] - 2 * 64
        assert grid.size[0] == 100 + 3 * 64 and header >= 3 * 14
        pixels = np.asarray(grid.convert("RGB"))
    # Cell centres: row 0 red, row 1 blue.
    assert tuple(pixels[header + 32, 100 + 32]) == (255, 0, 0)
    assert tuple(pixels[header + 64 + 32, 100 + 2 * 64 + 32]) == (0, 0, 255)
    # The 64x32 image is letterboxed: white above, blue in the middle.
    assert tuple(pixels[header + 64 + 2, 100 + 64 + 32]) == (255, 255, 255)
    assert tuple(pixels[header + 64 + 32, 100 + 64 + 32]) == (0, 0, 255)
    # Row labels are drawn in the label column, prompts in the header.
    assert (pixels[header : header + 64, :100] < 128).any()
    assert (pixels[:header, 100:] < 128).any()


def test_image_grid_with_a_reference_row_has_one_more_row_and_it_comes_first(tmp_path):
    prompts = ["a red circle on a blue background", "a small green square at the left on a white background"]
    models = {"base": [Image.new("RGB", (32, 32), (0, 0, 255))] * 2, "iter_1": [Image.new("RGB", (32, 32))] * 2}
    without = save_image_grid(tmp_path / "a", models, prompts)
    with_reference = save_image_grid(tmp_path / "b", {"real (data)": [Image.new("RGB", (32, 32), (255, 0, 0))] * 2,
                                                      **models}, prompts)
    with Image.open(without) as small, Image.open(with_reference) as large:
        assert large.size == (small.size[0], small.size[1] + 256)
        header = large.size[1] - 3 * 256
        assert large.getpixel((160 + 128, header + 128)) == (255, 0, 0)  # the reference row is first
        assert large.getpixel((160 + 128, header + 256 + 128)) == (0, 0, 255)


def test_prompts_are_wrapped_not_cut():
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=14)
    prompt = "a small red circle at the left on a blue background"  # the longest toy prompt shape
    lines = wrap_text(draw, prompt, font, 256 - 8)
    assert len(lines) == 2 and " ".join(lines) == prompt
    assert all(draw.textlength(line, font=font) <= 248 for line in lines)
    long = wrap_text(draw, "word " * 60, font, 248)
    assert len(long) == 3 and long[-1].endswith("...")
    assert wrap_text(draw, "x" * 200, font, 248)[0].endswith("...")  # one word wider than a line


def test_image_grid_checks_one_image_per_prompt(tmp_path):
    with pytest.raises(ValueError, match="model 'spin' has 1 images for 2 prompts"):
        save_image_grid(tmp_path, {"spin": [Image.new("RGB", (8, 8))]}, ["a", "b"])


# ----------------------------------------------------------------------------- readability


def _summary(mean: float, low: float, high: float, std: float = 0.1, n: int = 3) -> Summary:
    return Summary(mean, mean, std=std, n=n, ci_low=low, ci_high=high)


ONE_SCORER = {
    "base": {"toy": _summary(0.2, 0.1, 0.3), AVERAGE: _summary(0.2, 0.1, 0.3)},
    "iter_1": {"toy": _summary(0.5, 0.4, 0.6), AVERAGE: _summary(0.5, 0.4, 0.6)},
}


def test_one_scorer_gives_no_average_column_or_panel_but_json_keeps_it(tmp_path):
    win_rates = {"iter_1": {"toy": WinRate(1.0, 0.0, 3), AVERAGE: WinRate(1.0, 0.0, 3)}}
    write_report(tmp_path, ONE_SCORER, win_rates, baseline="base")
    tables = parse_markdown_tables((tmp_path / REPORT_MARKDOWN).read_text())
    for title in (TABLE_MEAN, TABLE_MEDIAN, "Table 3: winning rate against base (%)", "Detail: ties against base (%)"):
        assert all(list(row) == ["toy"] for row in tables[title].values()), title
    interval_table = tables[DETAIL_INTERVALS]
    assert interval_table["iter_1"] == {"toy mean [95% interval]": "0.5000 [0.4000, 0.6000]", "toy std": 0.1, "n": 3}
    with Image.open(tmp_path / METRICS_PLOT) as image:
        assert image.size == (300, 350)  # one panel
    payload = json.loads((tmp_path / METRICS_JSON).read_text())
    assert payload["summaries"]["base"][AVERAGE] == {"mean": 0.2, "median": 0.2, "std": 0.1, "n": 3,
                                                     "ci_low": 0.1, "ci_high": 0.3}


def test_report_md_explains_the_toy_reward_n_and_links_the_figures(tmp_path):
    metadata = {"num_prompts": 3, "num_images_per_prompt": 2, "prompt_set": "toy"}
    figures = {IMAGE_GRID: "The grid", "toy_over_iterations.png": "Over iterations", TRAINING_CURVES: "Curves"}
    write_report(tmp_path, ONE_SCORER, metadata=metadata, figures=figures)
    text = (tmp_path / REPORT_MARKDOWN).read_text()
    top = text[: text.index("## ")]  # the explanation comes before any table
    assert "geometric mean" in top and "1 means the image matches every attribute" in top
    assert "fixed, analytic judge" in top
    assert "n = 3 prompts x 2 images per prompt" in top and "best-of-2" in top
    for name in (IMAGE_GRID, "toy_over_iterations.png", METRICS_PLOT, TRAINING_CURVES):
        assert f"]({name})" in text, name
    assert text.index(f"]({IMAGE_GRID})") < text.index(f"]({METRICS_PLOT})")  # the given order, metrics.png last
    # Without a toy metric there is nothing to explain about it.
    write_report(tmp_path, SUMMARIES)
    assert "geometric mean" not in (tmp_path / REPORT_MARKDOWN).read_text()


def test_value_axes_start_at_zero_and_scores_in_0_1_get_0_to_1():
    assert value_limits([0.61, 0.63, 0.7]) == (0.0, 1.0)
    low, high = value_limits([21.2, 22.0])
    assert low == 0.0 and 22.0 < high < 23.5
    low, high = value_limits([-0.5, 1.2])
    assert low < -0.5 and high > 1.2


def test_metrics_plot_with_intervals(tmp_path):
    path = plot_metrics(tmp_path, {"base": {"toy": _summary(0.2, 0.1, 0.3)}, "sft": {"toy": Summary(0.4, 0.4)}})
    with Image.open(path) as image:
        assert image.size == (300, 350)
        assert np.asarray(image.convert("L")).std() > 10


def test_iteration_plot_with_an_sft_point_and_error_bars(tmp_path):
    series = {
        "spin": Series(x=[0, 1, 2], y=[0.2, 0.4, 0.5], low=[0.1, 0.3, 0.45], high=[0.3, 0.5, 0.55]),
        "sft": Series(x=[2.15], y=[0.3], low=[0.25], high=[0.35], label="SFT baseline (same samples)",
                      connect=False, marker="D"),
    }
    path = plot_over_iterations(tmp_path, series, "toy")
    with Image.open(path) as image:
        assert image.size == (500, 350)
    with pytest.raises(ValueError, match="one value per point"):
        Series(x=[0, 1], y=[0.2])


def test_training_curves_from_a_fake_history(tmp_path):
    histories = {
        "sft": [{"step": s, "loss": 1.0 / s, "mse": 1.0 / s} for s in range(1, 6)],
        "iter_1": [{"step": s, "loss": 0.7 - 0.05 * s, "implicit_acc": 0.5 + 0.05 * s, "margin": 0.01 * s}
                   for s in range(1, 6)],
        "iter_2": [{"step": 2 * s, "loss": 0.6, "implicit_acc": 0.6, "margin": float("nan")} for s in range(1, 4)],
    }
    path = plot_training_curves(tmp_path, histories)
    assert path is not None and path.name == TRAINING_CURVES
    with Image.open(path) as image:
        assert image.size == (3 * 400, 320)
        assert np.asarray(image.convert("L")).std() > 10
    assert plot_training_curves(tmp_path / "none", {}) is None
    assert plot_training_curves(tmp_path / "none", {"sft": [{"step": 1, "mse": 0.1}]}) is None
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- the paper's tables 1-3


def test_paper_tables_rows_columns_and_values_from_raw_scores(tmp_path):
    """Tables 1-3 from (P, N) scores: rows base, SFT, Diffusion-DPO, SPIN iter 1..K whatever
    order the models come in; columns HPS, Aesthetic, ImageReward, PickScore, Average; every
    number recomputed here with plain numpy, not with spin_ray.eval.metrics."""
    from spin_ray.eval import metrics

    rng = np.random.default_rng(7)
    scorers = ["pickscore", "hpsv2", "imagereward", "aesthetic"]  # eval_paper.yaml's order, not the paper's
    offsets = {"pickscore": 21.0, "hpsv2": 0.27, "imagereward": 0.8, "aesthetic": 5.7}
    models = ["iter_2", "dpo", "base", "iter_1", "sft", "iter_3"]
    scores = {m: {s: offsets[s] + rng.normal(scale=0.5, size=(9, 3)).round(1) for s in scorers} for m in models}
    evaluations = metrics.evaluate_models(scores)
    write_report(tmp_path, {m: e.summary for m, e in evaluations.items()},
                 metrics.win_rates_against(evaluations, "base"), baseline="base")
    tables = parse_markdown_tables((tmp_path / REPORT_MARKDOWN).read_text())

    labels = {"base": "Base (`base`)", "sft": "SFT (`sft`)", "dpo": "Diffusion-DPO (`dpo`)",
              **{f"iter_{k}": f"SPIN-Diffusion-Iter{k} (`iter_{k}`)" for k in (1, 2, 3)}}
    columns = {"hpsv2": "HPS", "aesthetic": "Aesthetic", "imagereward": "ImageReward", "pickscore": "PickScore"}
    chosen = {}  # model -> scorer -> (P,) scores of the best-of-N image (highest plain average)
    for model in models:
        stacked = np.stack([scores[model][s] for s in scorers])  # (S, P, N)
        best = stacked.mean(axis=0).argmax(axis=1)
        chosen[model] = {s: scores[model][s][np.arange(9), best] for s in scorers}
    title_win = "Table 3: winning rate against base (%)"
    for title in (TABLE_MEAN, TABLE_MEDIAN, title_win):
        assert list(tables[title]) == list(labels.values()), title
        for row in tables[title].values():
            assert list(row) == [*columns.values(), "Average"], title
    for model, label in labels.items():
        for statistic, title in ((np.mean, TABLE_MEAN), (np.median, TABLE_MEDIAN)):
            expected = {columns[s]: statistic(chosen[model][s]) for s in scorers}
            expected["Average"] = np.mean(list(expected.values()))
            assert tables[title][label] == {c: pytest.approx(v, abs=5e-5) for c, v in expected.items()}
        if model == "base":
            assert set(tables[title_win][label].values()) == {"-"}
            continue
        wins = {}
        for s in scorers:
            a, b = chosen[model][s], chosen["base"][s]
            wins[columns[s]] = 100 * (np.sum(a > b) + 0.5 * np.sum(a == b)) / 9
        a, b = (np.mean([chosen[m][s] for s in scorers], axis=0) for m in (model, "base"))
        wins["Average"] = 100 * (np.sum(a > b) + 0.5 * np.sum(a == b)) / 9
        assert tables[title_win][label] == {c: pytest.approx(v, abs=0.05) for c, v in wins.items()}
    # Tables 1-3 hold plain numbers (compared above); the intervals are in the detail section,
    # one row per model by its plain name.
    assert list(tables[DETAIL_INTERVALS]) == ["base", "sft", "dpo", "iter_1", "iter_2", "iter_3"]


def test_paper_rows_and_columns_for_other_names():
    assert paper_columns(["toy", "average", "pickscore", "hpsv2"]) == ["hpsv2", "pickscore", "toy", "average"]
    assert paper_columns(["toy"]) == ["toy"]
    rows = paper_rows(["spin_iter_2", "ref", "pbt_iter_1", "spin_iter_1", "x_sft", "extra", "pbt_iter_2"],
                      baseline="ref")
    assert [model for model, _ in rows] == ["ref", "x_sft", "spin_iter_1", "spin_iter_2", "pbt_iter_1",
                                            "pbt_iter_2", "extra"]
    assert rows[0] == ("ref", "Base (`ref`)") and rows[-1] == ("extra", "extra")
    # Without base and without a baseline among the models there is no Base row.
    assert paper_rows(["iter_1", "sft"]) == [("sft", "SFT (`sft`)"), ("iter_1", "SPIN-Diffusion-Iter1 (`iter_1`)")]
