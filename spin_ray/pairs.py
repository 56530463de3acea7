"""Ray Data pipelines that feed the trainer one iteration's samples.

An iteration trains on ``n_samples = steps x batch_size x accumulation x workers`` samples.
They are the first ``n_samples`` rows of the prepared real table, repeated as often as
needed (each repeat gets new sample ids, hence new opponent images and noise). For SPIN
each sample goes through the opponent generator; samples whose opponents are already on
disk (a restarted iteration) are read back instead of generated again.
"""

from __future__ import annotations

import math

import numpy as np

from spin_ray.generation import NOISE_STREAM, GeneratorSpec, OpponentGenerator, derive_seed
from spin_ray.opponents import cached_files
from spin_ray.pair_schema import PAIR_COLUMNS, SFT_COLUMNS, dtype_of

REPEAT_SHIFT = 32  # sample_id = repeat << 32 | row_id


def _with_sample_id(batch: dict[str, np.ndarray], repeat: int) -> dict[str, np.ndarray]:
    row_id = np.asarray(batch["row_id"], dtype=dtype_of("row_id"))
    if (row_id >= 1 << REPEAT_SHIFT).any() or (row_id < 0).any():
        raise ValueError(f"row_id out of range [0, 2**{REPEAT_SHIFT}): {row_id.min()}..{row_id.max()}")
    out = dict(batch)
    out["sample_id"] = ((np.int64(repeat) << REPEAT_SHIFT) | row_id).astype(dtype_of("sample_id"), copy=False)
    return out


IN_MEMORY_TABLE_BYTES = 512 << 20
"""A prepared table up to this size (of parquet files) is read by the driver, not by Ray Data."""


def read_prepared(prepared_path: str):
    """The prepared real table as a dataset, rows in the order of its sorted file names.

    A small table (at most :data:`IN_MEMORY_TABLE_BYTES`) is read here with pyarrow and
    handed to Ray as in-memory blocks: ``read_parquet`` starts a listing task, footer-reading
    actors and read tasks for every use of it, seconds of process start-up per iteration on a
    small machine, and once more for each repeat of the rows (:func:`sample_table`). Those
    files are schema-checked first (:mod:`spin_ray.safe_parquet`): their blocks are converted
    on Ray workers, where an extension-typed column would run its Python code.
    """
    import pyarrow as pa
    import ray.data

    from spin_ray.rundir import RunDir
    from spin_ray.safe_parquet import read_table_checked

    store = RunDir(prepared_path)
    files = [""] if store.is_file("") else [
        rel for rel in store.find() if rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith((".", "_"))]
    if sum(store.size(rel) for rel in files) > IN_MEMORY_TABLE_BYTES:
        return ray.data.read_parquet(prepared_path, file_extensions=["parquet"])
    tables = []
    for rel in files:
        with store.open_read(rel) as handle:
            tables.append(read_table_checked(handle, where=store.path(rel)))
    return ray.data.from_arrow(pa.concat_tables(tables))


def sample_table(prepared_path: str, n_rows: int, n_samples: int):
    """The iteration's ``n_samples`` sample rows (lazy dataset, deterministic order)."""
    if n_rows < 1:
        raise ValueError(f"{prepared_path}: the prepared table is empty")
    base = read_prepared(prepared_path)
    repeats = math.ceil(n_samples / n_rows)
    copies = [base.map_batches(_with_sample_id, fn_kwargs={"repeat": r}, batch_format="numpy")
              for r in range(repeats)]
    table = copies[0].union(*copies[1:]) if repeats > 1 else copies[0]
    return table.limit(n_samples)


def _without_ids(batch: dict[str, np.ndarray], done_ids: np.ndarray) -> dict[str, np.ndarray]:
    keep = ~np.isin(batch["sample_id"], done_ids)
    return {name: np.asarray(values)[keep] for name, values in batch.items()}


def _with_noise_seed(batch: dict[str, np.ndarray], run_seed: int, iteration: int) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["noise_seed"] = np.asarray(
        [derive_seed(run_seed, iteration, int(s), NOISE_STREAM) for s in batch["sample_id"]],
        dtype=dtype_of("noise_seed"))
    return out


def spin_pairs(samples, spec: GeneratorSpec, *, n_samples: int, batch_size: int, num_actors: int,
               gpus_per_actor: float, resources: dict[str, float] | None = None, cached=None):
    """(real, synthetic) pair rows: cached opponents first, then freshly generated ones.

    When ``spec.opponents_dir`` already holds all ``n_samples`` opponents (a rerun, or Tune
    trials sharing one generation) no generation actor starts: on a GPU cluster an idle
    actor would hold a GPU and load theta_k for nothing. ``cached``: what
    :func:`~spin_ray.opponents.cached_files` gave for ``spec.opponents_dir``, when the caller
    listed it already (each listing reads every cached file's ids).
    """
    import ray.data

    if cached is None:
        cached = cached_files(spec.opponents_dir) if spec.opponents_dir else ([], None)
    files, done_ids = cached
    cached = ray.data.read_parquet(files).select_columns(PAIR_COLUMNS) if files else None
    if cached is not None and len(done_ids) >= n_samples:
        return cached
    if cached is not None:
        samples = samples.map_batches(_without_ids, fn_kwargs={"done_ids": done_ids}, batch_format="numpy")
    # One generator batch per block: Ray Data streams whole blocks, so a block of a prepared
    # parquet file (thousands of rows) would hold the trainer back until all of it was generated.
    samples = samples.repartition(target_num_rows_per_block=batch_size)
    fresh = samples.map_batches(
        OpponentGenerator,
        fn_constructor_args=(spec,),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_gpus=gpus_per_actor or None,
        resources=resources or None,
    ).select_columns(PAIR_COLUMNS)
    return fresh if cached is None else cached.union(fresh)


def sft_samples(samples, *, run_seed: int, iteration: int):
    """Real-only rows for the SFT baseline: the sample table plus each sample's noise seed."""
    return samples.map_batches(
        _with_noise_seed, fn_kwargs={"run_seed": run_seed, "iteration": iteration}, batch_format="numpy",
    ).select_columns(SFT_COLUMNS)
