"""The toy world: grammar, splits, rendering, the Pick-a-Pic style data and the analytic reward."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from spin_ray.config import DataConfig
from spin_ray.data import ReadStats, iter_sft_rows
from spin_ray.toy.reward import ToyScorer
from spin_ray.toy.world import (
    COLOURS,
    PICKAPIC_SCHEMA,
    POSITIONS,
    SHAPES,
    ToyPrompt,
    all_triples,
    parse_prompt,
    perturb_prompt,
    render,
    render_shifted,
    sample_prompt,
    split_triples,
    validation_prompts,
    write_image_text_parquet,
    write_pickapic_parquet,
)

SCORER = ToyScorer()


def prompts(n: int, seed: int = 0, split: str = "train") -> list[ToyPrompt]:
    rng = random.Random(seed)
    return [sample_prompt(rng, split) for _ in range(n)]


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# ----------------------------------------------------------------------------- grammar and splits


def test_prompt_text_round_trips():
    for prompt in prompts(200):
        assert parse_prompt(str(prompt)) == prompt
    assert str(ToyPrompt("circle", "red", "blue")) == "a red circle on a blue background"
    assert str(ToyPrompt("cross", "white", "black", "small", "left")) == (
        "a small white cross at the left on a black background")


@pytest.mark.parametrize("text, problem", [
    ("a red circle", "does not follow the grammar"),
    ("a huge red circle on a blue background", "size 'huge' is not one of small, large"),
    ("a red hexagon on a blue background", "shape 'hexagon'"),
    ("a red circle at the middle on a blue background", "position 'middle'"),
    ("a red circle on a red background", "must differ"),
])
def test_parse_prompt_rejects_bad_prompts(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_prompt(text)


def test_splits_are_disjoint_and_cover_the_vocabulary():
    train, held_out = set(split_triples("train")), set(split_triples("validation"))
    assert not train & held_out
    assert train | held_out == set(all_triples())
    assert 0.1 < len(held_out) / len(all_triples()) < 0.2
    for position, words in ((0, SHAPES), (1, COLOURS), (2, COLOURS)):
        assert {t[position] for t in train} == set(words)
    assert all(p.triple in train for p in prompts(300))
    assert {p.position for p in prompts(300)} == {None, *POSITIONS}
    validation = validation_prompts()
    assert validation == validation_prompts()
    assert len(set(validation)) == len(validation)
    assert all(parse_prompt(p).triple in held_out for p in validation)


# ----------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_jittered():
    prompt = ToyPrompt("square", "red", "blue")
    a, b = render(prompt, seed=3), render(prompt, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(render(prompt, seed=4)))
    assert render(prompt).size == (32, 32)
    assert render(str(prompt), resolution=64).size == (64, 64)


def test_render_puts_the_right_colours_in_the_right_places():
    image = np.asarray(render("a large yellow circle on a black background", seed=0), dtype=int)
    assert np.abs(image[16, 16] - COLOURS["yellow"]).max() <= 12
    assert np.abs(image[0, 0] - COLOURS["black"]).max() <= 12

    def centre_x(text: str) -> float:
        mask = np.asarray(render(text, seed=1), dtype=float).sum(-1) > 300  # white on black
        return float(np.nonzero(mask)[1].mean()) / 32

    assert centre_x("a white square at the left on a black background") < 0.4
    assert centre_x("a white square at the right on a black background") > 0.6

    def area(text: str) -> int:
        return int((np.asarray(render(text, seed=2), dtype=float).sum(-1) > 300).sum())

    assert area("a small white circle on a black background") * 3 < area("a large white circle on a black background")


def test_shifted_rendering():
    prompt = ToyPrompt("triangle", "green", "white")
    assert np.array_equal(np.asarray(render_shifted(prompt, seed=5, shift=0.0)), np.asarray(render(prompt, seed=5)))
    assert np.array_equal(np.asarray(render_shifted(prompt, seed=5, shift=0.7)),
                          np.asarray(render_shifted(prompt, seed=5, shift=0.7)))
    sample = prompts(40, seed=9)
    texts = [str(p) for p in sample]
    clean = SCORER.score([render(p, seed=i) for i, p in enumerate(sample)], texts)
    shifted = SCORER.score([render_shifted(p, seed=i, shift=1.0) for i, p in enumerate(sample)], texts)
    assert shifted.mean() < clean.mean() - 0.3
    with pytest.raises(ValueError, match="shift"):
        render_shifted(prompt, shift=1.5)


def test_crisp_shifted_rendering_is_a_clean_rendering_of_a_possibly_wrong_prompt():
    """``low_level=False``: no blur, wash-out or noise; each image is exactly ``render`` of the
    prompt or of a perturbed one, and at shift 1 a good share of them are wrong."""
    sample = prompts(60, seed=4)
    wrong = 0
    for i, prompt in enumerate(sample):
        crisp = np.asarray(render_shifted(prompt, seed=i, shift=1.0, low_level=False))
        if np.array_equal(crisp, np.asarray(render(prompt, seed=i))):
            continue
        wrong += 1
        colours = {tuple(c) for c in crisp.reshape(-1, 3)}
        blurred = {tuple(c) for c in np.asarray(render_shifted(prompt, seed=i, shift=1.0)).reshape(-1, 3)}
        assert len(colours) < len(blurred)  # anti-aliased edges only, not noise on every pixel
    assert 0.3 * len(sample) < wrong < 0.9 * len(sample)


# ----------------------------------------------------------------------------- data sets


def test_pickapic_parquet_is_read_by_the_real_reader(tmp_path):
    path = write_pickapic_parquet(tmp_path / "toy.parquet", n_rows=40, seed=0, tie_fraction=0.15)
    table = pq.read_table(path)
    assert table.schema == PICKAPIC_SCHEMA
    rows = table.to_pylist()
    labels = [row["label_0"] for row in rows]
    assert {0.0, 0.5, 1.0} == set(labels)  # winners in both positions, and ties
    assert all(row["label_0"] + row["label_1"] == 1.0 for row in rows)
    for row in rows:
        if row["label_0"] != 0.5:
            winner = 0 if row["label_0"] == 1.0 else 1
            assert row["best_image_uid"] == row[f"image_{winner}_uid"]

    stats = ReadStats()
    kept = list(iter_sft_rows(DataConfig(path=str(path)), stats))
    assert stats.ties_dropped == labels.count(0.5)
    assert stats.rows_kept == len(kept) == 40 - labels.count(0.5)
    texts = [row["prompt"] for row in kept]
    winners = SCORER.score([decode(row["image"]) for row in kept], texts)
    by_id = {row["row_id"]: row for row in kept}
    losers = SCORER.score([decode(rows[i]["jpg_1" if rows[i]["label_0"] == 1.0 else "jpg_0"]) for i in by_id], texts)
    assert winners.mean() > 0.8
    assert losers.mean() < 0.4
    # The same arguments write the same table; the returned path is the file written.
    again = write_pickapic_parquet(tmp_path / "again.parquet", n_rows=40, seed=0, tie_fraction=0.15)
    assert again == tmp_path / "again.parquet" and again.is_file()
    assert pq.read_table(again).equals(table)


def test_image_text_parquet_is_read_by_the_generic_reader(tmp_path):
    path = write_image_text_parquet(tmp_path / "shifted.parquet", n_rows=8, seed=1, shift=0.5)
    rows = list(iter_sft_rows(DataConfig(path=str(path), format="parquet")))
    assert [row["row_id"] for row in rows] == list(range(8))
    assert all(parse_prompt(row["prompt"]) for row in rows)
    assert decode(rows[0]["image"]).size == (32, 32)


# ----------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def sample():
    return prompts(40, seed=1)


@pytest.mark.parametrize("resolution", [32, 64])
def test_correct_renderings_score_high(sample, resolution):
    scores = SCORER.score([render(p, resolution=resolution, seed=i) for i, p in enumerate(sample)],
                          [str(p) for p in sample])
    assert scores.dtype == np.float32
    assert scores.shape == (len(sample),)
    assert scores.mean() > 0.8
    assert ((0.0 <= scores) & (scores <= 1.0)).all()


@pytest.mark.parametrize("kind", ["colour", "background", "shape"])
def test_one_wrong_attribute_scores_clearly_lower(sample, kind):
    texts = [str(p) for p in sample]
    right = SCORER.score([render(p, seed=i) for i, p in enumerate(sample)], texts)
    wrong_images = [render(perturb_prompt(p, random.Random(i), kind), seed=i) for i, p in enumerate(sample)]
    wrong = SCORER.score(wrong_images, texts)
    assert wrong.mean() < 0.4
    assert (wrong < right).mean() > 0.9


def test_wrong_size_or_position_scores_lower():
    sized = [p for p in prompts(200, seed=2) if p.size][:15]
    flip = {"small": "large", "large": "small", "left": "right", "right": "left", "top": "bottom",
            "bottom": "top"}
    images = [render(p, seed=i) for i, p in enumerate(sized)]
    right = SCORER.score(images, [str(p) for p in sized])
    assert right.mean() - SCORER.score(images, [str(replace(p, size=flip[p.size])) for p in sized]).mean() > 0.5
    placed = [p for p in prompts(200, seed=3) if p.position][:15]
    images = [render(p, seed=i) for i, p in enumerate(placed)]
    right = SCORER.score(images, [str(p) for p in placed])
    moved = SCORER.score(images, [str(replace(p, position=flip[p.position])) for p in placed])
    assert right.mean() - moved.mean() > 0.5


def test_blurred_samples_keep_most_of_the_score(sample):
    texts = [str(p) for p in sample]
    blurred = [render(p, seed=i).filter(ImageFilter.GaussianBlur(1.0)) for i, p in enumerate(sample)]
    wrong = [render(perturb_prompt(p, random.Random(i), "colour"), seed=i).filter(ImageFilter.GaussianBlur(1.0))
             for i, p in enumerate(sample)]
    assert SCORER.score(blurred, texts).mean() > 0.75
    assert SCORER.score(wrong, texts).mean() < 0.3


def test_noise_and_blank_images_score_low(sample):
    texts = [str(p) for p in sample]
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
             for i in range(len(sample))]
    assert SCORER.score(noise, texts).mean() < 0.1
    blank = [Image.new("RGB", (32, 32), COLOURS[p.background]) for p in sample]
    assert SCORER.score(blank, texts).max() < 0.05


def test_scores_are_deterministic_and_batch_invariant(sample):
    texts = [str(p) for p in sample[:12]]
    images = [render_shifted(p, seed=i, shift=0.6) for i, p in enumerate(sample[:12])]
    whole = SCORER.score(images, texts)
    assert np.array_equal(whole, SCORER.score(images, texts))
    pieces = np.concatenate([SCORER.score(images[i:i + 5], texts[i:i + 5]) for i in range(0, 12, 5)])
    assert np.array_equal(whole, pieces)
    assert SCORER.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        SCORER.score(images[:3], texts[:2])


def test_low_level_flaws_are_render_shifted_without_the_wrong_prompt():
    """render_shifted = low_level_flaws(render(prompt or a perturbed one)); the flaws alone keep
    the size, are deterministic in the seed, and blur and wash out the clean rendering."""
    from spin_ray.toy.world import low_level_flaws

    prompt = "a red circle on a blue background"
    clean = render(prompt, resolution=32, seed=3)
    flawed = low_level_flaws(clean, seed=3, shift=0.6)
    assert flawed.size == clean.size
    assert np.array_equal(np.asarray(flawed), np.asarray(low_level_flaws(clean, seed=3, shift=0.6)))
    assert np.abs(np.asarray(flawed, dtype=float) - np.asarray(clean, dtype=float)).mean() > 5
    for seed in range(40):  # some seeds keep the prompt: then the two must agree exactly
        shifted = render_shifted(prompt, resolution=32, seed=seed, shift=0.6)
        same = low_level_flaws(render(prompt, resolution=32, seed=seed), seed=seed, shift=0.6)
        if np.array_equal(np.asarray(shifted), np.asarray(same)):
            break
    else:
        raise AssertionError("render_shifted never equals low_level_flaws(render(prompt)) over 40 seeds")
