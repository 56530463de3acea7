"""The opponent cache: a batch already on disk is read back, not generated again.

A training worker group replaced by Ray Train runs the iteration's pipeline again, and a
restarted generation actor redoes its batches: both reach OpponentGenerator with batches it
has already written."""

from __future__ import annotations

import numpy as np
import pytest

import spin_ray.diffusion
from spin_ray.generation import GeneratorSpec, OpponentGenerator
from spin_ray.opponents import find_batch, write_batch
from spin_ray.pair_schema import GENERATED_COLUMNS, dtype_of

COLUMNS = ["sample_id", "prompt", "latents_syn", "noise_seed"]


def stored_batch(first_id: int, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(first_id)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    return {"sample_id": ids, "prompt": np.asarray([f"p{i}" for i in ids], dtype=object),
            "latents_syn": rng.standard_normal((n, 4, 2, 2)).astype(np.float32), "noise_seed": ids * 7}


def test_find_batch_returns_the_stored_rows_in_the_asked_order(tmp_path):
    folder = str(tmp_path / "opponents")
    batch = stored_batch(10)
    write_batch(folder, stored_batch(13))  # another batch, another file name
    write_batch(folder, batch)
    found = find_batch(folder, np.asarray([12, 10, 11]), COLUMNS)
    assert found is not None and list(found) == COLUMNS
    order = [2, 0, 1]
    np.testing.assert_array_equal(found["sample_id"], batch["sample_id"][order])
    np.testing.assert_array_equal(found["latents_syn"], batch["latents_syn"][order])
    assert list(found["prompt"]) == list(batch["prompt"][order])


@pytest.mark.parametrize("asked", [[10, 11], [10, 11, 12, 13], [11, 12, 13]])
def test_find_batch_needs_exactly_the_same_samples(tmp_path, asked):
    folder = str(tmp_path / "opponents")
    write_batch(folder, stored_batch(10))
    assert find_batch(folder, np.asarray(asked), COLUMNS) is None


def test_find_batch_skips_a_damaged_file_or_one_without_the_columns(tmp_path):
    folder = tmp_path / "opponents"
    path = write_batch(str(folder), stored_batch(10))
    assert find_batch(str(folder), np.arange(10, 13), [*COLUMNS, "ref_mse_syn"]) is None
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert find_batch(str(folder), np.arange(10, 13), COLUMNS) is None
    assert find_batch(str(tmp_path / "missing"), np.arange(10, 13), COLUMNS) is None


def test_generator_reads_back_a_batch_it_already_wrote(tiny_pipeline_dir, tmp_path, monkeypatch):
    folder = tmp_path / "opponents"
    generator = OpponentGenerator(GeneratorSpec(
        model_path=str(tiny_pipeline_dir), iteration=1, run_seed=0, num_inference_steps=2, guidance_scale=3.0,
        eta=0.0, precompute_reference=True, shared_noise=True, opponents_dir=str(folder), device="cpu"))
    rng = np.random.default_rng(0)
    batch = {"sample_id": np.asarray([5, 6], dtype=np.int64), "row_id": np.asarray([5, 6], dtype=np.int64),
             "prompt": np.asarray(["a", "b"], dtype=object),
             "prompt_embeds": rng.standard_normal((2, 77, 32)).astype(np.float32),
             "latents_real": rng.standard_normal((2, 4, 16, 16)).astype(np.float32)}
    first = generator(batch)
    assert len(list(folder.glob("*.parquet"))) == 1
    assert {name: str(first[name].dtype) for name in GENERATED_COLUMNS} == {
        name: dtype_of(name) for name in GENERATED_COLUMNS}, "the generator writes the schema's dtypes"

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached batch was generated again")

    monkeypatch.setattr(spin_ray.diffusion, "sample_latents", no_sampling)
    again = generator({name: values[::-1] for name, values in batch.items()})
    assert len(list(folder.glob("*.parquet"))) == 1, "a cached batch was written again"
    assert set(again) == set(first) and set(GENERATED_COLUMNS) <= set(again)
    for name in first:
        if name != "prompt":
            np.testing.assert_array_equal(again[name], np.asarray(first[name])[::-1], err_msg=name)
    with pytest.raises(AssertionError, match="generated again"):
        generator({name: values[:1] for name, values in batch.items()})  # not a stored batch: generated
