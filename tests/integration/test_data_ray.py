"""The Ray Data reader gives the same rows, ids and stats as the plain reader."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
import ray
from PIL import Image

from spin_ray.config import DataConfig
from spin_ray.data import DataError, ReadStats, iter_sft_rows, read_sft_dataset
from spin_ray.toy.world import write_pickapic_parquet


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for this module (reuses one that another fixture already started)."""
    from spin_ray.ray_session import ensure_ray

    started = ensure_ray("local", num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Two toy Pick-a-Pic files (ties included), several row groups each."""
    root = tmp_path_factory.mktemp("toy")
    write_pickapic_parquet(root / "part-0.parquet", n_rows=24, seed=0, tie_fraction=0.2, row_group_size=5)
    write_pickapic_parquet(root / "part-1.parquet", n_rows=16, seed=1, tie_fraction=0.2, row_group_size=5)
    return root


def plain(cfg: DataConfig) -> tuple[list[dict], ReadStats]:
    stats = ReadStats()
    return list(iter_sft_rows(cfg, stats)), stats


def test_ray_reader_matches_plain_reader(ray_local, toy_dir):
    cfg = DataConfig(path=str(toy_dir))
    dataset, stats = read_sft_dataset(cfg)
    schema = dataset.schema()
    assert list(schema.names) == ["prompt", "image", "row_id"]
    assert list(schema.types) == [pa.string(), pa.binary(), pa.int64()]

    rows = sorted(dataset.take_all(), key=lambda row: row["row_id"])
    expected, expected_stats = plain(cfg)
    assert [(r["row_id"], r["prompt"], bytes(r["image"])) for r in rows] == [
        (r["row_id"], r["prompt"], r["image"]) for r in expected
    ]
    assert stats == expected_stats
    assert stats.ties_dropped > 0
    assert stats.rows_read == 40
    Image.open(io.BytesIO(rows[0]["image"])).load()


def test_ray_reader_max_rows_takes_the_first_kept_ids(ray_local, toy_dir):
    cfg = DataConfig(path=str(toy_dir), max_rows=7)
    dataset, stats = read_sft_dataset(cfg)
    ids = sorted(row["row_id"] for row in dataset.take_all())
    assert ids == [row["row_id"] for row in plain(cfg)[0]]
    assert len(ids) == 7
    assert stats.rows_kept == 7
    assert stats.rows_read < 40  # windows stop reading once max_rows rows are kept


def test_ray_reader_max_rows_over_several_windows(ray_local, tmp_path):
    # Mostly ties: the first window (planned for max_rows rows) cannot reach max_rows.
    path = write_pickapic_parquet(tmp_path / "ties.parquet", n_rows=30, seed=5, tie_fraction=0.6,
                                  row_group_size=2)
    cfg = DataConfig(path=str(path), max_rows=6)
    dataset, stats = read_sft_dataset(cfg)
    expected, expected_stats = plain(cfg)
    assert sorted(row["row_id"] for row in dataset.take_all()) == [row["row_id"] for row in expected]
    assert stats.rows_kept == 6
    assert stats.rows_read > 6


def test_ray_reader_folder(ray_local, tmp_path):
    rows = plain(DataConfig(path=str(write_pickapic_parquet(tmp_path / "src.parquet", n_rows=5, seed=2,
                                                            tie_fraction=0.0))))[0]
    root = tmp_path / "folder"
    root.mkdir()
    lines = []
    for row in rows:
        (root / f"{row['row_id']}.jpg").write_bytes(row["image"])
        lines.append(json.dumps({"file_name": f"{row['row_id']}.jpg", "caption": row["prompt"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    dataset, stats = read_sft_dataset(DataConfig(path=str(root), format="folder"))
    got = sorted(dataset.take_all(), key=lambda row: row["row_id"])
    assert [(r["prompt"], bytes(r["image"])) for r in got] == [(r["prompt"], r["image"]) for r in rows]
    assert stats.rows_kept == 5


def test_ray_reader_bad_rows(ray_local, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(write_pickapic_parquet(tmp_path / "src.parquet", n_rows=6, seed=3, tie_fraction=0.0))
    labels = table.column("label_0").to_pylist()
    labels[4] = 0.7
    broken = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels))
    path = tmp_path / "broken.parquet"
    pq.write_table(broken, path)

    with pytest.raises(DataError, match=r"broken\.parquet: row 4 \(row_id 4\), field 'label_0'"):
        read_sft_dataset(DataConfig(path=str(path)))
    with pytest.raises(DataError, match="max_bad_fraction"):
        read_sft_dataset(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.1))
    dataset, stats = read_sft_dataset(DataConfig(path=str(path), on_bad_row="skip", max_bad_fraction=0.2))
    assert sorted(row["row_id"] for row in dataset.take_all()) == [0, 1, 2, 3, 5]
    assert stats.bad_rows == {"bad_label": 1}
