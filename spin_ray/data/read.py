"""Reading the planned units: one unit into a tagged table, and the two readers built on it.

:func:`iter_sft_rows` reads in plain Python; :func:`read_sft_dataset` reads in Ray Data tasks
(one per unit), counting in one materialised pass (see :mod:`spin_ray.data`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spin_ray.config import DataConfig
from spin_ray.data.cleaning import (
    PICKAPIC_COLUMNS,
    clean_folder_records,
    clean_image_text_table,
    clean_pickapic_table,
)
from spin_ray.data.errors import SKIP_HINT, DataError, one_line
from spin_ray.data.files import split_uri
from spin_ray.data.plan import ReadUnit, plan_read
from spin_ray.data.stats import LOSER_COLUMN, STATUS_OK, TAGGED_SCHEMA, ReadStats, select_kept, tagged_stats
from spin_ray.input_limits import InputLimitError, read_parquet_capped

if TYPE_CHECKING:
    import ray.data


# ----------------------------------------------------------------------------- reading units


def read_unit(unit: ReadUnit, cfg: DataConfig, with_loser: bool = False) -> pa.Table:
    """Read and check one unit: its tagged table (output columns + ``status``); ``with_loser``:
    Pick-a-Pic rows keep their loser image too (:func:`clean_pickapic_table`)."""
    if cfg.format == "folder":
        root = unit.path.rsplit("/", 1)[0]
        return clean_folder_records(unit.records, metadata_path=unit.path, root=root,
                                    file_row_offset=unit.file_row_offset, first_row_id=unit.first_row_id,
                                    prompt_column=cfg.prompt_column, on_bad_row=cfg.on_bad_row,
                                    max_image_bytes=cfg.max_image_bytes)
    layout = unit.layout or cfg.format  # hf: the columns' layout, found when the read was planned
    try:
        table = _read_hf_batch(unit, cfg) if cfg.format == "hf" else _read_row_group(unit, cfg)
    except (OSError, pa.ArrowException, InputLimitError) as err:  # over the cap: its rows are unreadable
        return _unreadable_group(unit, cfg, err)
    if layout == "pickapic":
        return clean_pickapic_table(table, path=unit.path, file_row_offset=unit.file_row_offset,
                                    first_row_id=unit.first_row_id, prompt_column=cfg.prompt_column,
                                    on_bad_row=cfg.on_bad_row, max_image_bytes=cfg.max_image_bytes,
                                    with_loser=with_loser)
    return clean_image_text_table(table, path=unit.path, file_row_offset=unit.file_row_offset,
                                  first_row_id=unit.first_row_id, prompt_column=cfg.prompt_column,
                                  image_column=cfg.image_column, on_bad_row=cfg.on_bad_row,
                                  max_image_bytes=cfg.max_image_bytes)


def _needed_columns(layout: str, cfg: DataConfig) -> list[str]:
    return list(PICKAPIC_COLUMNS[1:]) + [cfg.prompt_column] if layout == "pickapic" else [cfg.prompt_column,
                                                                                          cfg.image_column]


def _read_hf_batch(unit: ReadUnit, cfg: DataConfig) -> pa.Table:
    from spin_ray.data.hf import read_hf_batch

    return read_hf_batch(unit.path, unit.row_group, _needed_columns(unit.layout, cfg), cfg.max_row_group_bytes)


def _read_row_group(unit: ReadUnit, cfg: DataConfig) -> pa.Table:
    columns = _needed_columns(cfg.format, cfg)
    filesystem, path = split_uri(unit.path)
    with filesystem.open_input_file(path) as handle:
        return read_parquet_capped(pq.ParquetFile(handle), columns, cfg.max_row_group_bytes,
                                   where=f"{unit.path}: row group {unit.row_group}",
                                   limit_key="data.max_row_group_bytes", row_groups=[unit.row_group])


def _unreadable_group(unit: ReadUnit, cfg: DataConfig, err: Exception) -> pa.Table:
    rows = f"rows {unit.file_row_offset}-{unit.file_row_offset + unit.num_rows - 1}"
    if cfg.on_bad_row == "fail":
        raise DataError(f"{unit.path}: row group {unit.row_group} ({rows}) is unreadable "
                        f"({one_line(err)}); {SKIP_HINT}")
    return pa.table({
        "prompt": [""] * unit.num_rows,
        "image": [b""] * unit.num_rows,
        "row_id": list(range(unit.first_row_id, unit.first_row_id + unit.num_rows)),
        LOSER_COLUMN: [b""] * unit.num_rows,
        "status": ["unreadable_file"] * unit.num_rows,
    }, schema=TAGGED_SCHEMA)


def read_units_batch(batch: pa.Table, cfg: DataConfig, with_loser: bool = False) -> pa.Table:
    """``map_batches`` body: a batch of JSON-encoded units (column ``unit``) -> one tagged table."""
    tables = [read_unit(ReadUnit.from_json(text), cfg, with_loser) for text in batch.column("unit").to_pylist()]
    return pa.concat_tables(tables) if tables else TAGGED_SCHEMA.empty_table()


# ----------------------------------------------------------------------------- plain Python reader


def iter_sft_rows(cfg: DataConfig, stats: ReadStats | None = None, with_loser: bool = False
                  ) -> Iterator[dict[str, Any]]:
    """Yield ``{"prompt", "image", "row_id"}`` rows in ``row_id`` order, without Ray (plus
    ``image_lose``, the Pick-a-Pic loser, when ``with_loser``).

    ``stats`` (if given) is updated as units are read. After the last row (or at
    ``max_rows``) the bad-row share is checked against ``max_bad_fraction`` and a
    :class:`DataError` is raised if it is too high or no row was usable.
    """
    stats = stats if stats is not None else ReadStats()
    units, plan_stats = plan_read(cfg)
    stats.add(plan_stats)
    for unit in units:
        tagged = read_unit(unit, cfg, with_loser)
        unit_stats = tagged_stats(tagged)
        unit_stats.rows_kept = 0  # counted below, as rows are delivered
        stats.add(unit_stats)
        for row in select_kept(tagged, with_loser=with_loser).to_pylist():
            if cfg.max_rows is not None and stats.rows_kept >= cfg.max_rows:
                break
            stats.rows_kept += 1
            yield row
        if cfg.max_rows is not None and stats.rows_kept >= cfg.max_rows:
            break
    _finish(stats, cfg)


def _finish(stats: ReadStats, cfg: DataConfig) -> None:
    stats.check(cfg.max_bad_fraction, cfg.path)
    if stats.rows_kept == 0:
        raise DataError(f"{cfg.path}: no usable rows ({stats.as_dict()})")


# ----------------------------------------------------------------------------- Ray Data reader


def read_sft_dataset(cfg: DataConfig, with_loser: bool = False) -> tuple[ray.data.Dataset, ReadStats]:
    """The SFT rows as a Ray dataset (``prompt``, ``image``, ``row_id``, and ``image_lose`` when
    ``with_loser``: a DPO baseline's (winner, loser) pairs) and the read's stats.

    Reads and checks every unit once in Ray tasks (materialised; see the module docstring),
    raises :class:`DataError` on a bad row under ``fail``, on too many bad rows under
    ``skip``, and when no row is usable.
    """
    units, stats = plan_read(cfg)
    parts = []
    ok_ids: list[pa.Array] = []
    for window in _windows(units, cfg.max_rows, stats):
        tagged = _materialize_tagged(window, cfg, with_loser)
        parts.append(tagged)
        for batch in tagged.select_columns(["row_id", "status"]).iter_batches(batch_format="pyarrow",
                                                                             batch_size=None):
            stats.add(tagged_stats(batch))
            if cfg.max_rows is not None:
                ok_ids.append(_kept_ids(batch))
    cutoff = _row_id_cutoff(ok_ids, cfg.max_rows)
    if cfg.max_rows is not None:
        stats.rows_kept = min(stats.rows_kept, cfg.max_rows)
    _finish(stats, cfg)
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return dataset.map_batches(select_kept, fn_kwargs={"max_row_id": cutoff, "with_loser": with_loser},
                               batch_format="pyarrow"), stats


def _materialize_tagged(units: list[ReadUnit], cfg: DataConfig, with_loser: bool = False
                        ) -> ray.data.MaterializedDataset:
    """Read ``units`` in Ray tasks (one block each) into a materialised tagged dataset."""
    import ray.data  # Ray only at this edge: the pure readers above must not need it

    items = [{"unit": unit.to_json()} for unit in units]
    tagged = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_units_batch, fn_kwargs={"cfg": cfg, "with_loser": with_loser}, batch_size=1, batch_format="pyarrow",
    )
    # Without this, Ray Data wraps a task's DataError in a UserCodeException whose cause is
    # lost on the way to the driver. The setting lives in this dataset's own context only.
    tagged.context.raise_original_map_exception = True
    try:
        return tagged.materialize()
    except DataError as err:  # a RayTaskError(DataError); its .cause is the worker's DataError
        cause = getattr(err, "cause", err)
        raise DataError(str(cause).splitlines()[0]) from None


def _kept_ids(tagged: pa.Table) -> pa.Array:
    """``row_id`` of the ``ok`` rows of a (``row_id``, ``status``) table."""
    return tagged.filter(pc.equal(tagged.column("status"), STATUS_OK)).column("row_id").combine_chunks()


def _row_id_cutoff(ok_ids: list[pa.Array], max_rows: int | None) -> int | None:
    """The largest ``row_id`` among the first ``max_rows`` kept rows; None keeps all."""
    if max_rows is None:
        return None
    ids = np.sort(np.concatenate([array.to_numpy() for array in ok_ids])) if ok_ids else np.empty(0)
    return int(ids[max_rows - 1]) if len(ids) > max_rows else None


def _windows(units: list[ReadUnit], max_rows: int | None, stats: ReadStats) -> Iterator[list[ReadUnit]]:
    """Consecutive slices of ``units`` to read in turn.

    Without ``max_rows`` one slice holds everything. With it, each slice plans enough rows
    to reach ``max_rows`` at the keep rate seen so far (``stats`` is updated by the caller
    between slices), and slicing stops once ``max_rows`` rows are kept.
    """
    if max_rows is None:
        if units:
            yield units
        return
    start = 0
    while start < len(units) and stats.rows_kept < max_rows:
        keep_rate = max(stats.rows_kept / stats.rows_read, 0.05) if stats.rows_read else 1.0
        wanted = math.ceil((max_rows - stats.rows_kept) / keep_rate)
        stop, planned = start, 0
        while stop < len(units) and planned < wanted:
            planned += units[stop].num_rows
            stop += 1
        yield units[start:stop]
        start = stop
