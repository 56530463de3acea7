"""The Ray Data reader gives the same rows, ids and stats as the plain reader."""

from __future__ import annotations

import io
import json

import numpy as np
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


def opponent_rows(first_id: int, n: int) -> dict:
    """A generated batch as spin_ray.generation writes it (tiny shapes)."""
    rng = np.random.default_rng(first_id)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    return {"sample_id": ids, "noise_seed": ids + 100, "prompt": np.asarray([f"p{i}" for i in ids], dtype=object),
            "prompt_embeds": rng.standard_normal((n, 3, 8)).astype(np.float32),
            "latents_real": rng.standard_normal((n, 4, 2, 2)).astype(np.float32),
            "latents_syn": rng.standard_normal((n, 4, 2, 2)).astype(np.float32),
            "ref_mse_real": rng.random(n).astype(np.float32), "ref_mse_syn": rng.random(n).astype(np.float32)}


def test_fully_cached_opponents_start_no_generator(ray_local, tmp_path):
    """A rerun, or a Tune trial on its iteration's shared opponents, reads the cache only: the
    generator spec points at no model, so a generation actor would fail the read."""
    from spin_ray.generation import GeneratorSpec
    from spin_ray.opponents import write_batch
    from spin_ray.pair_schema import PAIR_COLUMNS
    from spin_ray.pairs import spin_pairs

    folder = str(tmp_path / "opponents")
    batches = [opponent_rows(0, 3), opponent_rows(3, 3)]
    for batch in batches:
        write_batch(folder, batch)
    spec = GeneratorSpec(model_path=str(tmp_path / "no-model"), iteration=1, run_seed=0, num_inference_steps=2,
                         guidance_scale=1.0, eta=0.0, precompute_reference=True, shared_noise=True,
                         opponents_dir=folder)
    samples = ray.data.from_items([{"sample_id": i, "row_id": i} for i in range(6)])
    pairs = spin_pairs(samples, spec, n_samples=6, batch_size=2, num_actors=1, gpus_per_actor=0)
    rows = sorted(pairs.take_all(), key=lambda row: row["sample_id"])
    assert [row["sample_id"] for row in rows] == list(range(6))
    assert set(rows[0]) == set(PAIR_COLUMNS)
    np.testing.assert_array_equal(np.stack([row["latents_syn"] for row in rows]),
                                  np.concatenate([b["latents_syn"] for b in batches]))


def test_a_small_prepared_table_read_in_memory_gives_what_read_parquet_gives(ray_local, tmp_path, monkeypatch):
    """sample_table reads a small prepared table in the driver; a large one with Ray Data's
    read_parquet. Both give the same samples (ids, rows, values), passes included; the small
    table gives them in the data order itself, the large one each pass in file order."""
    import spin_ray.pairs
    from spin_ray.pairs import REPEAT_SHIFT, sample_table

    rng = np.random.default_rng(0)
    row_ids = (5, 1, 9, 2, 7, 3, 8)
    rows = [{"row_id": row_id, "prompt": f"prompt {row_id}",
             "prompt_embeds": rng.standard_normal((3, 8)).astype(np.float32),
             "latents_real": rng.standard_normal((4, 2, 2)).astype(np.float32)} for row_id in row_ids]
    by_id = {row["row_id"]: row for row in rows}
    # The trainer's DataConfig preserves order, as here; without it Ray Data yields blocks as they finish.
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    prepared = tmp_path / "prepared"
    ray.data.from_items(rows).repartition(3).write_parquet(str(prepared))
    assert len(list(prepared.glob("*.parquet"))) == 3

    def samples(offset):
        taken = sample_table(str(prepared), n_rows=len(rows), n_samples=17, seed=3, offset=offset).take_all()
        return [(r["sample_id"], r["row_id"], r["prompt"], r["prompt_embeds"].tolist(), r["latents_real"].tolist())
                for r in taken]

    # positions 4..20 of the cycle: 3 rows of pass 0, all 7 of pass 1, 7 of pass 2
    in_memory = samples(offset=4)
    sample_ids = [sample_id for sample_id, *_ in in_memory]
    assert len(sample_ids) == 17 == len(set(sample_ids))
    assert [sample_id >> REPEAT_SHIFT for sample_id in sample_ids] == [0] * 3 + [1] * 7 + [2] * 7
    order = [row_id for _, row_id, *_ in in_memory[3:10]]  # one whole pass: the permutation itself
    assert sorted(order) == sorted(row_ids) and order != sorted(order) and order != list(row_ids)
    assert [row_id for _, row_id, *_ in in_memory] == order[4:] + order + order
    for sample_id, row_id, prompt, embeds, latents in in_memory:  # each sample carries its own row's values
        assert sample_id & ((1 << REPEAT_SHIFT) - 1) == row_id and prompt == f"prompt {row_id}"
        assert embeds == by_id[row_id]["prompt_embeds"].tolist() and latents == by_id[row_id]["latents_real"].tolist()
    assert samples(offset=4) == in_memory  # deterministic
    monkeypatch.setattr(spin_ray.pairs, "IN_MEMORY_TABLE_BYTES", 0)
    large = samples(offset=4)
    assert sorted(large) == sorted(in_memory)
    assert [sample_id >> REPEAT_SHIFT for sample_id, *_ in large] == [0] * 3 + [1] * 7 + [2] * 7
    file_order = [row["row_id"] for row in ray.data.read_parquet(str(prepared)).take_all()]
    assert [row_id for _, row_id, *_ in large[3:10]] == file_order
