"""Reports: files exist, the numbers in them are the ones given, images have the promised size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from spin_ray.evaluation import AVERAGE, Summary, WinRate
from spin_ray.report import (
    IMAGE_GRID,
    METRICS_JSON,
    METRICS_PLOT,
    REPORT_MARKDOWN,
    plot_metrics,
    plot_over_iterations,
    save_image_grid,
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


def parse_markdown_tables(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """'## Title' -> row label -> column -> number, for every table in the report."""
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
                tables[title][cells[0]] = {column: float(value) for column, value in zip(header[1:], cells[1:], strict=True)}
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
    assert set(tables) == {"Mean", "Median", "Win rate against sd15 (%, ties count half)", "Ties against sd15 (%)"}
    for statistic, title in (("mean", "Mean"), ("median", "Median")):
        for model, row in SUMMARIES.items():
            assert list(tables[title][model]) == list(row)  # metrics in the given order, Average last
            for metric, summary in row.items():
                assert tables[title][model][metric] == pytest.approx(getattr(summary, statistic), abs=5e-5)
    win_table = tables["Win rate against sd15 (%, ties count half)"]
    assert set(win_table) == {"spin_iter3"}
    assert win_table["spin_iter3"] == {m: pytest.approx(100 * r.win_rate) for m, r in WIN_RATES["spin_iter3"].items()}
    assert tables["Ties against sd15 (%)"]["spin_iter3"]["pickscore"] == pytest.approx(25.0)


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
        assert grid.size == (100 + 3 * 64, 30 + 2 * 64)
        pixels = np.asarray(grid.convert("RGB"))
    # Cell centres: row 0 red, row 1 blue.
    assert tuple(pixels[30 + 32, 100 + 32]) == (255, 0, 0)
    assert tuple(pixels[30 + 64 + 32, 100 + 2 * 64 + 32]) == (0, 0, 255)
    # The 64x32 image is letterboxed: white above, blue in the middle.
    assert tuple(pixels[30 + 64 + 2, 100 + 64 + 32]) == (255, 255, 255)
    assert tuple(pixels[30 + 64 + 32, 100 + 64 + 32]) == (0, 0, 255)
    # Row labels are drawn in the label column.
    assert (pixels[30 : 30 + 64, :100] < 128).any()


def test_image_grid_checks_one_image_per_prompt(tmp_path):
    with pytest.raises(ValueError, match="model 'spin' has 1 images for 2 prompts"):
        save_image_grid(tmp_path, {"spin": [Image.new("RGB", (8, 8))]}, ["a", "b"])
