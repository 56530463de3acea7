"""Planning a read on the driver: the :class:`ReadUnit` list, from parquet footers or folder metadata.

Planning reads metadata only (parquet footers, or a folder's ``metadata.jsonl`` /
``metadata.csv``); the units carry what a read task needs, so the tasks never list files.
"""

from __future__ import annotations

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spin_ray.config import DataConfig
from spin_ray.data.cleaning import FOLDER_FILE_FIELD
from spin_ray.data.columns import check_columns
from spin_ray.data.errors import SKIP_HINT, DataError, one_line
from spin_ray.data.files import join_path, list_parquet_files, read_file_bytes, split_uri, uri_prefix
from spin_ray.data.stats import ReadStats
from spin_ray.input_limits import InputLimitError, decode_utf8

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FOLDER_ROWS_PER_UNIT = 256
"""Metadata records per read task in the folder format."""


@dataclass(frozen=True)
class ReadUnit:
    """One read task: a parquet row group, or a slice of a folder's metadata records."""

    path: str
    """Parquet file, or the folder's metadata file (URI or local path)."""
    file_row_offset: int
    """Index in ``path`` of the unit's first row."""
    first_row_id: int
    num_rows: int
    row_group: int = -1
    """Parquet row group; -1 for folder units."""
    records: tuple[dict[str, Any], ...] = ()
    """Folder units: the metadata records (see :func:`clean_folder_records`)."""
    layout: str = ""
    """``hf`` units: the columns' layout, ``pickapic`` or ``parquet`` (:func:`spin_ray.data.hf.layout_of`);
    ``row_group`` is then the record batch in the Arrow file."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ReadUnit:
        values = json.loads(text)
        values["records"] = tuple(values["records"])
        return ReadUnit(**values)


def plan_read(cfg: DataConfig) -> tuple[list[ReadUnit], ReadStats]:
    """The units to read, in ``row_id`` order, and the stats of what planning already dropped.

    Reads only parquet footers (or the folder metadata). Under ``on_bad_row: skip`` a file
    whose footer cannot be read is counted as one ``unreadable_file`` row and left out.
    """
    if not cfg.path:
        raise DataError("data.path: empty; give a parquet file, directory, glob or image folder")
    if cfg.format == "folder":
        return _plan_folder(cfg), ReadStats()
    if cfg.format == "hf":
        from spin_ray.data.hf import plan_hf

        return plan_hf(cfg), ReadStats()
    return _plan_parquet(cfg)


def _plan_parquet(cfg: DataConfig) -> tuple[list[ReadUnit], ReadStats]:
    files = list_parquet_files(cfg.path)
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(_read_footer, files))
    units, stats, next_row_id = [], ReadStats(), 0
    for file, footer in zip(files, footers, strict=True):
        if isinstance(footer, str):
            if cfg.on_bad_row == "fail":
                raise DataError(f"{file}: unreadable parquet file ({footer}); {SKIP_HINT}")
            stats.rows_read += 1
            stats.count_bad("unreadable_file")
            continue
        check_columns(footer.schema.to_arrow_schema(), cfg.format, cfg.prompt_column, cfg.image_column, file)
        offset = 0
        for group in range(footer.num_row_groups):
            rows = footer.row_group(group).num_rows
            units.append(ReadUnit(file, offset, next_row_id + offset, rows, row_group=group))
            offset += rows
        next_row_id += offset
    return units, stats


def _read_footer(uri: str) -> pq.FileMetaData | str:
    """The parquet footer of ``uri``, or the reason it cannot be read."""
    try:
        filesystem, path = split_uri(uri)
        with filesystem.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata
    except (OSError, pa.ArrowException) as err:
        return one_line(err)


def _plan_folder(cfg: DataConfig) -> list[ReadUnit]:
    metadata_path, records = read_folder_metadata(cfg.path, cfg.prompt_column, cfg.image_column)
    units = []
    for start in range(0, len(records), FOLDER_ROWS_PER_UNIT):
        chunk = tuple(records[start:start + FOLDER_ROWS_PER_UNIT])
        units.append(ReadUnit(metadata_path, start, start, len(chunk), records=chunk))
    return units


def read_folder_metadata(root: str, prompt_column: str, image_column: str) -> tuple[str, list[dict[str, Any]]]:
    """(metadata file, records) of an image folder; each record has ``file_name``, ``prompt``, ``error``.

    Malformed records are kept with ``error`` set so that the read can count or report them.
    """
    filesystem, inner = split_uri(root)
    present = [name for name in METADATA_FILES
               if filesystem.get_file_info(join_path(inner, name)).type == pafs.FileType.File]
    if len(present) != 1:
        found = "both" if present else "neither"
        raise DataError(f"{root}: expected exactly one of {' or '.join(METADATA_FILES)} (found {found})")
    metadata_path = uri_prefix(root) + join_path(inner, present[0])
    try:
        text = decode_utf8(read_file_bytes(metadata_path), metadata_path)
    except (OSError, UnicodeDecodeError, InputLimitError) as err:
        raise DataError(f"{metadata_path}: cannot read the metadata ({err})") from err
    rows = _jsonl_rows(text) if present[0].endswith(".jsonl") else _csv_rows(text, metadata_path)
    parsed = [row for row in rows if isinstance(row, dict)]
    if not parsed:
        raise DataError(f"{metadata_path}: no metadata records")
    fields = set(parsed[0])
    file_field = FOLDER_FILE_FIELD if FOLDER_FILE_FIELD in fields or image_column not in fields else image_column
    for name in (file_field, prompt_column):
        if name not in fields:
            raise DataError(
                f"{metadata_path}: missing field {name!r} (data.prompt_column={prompt_column!r}; the file "
                f"name comes from {FOLDER_FILE_FIELD!r}); the first record has {', '.join(sorted(fields))}"
            )
    return metadata_path, [_folder_record(row, file_field, prompt_column) for row in rows]


def _jsonl_rows(text: str) -> list[dict[str, Any] | str]:
    """One entry per non-blank line: the parsed object, or a string saying why it is not one."""
    rows: list[dict[str, Any] | str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(f"line {number} is not valid JSON ({err})")
            continue
        rows.append(value if isinstance(value, dict) else f"line {number} is not a JSON object")
    return rows


def _csv_rows(text: str, path: str) -> list[dict[str, Any] | str]:
    try:
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err


def _folder_record(row: dict[str, Any] | str, file_field: str, prompt_column: str) -> dict[str, Any]:
    if isinstance(row, str):
        return {"file_name": None, "prompt": None, "error": row}
    name = row.get(file_field)
    if not isinstance(name, str) or not name:
        return {"file_name": None, "prompt": None, "error": f"{file_field!r} is missing or empty ({name!r})"}
    return {"file_name": name, "prompt": row.get(prompt_column), "error": None}
