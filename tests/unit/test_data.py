"""SFT readers without Ray: formats, row ids, every bad-row kind under both policies, thresholds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spin_ray.config import DataConfig
from spin_ray.data import (
    OUTPUT_SCHEMA,
    DataError,
    ReadStats,
    clean_pickapic_table,
    image_problem,
    iter_sft_rows,
    list_parquet_files,
    plan_read,
    select_kept,
    tagged_stats,
)


def jpeg(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = jpeg((220, 30, 30)), jpeg((30, 200, 30)), jpeg((30, 30, 220))
CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG stream at all"
TRUNCATED = jpeg((200, 200, 20), size=64)[:-200]


def colour_of(data: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((8, 8))


def pickapic_row(caption: str | None = "a red thing", label_0: float | None = 1.0, jpg_0: bytes = RED,
                 jpg_1: bytes = GREEN, label_1: float | None = None) -> dict:
    return {
        "caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0,
        "label_1": (1.0 - label_0 if label_0 is not None else None) if label_1 is None else label_1,
        "ranking_id": 7, "best_image_uid": "ignored",
    }


PICKAPIC_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()), ("ranking_id", pa.int64()),
    ("best_image_uid", pa.string()),
])


def write_pickapic(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA), path, row_group_size=row_group_size)
    return path


def read_all(cfg: DataConfig) -> tuple[list[dict], ReadStats]:
    stats = ReadStats()
    return list(iter_sft_rows(cfg, stats)), stats


# ----------------------------------------------------------------------------- Pick-a-Pic


def test_pickapic_takes_the_labelled_winner_and_drops_ties(tmp_path):
    rows = [
        pickapic_row("zero wins", 1.0, jpg_0=RED, jpg_1=GREEN),
        pickapic_row("one wins", 0.0, jpg_0=GREEN, jpg_1=BLUE),
        pickapic_row("tie", 0.5),
        pickapic_row("zero wins again", 1.0, jpg_0=BLUE, jpg_1=RED),
    ]
    path = write_pickapic(tmp_path / "train.parquet", rows)
    out, stats = read_all(DataConfig(path=str(path)))

    assert [row["prompt"] for row in out] == ["zero wins", "one wins", "zero wins again"]
    assert [row["row_id"] for row in out] == [0, 1, 3]
    assert [row["image"] for row in out] == [RED, BLUE, BLUE]
    assert set(out[0]) == set(OUTPUT_SCHEMA.names)
    assert stats == ReadStats(rows_read=4, rows_kept=3, ties_dropped=1, bad_rows={})


def test_row_ids_follow_sorted_files_and_row_groups_and_are_stable(tmp_path):
    # Written out of order and split into row groups: ids must follow sorted file order.
    write_pickapic(tmp_path / "data" / "b.parquet", [pickapic_row(f"b{i}") for i in range(3)], row_group_size=2)
    write_pickapic(tmp_path / "data" / "a.parquet", [pickapic_row(f"a{i}") for i in range(4)], row_group_size=3)
    cfg = DataConfig(path=str(tmp_path / "data"))

    units, _ = plan_read(cfg)
    assert [(Path(u.path).name, u.row_group, u.file_row_offset, u.first_row_id) for u in units] == [
        ("a.parquet", 0, 0, 0), ("a.parquet", 1, 3, 3), ("b.parquet", 0, 0, 4), ("b.parquet", 1, 2, 6),
    ]
    first, _ = read_all(cfg)
    again, _ = read_all(cfg)
    assert [(r["row_id"], r["prompt"]) for r in first] == [(i, p) for i, p in enumerate(
        ["a0", "a1", "a2", "a3", "b0", "b1", "b2"])]
    assert first == again


def test_path_may_be_a_file_a_directory_or_a_glob(tmp_path):
    for name in ("x1.parquet", "x2.parquet", "y.parquet"):
        write_pickapic(tmp_path / "d" / name, [pickapic_row(name)])
    (tmp_path / "d" / "notes.txt").write_text("not data")

    assert [Path(p).name for p in list_parquet_files(str(tmp_path / "d"))] == ["x1.parquet", "x2.parquet",
                                                                                 "y.parquet"]
    assert [Path(p).name for p in list_parquet_files(str(tmp_path / "d" / "x*.parquet"))] == ["x1.parquet",
                                                                                              "x2.parquet"]
    assert [Path(p).name for p in list_parquet_files(str(tmp_path / "d" / "y.parquet"))] == ["y.parquet"]
    with pytest.raises(DataError, match="no such file"):
        list_parquet_files(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .parquet files"):
        list_parquet_files(str(tmp_path / "d" / "z*.parquet"))


BAD_PICKAPIC_ROWS = {
    "corrupt_image": (pickapic_row(jpg_0=CORRUPT), "bad_image", "jpg_0", "do not decode"),
    "truncated_image": (pickapic_row(label_0=0.0, jpg_1=TRUNCATED), "bad_image", "jpg_1", "truncated"),
    "missing_image": (pickapic_row(jpg_0=b""), "bad_image", "jpg_0", "no image bytes"),
    "empty_caption": (pickapic_row(caption="   "), "empty_prompt", "caption", "caption is empty"),
    "null_caption": (pickapic_row(caption=None), "empty_prompt", "caption", "missing"),
    "label_0.7": (pickapic_row(label_0=0.7), "bad_label", "label_0", "expected 0, 0.5 or 1"),
    "label_null": (pickapic_row(label_0=None), "bad_label", "label_0", "expected 0, 0.5 or 1"),
    "labels_disagree": (pickapic_row(label_0=1.0, label_1=1.0), "bad_label", "label_1", "1 - label_0"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PICKAPIC_ROWS))
def test_bad_pickapic_row_fails_with_file_row_and_field(tmp_path, kind):
    bad, _, field, problem = BAD_PICKAPIC_ROWS[kind]
    path = write_pickapic(tmp_path / "bad.parquet", [pickapic_row("ok 0"), pickapic_row("ok 1"), bad])
    with pytest.raises(DataError) as info:
        read_all(DataConfig(path=str(path), on_bad_row="fail"))
    message = str(info.value)
    assert str(path) in message
    assert "row 2 " in message
    assert repr(field) in message
    assert problem.lower() in message.lower()


@pytest.mark.parametrize("kind", sorted(BAD_PICKAPIC_ROWS))
def test_bad_pickapic_row_is_skipped_and_counted(tmp_path, kind):
    bad, reason, _, _ = BAD_PICKAPIC_ROWS[kind]
    path = write_pickapic(tmp_path / "bad.parquet", [pickapic_row("ok 0"), bad, pickapic_row("ok 2")])
    out, stats = read_all(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.5))
    assert [row["prompt"] for row in out] == ["ok 0", "ok 2"]
    assert [row["row_id"] for row in out] == [0, 2]
    assert stats.bad_rows == {reason: 1}
    assert (stats.rows_read, stats.rows_kept, stats.ties_dropped) == (3, 2, 0)


@pytest.mark.parametrize("on_bad_row", ["fail", "skip"])
def test_missing_column_fails_under_both_policies(tmp_path, on_bad_row):
    table = pa.Table.from_pylist([pickapic_row()], schema=PICKAPIC_SCHEMA).drop_columns(["label_1"])
    path = tmp_path / "no_label.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"no_label\.parquet: missing column 'label_1'"):
        read_all(DataConfig(path=str(path), on_bad_row=on_bad_row))


def test_mistyped_column_fails(tmp_path):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": ["not bytes"], "jpg_1": [RED],
                             "label_0": [1.0], "label_1": [0.0]}), path)
    with pytest.raises(DataError, match=r"typed\.parquet: column 'jpg_0' has type string, expected a binary"):
        read_all(DataConfig(path=str(path)))


def test_unreadable_parquet_file_fails_or_is_counted(tmp_path):
    write_pickapic(tmp_path / "d" / "a.parquet", [pickapic_row(f"a{i}") for i in range(3)])
    (tmp_path / "d" / "b.parquet").write_bytes(b"PAR1 truncated download")
    with pytest.raises(DataError, match=r"b\.parquet: unreadable parquet file"):
        read_all(DataConfig(path=str(tmp_path / "d")))

    out, stats = read_all(DataConfig(path=str(tmp_path / "d"), on_bad_row="skip", max_bad_fraction=0.5))
    assert [row["prompt"] for row in out] == ["a0", "a1", "a2"]
    assert stats.bad_rows == {"unreadable_file": 1}
    assert stats.rows_read == 4


def test_unreadable_row_group_fails_or_is_counted(tmp_path):
    path = write_pickapic(tmp_path / "rg.parquet", [pickapic_row(f"r{i}") for i in range(6)], row_group_size=3)
    chunk = next(c for c in (pq.ParquetFile(path).metadata.row_group(0).column(i) for i in range(7))
                 if c.path_in_schema == "caption")
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + chunk.total_compressed_size] = (
        b"\xab" * chunk.total_compressed_size)
    path.write_bytes(bytes(data))  # the footer is intact, the first row group's caption pages are not
    with pytest.raises(DataError, match=r"rg\.parquet: row group 0 \(rows 0-2\) is unreadable"):
        read_all(DataConfig(path=str(path)))
    out, stats = read_all(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.5))
    assert [row["row_id"] for row in out] == [3, 4, 5]
    assert stats.bad_rows == {"unreadable_file": 3}


def test_too_many_bad_rows_fail_the_read(tmp_path):
    rows = [pickapic_row(f"ok {i}") for i in range(3)] + [pickapic_row(label_0=0.7)]
    path = write_pickapic(tmp_path / "mixed.parquet", rows)
    with pytest.raises(DataError, match=r"1 of 4 rows are bad .*bad_label: 1.*max_bad_fraction=20\.00%"):
        read_all(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.2))
    out, _ = read_all(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.25))
    assert len(out) == 3


def test_read_stats_check_and_flat_dict():
    stats = ReadStats(rows_read=100, rows_kept=97, ties_dropped=1, bad_rows={"bad_image": 2})
    stats.check(0.02, "src")
    with pytest.raises(DataError, match="src: 2 of 100 rows are bad"):
        stats.check(0.019, "src")
    assert stats.as_dict() == {"rows_read": 100, "rows_kept": 97, "ties_dropped": 1, "bad_rows.bad_image": 2}
    total = ReadStats()
    total.add(stats)
    total.add(ReadStats(rows_read=1, bad_rows={"bad_image": 1, "bad_label": 1}))
    assert total.bad_rows == {"bad_image": 3, "bad_label": 1}
    assert total.rows_read == 101


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_pickapic(tmp_path / "ties.parquet", [pickapic_row(label_0=0.5)] * 2)
    with pytest.raises(DataError, match="no usable rows"):
        read_all(DataConfig(path=str(path)))


def test_max_rows_counts_after_filtering(tmp_path):
    rows = [pickapic_row(label_0=0.5), pickapic_row("k1"), pickapic_row(caption=""), pickapic_row("k3"),
            pickapic_row("k4"), pickapic_row("k5")]
    path = write_pickapic(tmp_path / "m.parquet", rows, row_group_size=2)
    out, stats = read_all(DataConfig(path=str(path), max_rows=2, on_bad_row="skip", max_bad_fraction=0.5))
    assert [(r["row_id"], r["prompt"]) for r in out] == [(1, "k1"), (3, "k3")]
    assert stats.rows_kept == 2
    assert stats.rows_read == 4  # two row groups were needed


def test_pure_pickapic_batch_keeps_offsets_in_ids_and_messages():
    table = pa.Table.from_pylist([pickapic_row("a"), pickapic_row("b", label_0=0.5),
                                  pickapic_row("c", jpg_0=CORRUPT)], schema=PICKAPIC_SCHEMA)
    tagged = clean_pickapic_table(table, path="f.parquet", file_row_offset=10, first_row_id=110,
                                  on_bad_row="skip")
    assert tagged.column("row_id").to_pylist() == [110, 111, 112]
    assert tagged.column("status").to_pylist() == ["ok", "tie", "bad_image"]
    assert tagged_stats(tagged) == ReadStats(rows_read=3, rows_kept=1, ties_dropped=1,
                                             bad_rows={"bad_image": 1})
    assert select_kept(tagged).schema == OUTPUT_SCHEMA
    assert select_kept(tagged).to_pylist() == [{"prompt": "a", "image": RED, "row_id": 110}]
    with pytest.raises(DataError, match=r"f\.parquet: row 12 \(row_id 112\), field 'jpg_0'"):
        clean_pickapic_table(table, path="f.parquet", file_row_offset=10, first_row_id=110)


def test_image_problem_decodes_fully():
    assert image_problem(RED) is None
    assert image_problem(png((1, 2, 3))) is None
    assert "truncated" in image_problem(TRUNCATED).lower()
    assert image_problem(None) == "no image bytes"
    assert "do not decode" in image_problem(CORRUPT)


# ----------------------------------------------------------------------------- generic parquet


def test_generic_parquet_with_bytes_column(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"text": ["red", "", "blue"], "img": [RED, GREEN, BLUE], "extra": [1, 2, 3]}), path)
    cfg = DataConfig(path=str(path), format="parquet", prompt_column="text", image_column="img",
                     on_bad_row="skip", max_bad_fraction=0.5)
    out, stats = read_all(cfg)
    assert [(r["prompt"], r["image"], r["row_id"]) for r in out] == [("red", RED, 0), ("blue", BLUE, 2)]
    assert stats.bad_rows == {"empty_prompt": 1}


def test_generic_parquet_with_hf_image_struct(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": png((255, 0, 0)), "path": "a.png"}, {"bytes": CORRUPT, "path": "b.png"},
                       {"bytes": None, "path": "c.png"}], image_type)
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "image": images}), path)

    with pytest.raises(DataError, match=r"row 1 \(row_id 1\), field 'image'"):
        read_all(DataConfig(path=str(path), format="parquet"))
    out, stats = read_all(DataConfig(path=str(path), format="parquet", on_bad_row="skip", max_bad_fraction=1.0))
    assert [r["prompt"] for r in out] == ["a"]
    assert colour_of(out[0]["image"]) == (255, 0, 0)
    assert stats.bad_rows == {"bad_image": 2}


def test_generic_parquet_missing_image_column(tmp_path):
    path = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"caption": ["a"], "picture": [RED]}), path)
    with pytest.raises(DataError, match=r"noimg\.parquet: missing column 'image' .* columns caption, picture"):
        read_all(DataConfig(path=str(path), format="parquet"))


# ----------------------------------------------------------------------------- folders


def make_folder(root: Path, kind: str, records: list[dict], images: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        fields = list(records[0])
        lines = [",".join(fields)] + [",".join(f'"{r[f]}"' for f in fields) for r in records]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_folder_dataset(tmp_path, kind):
    records = [{"file_name": "a.png", "text": "red, square"}, {"file_name": "sub/b.jpg", "text": "blue"}]
    root = make_folder(tmp_path / "f", kind, records, {"a.png": png((255, 0, 0)), "sub/b.jpg": BLUE})
    out, stats = read_all(DataConfig(path=str(root), format="folder", prompt_column="text"))
    assert [(r["prompt"], r["row_id"]) for r in out] == [("red, square", 0), ("blue", 1)]
    assert out[1]["image"] == BLUE
    assert stats == ReadStats(rows_read=2, rows_kept=2, ties_dropped=0, bad_rows={})


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_folder_bad_rows_under_both_policies(tmp_path, kind):
    records = [
        {"file_name": "good.png", "caption": "fine"},
        {"file_name": "missing.png", "caption": "no file"},
        {"file_name": "broken.jpg", "caption": "corrupt"},
        {"file_name": "short.jpg", "caption": "truncated"},
        {"file_name": "good.png", "caption": ""},
    ]
    images = {"good.png": png((0, 255, 0)), "broken.jpg": CORRUPT, "short.jpg": TRUNCATED}
    root = make_folder(tmp_path / "f", kind, records, images)
    with pytest.raises(DataError, match=r"metadata\.\w+: record 1 \(row_id 1\), field 'file_name': cannot read"):
        read_all(DataConfig(path=str(root), format="folder"))
    out, stats = read_all(DataConfig(path=str(root), format="folder", on_bad_row="skip", max_bad_fraction=1.0))
    assert [r["row_id"] for r in out] == [0]
    assert stats.bad_rows == {"unreadable_file": 1, "bad_image": 2, "empty_prompt": 1}


def test_folder_malformed_jsonl_line_is_bad_metadata(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.png").write_bytes(png((9, 9, 9)))
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "caption": "x"}\n\n{"file_name": \n["a list"]\n{"caption": "no file"}\n'
    )
    with pytest.raises(DataError, match=r"record 1 .*line 3 is not valid JSON"):
        read_all(DataConfig(path=str(root), format="folder"))
    out, stats = read_all(DataConfig(path=str(root), format="folder", on_bad_row="skip", max_bad_fraction=1.0))
    assert len(out) == 1
    assert stats.bad_rows == {"bad_metadata": 3}


def test_folder_metadata_errors(tmp_path):
    root = make_folder(tmp_path / "f", "jsonl", [{"file_name": "a.png", "label": "x"}], {"a.png": RED})
    with pytest.raises(DataError, match=r"metadata\.jsonl: missing field 'caption'"):
        read_all(DataConfig(path=str(root), format="folder"))
    (root / "metadata.csv").write_text("file_name,caption\na.png,x\n")
    with pytest.raises(DataError, match="exactly one of metadata.jsonl or metadata.csv"):
        read_all(DataConfig(path=str(root), format="folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="found neither"):
        read_all(DataConfig(path=str(empty), format="folder"))


def test_folder_file_field_falls_back_to_image_column(tmp_path):
    root = make_folder(tmp_path / "f", "jsonl", [{"path": "a.png", "caption": "x"}], {"a.png": RED})
    out, _ = read_all(DataConfig(path=str(root), format="folder", image_column="path"))
    assert out == [{"prompt": "x", "image": RED, "row_id": 0}]


def test_empty_path_is_a_config_error():
    with pytest.raises(DataError, match="data.path: empty"):
        read_all(DataConfig(path=""))
