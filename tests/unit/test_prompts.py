"""Evaluation prompt sets: each format, max_prompts, and errors that name the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.eval.prompt_sets import HPS_STYLES, PromptSetError, load_prompts
from spin_ray.toy.world import parse_prompt, split_triples, validation_prompts


def test_toy_prompts_are_the_held_out_validation_prompts():
    prompts = load_prompts("toy")
    assert prompts == validation_prompts()
    held_out = set(split_triples("validation"))
    assert all(parse_prompt(p).triple in held_out for p in prompts)
    assert load_prompts("toy", max_prompts=3) == prompts[:3]


def test_pickapic_parquet_captions_deduplicated_in_order(tmp_path):
    path = tmp_path / "test_unique.parquet"
    pq.write_table(pa.table({
        "caption": ["a cat", "a dog", "a cat", None, "  ", "a bird"],
        "jpg_0": [b"x"] * 6,
    }), path)
    assert load_prompts(path) == ["a cat", "a dog", "a bird"]
    assert load_prompts(str(path), max_prompts=2) == ["a cat", "a dog"]


def test_pickapic_directory_of_split_files(tmp_path):
    split = tmp_path / "validation_unique"
    split.mkdir()
    pq.write_table(pa.table({"caption": ["b", "c"]}), split / "validation_unique-00001.parquet")
    pq.write_table(pa.table({"caption": ["a", "b"]}), split / "validation_unique-00000.parquet")
    assert load_prompts(split) == ["a", "b", "c"]


def test_parquet_without_caption_names_file_and_columns(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["x"]}), path)
    with pytest.raises(PromptSetError, match=r"other\.parquet: no 'caption' column; columns are text"):
        load_prompts(path)


def test_partiprompts_tsv(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\n"
                    "bond\tAbstract\tBasic\t\n"
                    "a photo of a cat, sitting\tAnimals\tBasic\tcomma kept\n")
    assert load_prompts(path) == ["bond", "a photo of a cat, sitting"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(PromptSetError, match=r"bad\.tsv: no 'Prompt' column"):
        load_prompts(bad)


def test_hpsv2_benchmark_directory(tmp_path):
    for style in HPS_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style} two"]))
    prompts = load_prompts(tmp_path)
    assert len(prompts) == 8
    assert prompts[:3] == ["anime one", "anime two", "concept-art one"]
    assert prompts[-1] == "photo two"


def test_hpsv2_directory_missing_a_style(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["x"]))
    with pytest.raises(PromptSetError, match="lacks concept-art.json, paintings.json, photo.json"):
        load_prompts(tmp_path)


def test_json_list_must_hold_strings(tmp_path):
    path = tmp_path / "photo.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(PromptSetError, match=r"photo\.json: expected a JSON list of prompt strings"):
        load_prompts(path)


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n   \nsecond prompt  \n")
    assert load_prompts(path) == ["first prompt", "second prompt"]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(PromptSetError, match="nowhere.txt: no such file"):
        load_prompts(tmp_path / "nowhere.txt")
    odd = tmp_path / "prompts.yaml"
    odd.write_text("- a\n")
    with pytest.raises(PromptSetError, match=r"prompts\.yaml: unknown prompt set"):
        load_prompts(odd)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PromptSetError, match="empty.txt: the prompt set is empty"):
        load_prompts(empty)
    with pytest.raises(PromptSetError, match="neither the HPSv2"):
        load_prompts(tmp_path)
    with pytest.raises(PromptSetError, match="max_prompts"):
        load_prompts("toy", max_prompts=0)
