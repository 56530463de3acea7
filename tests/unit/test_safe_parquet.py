"""Issue 23, finding 1: a downloaded prompt file, or a file planted in a run directory, must
not run code when it is read.

The hostile files hold Ray's pickled-object extension column (registered by importing
``ray.data``) whose value unpickles to a call that creates a marker file: each test checks the
reader refuses the file with one line naming it and the column, and that the marker is absent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.extensions import ArrowPythonObjectArray, ArrowTensorArray

from spin_ray.data import DataError, check_columns
from spin_ray.eval.prompt_sets import PromptSetError, load_prompts
from spin_ray.opponents import cached_files, find_batch, write_batch
from spin_ray.pairs import read_prepared
from spin_ray.safe_parquet import UnsafeParquetError, check_schema, read_table_checked

PICKLED = "ray.data.arrow_pickled_object"


class Planted:
    """Unpickles to ``os.mkdir(marker)``: harmless, but proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickled(marker: Path, n: int = 1) -> pa.Array:
    return ArrowPythonObjectArray.from_objects([Planted(marker) for _ in range(n)])


def nested(marker: Path) -> pa.Array:
    """A struct column whose ``text`` field is a plain string and ``extra`` the planted object."""
    return pa.StructArray.from_arrays([pa.array(["a cat"]), pickled(marker)], names=["text", "extra"])


def refusal(path: Path | str, column: str) -> str:
    return rf"^{re.escape(str(path))}: column '{column}' has extension type {PICKLED}; expected "


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "the planted object was unpickled: reading the file ran code"


def test_the_planted_file_runs_code_when_read_naively(tmp_path):
    """The premise: without the check, reading the captions (the old prompts.py path) runs code."""
    marker, path = tmp_path / "code_ran", tmp_path / "evil.parquet"
    pq.write_table(pa.table({"caption": pickled(marker)}), path)
    pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    assert marker.exists()


@pytest.mark.parametrize("column", [pickled, nested], ids=["top_level", "struct_field"])
def test_a_prompt_parquet_with_a_pickled_caption_is_refused(tmp_path, marker, column):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": column(marker)}), path)
    with pytest.raises(PromptSetError, match=refusal(path, "caption")) as caught:
        load_prompts(path)
    assert "\n" not in str(caught.value)
    assert "(strings for prompts)" in str(caught.value)


def test_an_ordinary_prompt_parquet_still_loads(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat"], "jpg_0": [b"x", b"y", b"z"]}), path)
    assert load_prompts(path) == ["a cat", "a dog"]


def test_opponent_files_with_a_pickled_column_are_refused(tmp_path, marker):
    folder = tmp_path / "opponents"
    write_batch(str(folder), {"sample_id": np.arange(3), "latents_syn": np.zeros((3, 4, 2, 2), np.float32)})
    planted = folder / f"part-{5:020d}-planted0.parquet"
    hostile = pa.table({"sample_id": pa.array([5], pa.int64()), "latents_syn": pickled(marker)})
    pq.write_table(hostile, planted)
    with pytest.raises(UnsafeParquetError, match=refusal(planted, "latents_syn")):
        find_batch(str(folder), np.asarray([5]), ["sample_id", "latents_syn"])
    with pytest.raises(UnsafeParquetError, match=refusal(planted, "latents_syn")):
        cached_files(str(folder))  # reads only sample_id, but hands the whole file to read_parquet


def test_a_prepared_table_with_a_nested_pickled_field_is_refused(tmp_path, marker):
    folder = tmp_path / "prepared"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["p"], "meta": nested(marker)}), folder / "part-0.parquet")
    with pytest.raises(UnsafeParquetError, match=refusal(folder / "part-0.parquet", "meta")):
        read_prepared(str(folder))


def test_training_data_refuses_a_pickled_field_inside_the_image_struct(tmp_path, marker):
    """The plan checks the footer schema; a struct with ``bytes`` passes the type check alone."""
    path = tmp_path / "train.parquet"
    image = pa.StructArray.from_arrays([pa.array([b"png"]), pickled(marker)], names=["bytes", "path"])
    pq.write_table(pa.table({"caption": ["a cat"], "image": image}), path)
    schema = pq.ParquetFile(path).metadata.schema.to_arrow_schema()
    with pytest.raises(DataError, match=refusal(path, "image")):
        check_columns(schema, "parquet", "caption", "image", str(path))


def test_an_extension_this_process_has_not_registered_is_refused_by_its_field_metadata():
    """Read where the type is unknown it comes back as storage, but a Ray worker would rebuild it."""
    tagged = pa.field("extra", pa.large_binary(), metadata={b"ARROW:extension:name": PICKLED.encode()})
    schema = pa.schema([pa.field("caption", pa.list_(pa.struct([tagged])))])
    with pytest.raises(UnsafeParquetError, match=refusal("scores.parquet", "caption")):
        check_schema(schema, "scores.parquet")


@pytest.mark.parametrize("dtype", [
    pa.dictionary(pa.int32(), pa.fixed_shape_tensor(pa.float32(), [2])),
    pa.map_(pa.string(), pa.fixed_shape_tensor(pa.float32(), [2])),
])
def test_any_extension_type_is_refused_not_only_rays(dtype):
    with pytest.raises(UnsafeParquetError, match="column 'x' has extension type arrow.fixed_shape_tensor"):
        check_schema(pa.schema([pa.field("x", dtype)]), "f.parquet")


def test_only_the_read_columns_are_checked_and_our_tensor_columns_pass(tmp_path, marker):
    path = tmp_path / "mixed.parquet"
    latents = ArrowTensorArray.from_numpy(np.ones((2, 3, 2), np.float32))
    pq.write_table(pa.table({"sample_id": [1, 2], "latents": latents, "evil": pickled(marker, 2)}), path)
    table = read_table_checked(path, ["sample_id", "latents"])
    assert table.column("latents").chunk(0).to_numpy().shape == (2, 3, 2)
    with pytest.raises(UnsafeParquetError, match=refusal(path, "evil")):
        read_table_checked(path)


def test_a_missing_column_raises_as_read_table_does(tmp_path):
    path = tmp_path / "plain.parquet"
    table = pa.table({"sample_id": [1, 2], "prompt": ["a", "b"]})
    pq.write_table(table, path)
    assert read_table_checked(path).equals(pq.read_table(path))
    with pytest.raises(pa.ArrowInvalid, match=r"plain\.parquet: no column 'latents'"):
        read_table_checked(path, ["sample_id", "latents"])
