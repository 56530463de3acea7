"""An iteration's opponent cache on disk: ``iter_k/opponents/part-<first sample id>-<uid>.parquet``.

Each batch the opponent generator produces is written as one parquet file, atomically, so a
rerun, or a pipeline run again after a failure, reuses what was generated instead of
generating it again (docs/DESIGN.md section 3.3: seeds depend on the sample, so a cached opponent
is exactly what generating it again would give).
"""

from __future__ import annotations

import uuid

import numpy as np

from spin_ray.rundir import RunDir

FILE_PATTERN = "part-{first_id:020d}-{uid}.parquet"


def write_batch(opponents_dir: str, batch: dict[str, np.ndarray]) -> str:
    """Write one generated batch as a parquet file, atomically (temp name, then rename).

    Returns the file's path. Tensor columns use Ray's Arrow tensor type, so
    ``ray.data.read_parquet`` gives them back as arrays of their original shape.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    columns = {}
    for name, values in batch.items():
        values = np.asarray(values)
        columns[name] = ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)
    store = RunDir(opponents_dir)
    name = FILE_PATTERN.format(first_id=int(np.min(batch["sample_id"])), uid=uuid.uuid4().hex[:8])
    with store.open_atomic(name) as handle:  # a temp name that is not *.parquet, then a rename (or one PUT)
        pq.write_table(pa.table(columns), handle)
    return store.path(name)


def cached_files(opponents_dir: str) -> tuple[list[str], np.ndarray]:
    """Finished opponent files in ``opponents_dir`` and the sample ids they hold.

    A batch redone after a crash may have been written twice: later files that overlap an
    earlier one are left out, so every sample is read once. A file with an extension-typed
    column other than the tensors we write raises (:mod:`spin_ray.safe_parquet`).
    """
    import pyarrow.parquet as pq

    from spin_ray.safe_parquet import check_schema

    store = RunDir(opponents_dir)
    if not store.exists(""):
        return [], np.zeros(0, dtype=np.int64)
    files, seen = [], set()
    for rel in store.glob("*.parquet"):
        with store.open_read(rel) as handle, pq.ParquetFile(handle) as parquet:
            check_schema(parquet.schema_arrow, store.path(rel))  # every column: the file goes to read_parquet whole
            ids = set(parquet.read(columns=["sample_id"]).column("sample_id").to_pylist())
        if ids & seen:
            continue
        seen |= ids
        files.append(store.path(rel))
    return files, np.asarray(sorted(seen), dtype=np.int64)


def find_batch(opponents_dir: str, sample_ids: np.ndarray, columns: list[str]) -> dict[str, np.ndarray] | None:
    """The ``columns`` of an already written batch of exactly ``sample_ids`` (rows in that
    order), or None.

    Only files named after the batch's first sample id are opened: one listing per batch. A
    file that does not parse or lacks a column does not count (the batch is generated again);
    one with an extension-typed column is no damaged batch but a file we never write, and
    raises :class:`spin_ray.safe_parquet.UnsafeParquetError` before any value is read.
    """
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from spin_ray.safe_parquet import UnsafeParquetError, read_table_checked

    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    store = RunDir(opponents_dir)
    prefix = FILE_PATTERN.format(first_id=int(sample_ids.min()), uid="")[:-len(".parquet")]
    for rel in store.glob(f"{prefix}*.parquet"):
        try:
            with store.open_read(rel) as handle:
                table = read_table_checked(handle, columns, where=store.path(rel))
        except UnsafeParquetError:  # not a damaged batch but a file we never write: stop, do not skip it
            raise
        except (OSError, ValueError, pa.ArrowException):
            continue
        stored = table.column("sample_id").to_numpy()
        if len(stored) != len(sample_ids) or set(stored.tolist()) != set(sample_ids.tolist()):
            continue
        row_of = {int(sample_id): row for row, sample_id in enumerate(stored)}
        ordered = table.take(pa.array([row_of[int(s)] for s in sample_ids], type=pa.int64()))
        return BlockAccessor.for_block(ordered).to_batch_format("numpy")
    return None
