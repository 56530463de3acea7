"""SFT data readers: (prompt, image) rows for the "real" side of the SPIN loss.

Formats (``DataConfig.format``):

- ``pickapic``: Pick-a-Pic v2 parquet (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``,
  ``label_1``; other columns ignored). The winner is ``jpg_0`` when ``label_0 == 1`` and
  ``jpg_1`` when ``label_0 == 0``; ties (0.5) are dropped and counted.
- ``parquet``: ``prompt_column`` + ``image_column`` holding encoded bytes, or a struct with
  a ``bytes`` field (how Hugging Face ``datasets`` writes images).
- ``folder``: image files plus ``metadata.jsonl`` or ``metadata.csv`` at the root, with
  ``file_name`` (the Hugging Face imagefolder convention; ``image_column`` if the metadata
  has no ``file_name``) and the caption field ``prompt_column``.

Output rows: ``prompt`` (string), ``image`` (binary, the encoded image bytes unchanged),
``row_id`` (int64): the row's index in the whole source, counted over the files in sorted
order (or over the metadata records), so reruns give the same ids.

Bad rows (reason key in ``ReadStats.bad_rows``): ``bad_image`` (missing, corrupt or
truncated bytes: every kept image is decoded with PIL; or over ``data.max_image_bytes`` or
the pixel cap: docs/SECURITY.md), ``empty_prompt``, ``bad_label``
(Pick-a-Pic labels outside {0, 0.5, 1} or not summing to 1), ``unreadable_file`` (a parquet
file or row group, or an image file, that cannot be read; a row group over
``data.max_row_group_bytes``; a folder file outside the folder, not a regular file or over
``data.max_image_bytes``; an unreadable parquet footer
counts as one row since its row count is unknown) and ``bad_metadata`` (a folder metadata
record that is not a JSON object or lacks a file name). ``on_bad_row: fail`` raises
:class:`DataError` naming the file, row and field; ``skip`` drops and counts them, and the
read fails when bad / read > ``max_bad_fraction``. A missing column or a column of the
wrong type is never a bad row: it fails under both policies.

Design. The read is planned on the driver from parquet footers (metadata only) or the folder
metadata: one :class:`ReadUnit` per parquet row group or per slice of metadata records, each
knowing its file, its first row index in that file and its first ``row_id``. Ray Data's
``read_parquet`` is not used because it exposes neither the row index within a file (needed
for stable ``row_id`` and for errors that name the row) nor a way to count an unreadable
file instead of failing. The pure, Ray-free :func:`read_unit` turns a unit into a *tagged*
table: the output columns plus ``status`` (``ok``, ``tie`` or a bad-row reason; dropped
rows carry an empty prompt and image, so they cost nothing). The same function drives
:func:`iter_sft_rows` (plain Python) and :func:`read_sft_dataset` (Ray Data, one task per
unit). The Ray path counts in a materialised pass: the tagged dataset is materialised
once, the small ``row_id``/``status`` columns are pulled to the driver for
:class:`ReadStats` and the ``max_rows`` cut (the first ``max_rows`` kept rows by ``row_id``,
independent of block order), and the returned dataset filters the materialised blocks,
so nothing is read or decoded twice. With ``max_rows`` the units are read in windows just
large enough to reach it, so a small run does not decode a whole large data set.
Row order in the Ray dataset is not guaranteed; ``row_id`` is the key.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from spin_ray.config import DataConfig
from spin_ray.errors import UserError
from spin_ray.input_limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_METADATA_BYTES,
    InputLimitError,
    decode_image,
    folder_member,
    read_parquet_capped,
    read_regular_file,
)
from spin_ray.safe_parquet import UnsafeParquetError, check_schema

if TYPE_CHECKING:
    import ray.data

OnBadRow = Literal["skip", "fail"]

STATUS_OK = "ok"
STATUS_TIE = "tie"
BAD_REASONS = ("bad_image", "empty_prompt", "bad_label", "unreadable_file", "bad_metadata")

OUTPUT_SCHEMA = pa.schema([("prompt", pa.string()), ("image", pa.binary()), ("row_id", pa.int64())])
TAGGED_SCHEMA = OUTPUT_SCHEMA.append(pa.field("status", pa.string()))

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PICKAPIC_LABELS = (0.0, 0.5, 1.0)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FOLDER_FILE_FIELD = "file_name"
FOLDER_ROWS_PER_UNIT = 256
"""Metadata records per read task in the folder format."""
_SKIP_HINT = "set data.on_bad_row=skip to drop such rows"


class DataError(UserError, ValueError):
    """The SFT data is unusable; the message names the file, row, field and what was expected."""

    label = "data error"


# ----------------------------------------------------------------------------- statistics


@dataclass
class ReadStats:
    """What a read saw: every row read is kept, a tie, or bad for one reason."""

    rows_read: int = 0
    rows_kept: int = 0
    """Rows delivered (after ``max_rows``)."""
    ties_dropped: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    """Bad-row count per reason (keys from :data:`BAD_REASONS`)."""

    @property
    def bad_total(self) -> int:
        return sum(self.bad_rows.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad_total / self.rows_read if self.rows_read else 0.0

    def add(self, other: ReadStats) -> None:
        """Accumulate ``other`` into this record."""
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.ties_dropped += other.ties_dropped
        for reason, count in other.bad_rows.items():
            self.count_bad(reason, count)

    def count_bad(self, reason: str, count: int = 1) -> None:
        if count:
            self.bad_rows[reason] = self.bad_rows.get(reason, 0) + count

    def check(self, max_bad_fraction: float, source: str) -> None:
        """Raise :class:`DataError` when bad / read exceeds ``max_bad_fraction``."""
        if self.bad_fraction > max_bad_fraction:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.bad_rows.items()))
            raise DataError(
                f"{source}: {self.bad_total} of {self.rows_read} rows are bad ({self.bad_fraction:.2%}; "
                f"{reasons}), more than data.max_bad_fraction={max_bad_fraction:.2%}"
            )

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-ready form (``bad_rows.<reason>`` keys)."""
        flat: dict[str, Any] = {
            "rows_read": self.rows_read, "rows_kept": self.rows_kept, "ties_dropped": self.ties_dropped,
        }
        flat.update({f"bad_rows.{reason}": count for reason, count in sorted(self.bad_rows.items())})
        return flat


def tagged_stats(tagged: pa.Table) -> ReadStats:
    """Counts of a tagged table's ``status`` column; ``rows_kept`` = rows with status ``ok``."""
    stats = ReadStats(rows_read=tagged.num_rows)
    for entry in pc.value_counts(tagged.column("status")).to_pylist():
        status, count = entry["values"], entry["counts"]
        if status == STATUS_OK:
            stats.rows_kept = count
        elif status == STATUS_TIE:
            stats.ties_dropped = count
        else:
            stats.count_bad(status, count)
    return stats


def select_kept(tagged: pa.Table, max_row_id: int | None = None) -> pa.Table:
    """The ``ok`` rows of a tagged table (optionally only ``row_id <= max_row_id``), output schema."""
    keep = pc.equal(tagged.column("status"), STATUS_OK)
    if max_row_id is not None:
        keep = pc.and_(keep, pc.less_equal(tagged.column("row_id"), max_row_id))
    return tagged.filter(keep).select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------- row checks


def image_problem(data: bytes | None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> str | None:
    """Why ``data`` is not a decodable image, or None when PIL decodes it fully.

    Over ``max_bytes`` (``data.max_image_bytes``) or over ``MAX_IMAGE_PIXELS`` (checked from the
    header, before decoding: see :mod:`spin_ray.input_limits`) is a problem too.
    """
    if not data:
        return "no image bytes"
    if len(data) > max_bytes:
        return f"image is {len(data)} bytes, more than data.max_image_bytes={max_bytes}"
    try:
        decode_image(data).close()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"image bytes do not decode ({type(err).__name__}: {err})"
    return None


def _prompt_problem(prompt: Any) -> str | None:
    if prompt is None:
        return "caption is missing (null)"
    if not isinstance(prompt, str) or not prompt.strip():
        return f"caption is empty ({prompt!r})"
    return None


def _label_problem(label_0: Any, label_1: Any) -> tuple[str, str] | None:
    """(field, problem) when the Pick-a-Pic labels are not a valid preference."""
    if label_0 is None or label_0 not in PICKAPIC_LABELS:
        return "label_0", f"got {label_0!r}, expected 0, 0.5 or 1"
    if label_1 is None or abs(label_0 + label_1 - 1.0) > 1e-6:
        return "label_1", f"got {label_1!r} with label_0={label_0!r}, expected label_1 = 1 - label_0"
    return None


class _Tagger:
    """Builds a tagged table row by row; applies the bad-row policy."""

    def __init__(self, path: str, file_row_offset: int, first_row_id: int, on_bad_row: OnBadRow,
                 row_word: str = "row", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.path = path
        self.file_row_offset = file_row_offset
        self.first_row_id = first_row_id
        self.on_bad_row = on_bad_row
        self.row_word = row_word
        self.max_image_bytes = max_image_bytes
        self.columns: dict[str, list] = {name: [] for name in TAGGED_SCHEMA.names}

    def keep(self, index: int, prompt: str, image: bytes) -> None:
        self._append(index, prompt, image, STATUS_OK)

    def tie(self, index: int) -> None:
        self._append(index, "", b"", STATUS_TIE)

    def bad(self, index: int, reason: str, field_name: str, problem: str) -> None:
        if self.on_bad_row == "fail":
            raise DataError(
                f"{self.path}: {self.row_word} {self.file_row_offset + index} (row_id {self.first_row_id + index}), "
                f"field {field_name!r}: {problem}; {_SKIP_HINT}"
            )
        self._append(index, "", b"", reason)

    def _append(self, index: int, prompt: str, image: bytes, status: str) -> None:
        for name, value in zip(TAGGED_SCHEMA.names, (prompt, image, self.first_row_id + index, status),
                               strict=True):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=TAGGED_SCHEMA)


# ----------------------------------------------------------------------------- pure batch functions


def clean_pickapic_table(table: pa.Table, *, path: str, file_row_offset: int = 0, first_row_id: int = 0,
                         prompt_column: str = "caption", on_bad_row: OnBadRow = "fail",
                         max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> pa.Table:
    """Pick-a-Pic v2 rows -> tagged table (winner image, caption, row_id, status).

    Args:
        table: rows with ``prompt_column``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``.
        path: source file, for messages.
        file_row_offset: index in ``path`` of the table's first row.
        first_row_id: ``row_id`` of the table's first row.
    """
    check_columns(table.schema, "pickapic", prompt_column, "", path)
    tagger = _Tagger(path, file_row_offset, first_row_id, on_bad_row, max_image_bytes=max_image_bytes)
    columns = {name: table.column(name).to_pylist() for name in (prompt_column, "label_0", "label_1")}
    images = (table.column("jpg_0"), table.column("jpg_1"))
    for i in range(table.num_rows):
        label_0, label_1 = columns["label_0"][i], columns["label_1"][i]
        label_issue = _label_problem(label_0, label_1)
        if label_issue is not None:
            tagger.bad(i, "bad_label", *label_issue)
            continue
        if label_0 == 0.5:
            tagger.tie(i)
            continue
        winner = 0 if label_0 == 1.0 else 1
        _check_and_keep(tagger, i, columns[prompt_column][i], prompt_column,
                        images[winner][i].as_py(), f"jpg_{winner}")
    return tagger.table()


def clean_image_text_table(table: pa.Table, *, path: str, file_row_offset: int = 0, first_row_id: int = 0,
                           prompt_column: str = "caption", image_column: str = "image",
                           on_bad_row: OnBadRow = "fail", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> pa.Table:
    """Generic (caption, image) rows -> tagged table; images are bytes or ``{"bytes": ...}`` structs."""
    check_columns(table.schema, "parquet", prompt_column, image_column, path)
    tagger = _Tagger(path, file_row_offset, first_row_id, on_bad_row, max_image_bytes=max_image_bytes)
    prompts = table.column(prompt_column).to_pylist()
    images = table.column(image_column)
    for i in range(table.num_rows):
        value = images[i].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        _check_and_keep(tagger, i, prompts[i], prompt_column, data, image_column)
    return tagger.table()


def clean_folder_records(records: Sequence[dict[str, Any]], *, metadata_path: str, root: str,
                         file_row_offset: int = 0, first_row_id: int = 0, prompt_column: str = "caption",
                         on_bad_row: OnBadRow = "fail", read_bytes: Callable[[str], bytes] | None = None,
                         max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> pa.Table:
    """Folder metadata records -> tagged table, reading each image file below ``root``.

    Each record is ``{"file_name": str | None, "prompt": Any, "error": str | None}`` as made
    by :func:`read_folder_metadata`; ``read_bytes(uri)`` defaults to :func:`read_file_bytes`
    capped at ``max_image_bytes``. A file name that leads outside ``root`` (``..``, a symlink)
    or to anything but a regular file is an ``unreadable_file`` row, never read.
    """
    read_bytes = read_bytes or (lambda uri: read_file_bytes(uri, max_image_bytes, "data.max_image_bytes"))
    tagger = _Tagger(metadata_path, file_row_offset, first_row_id, on_bad_row, row_word="record",
                     max_image_bytes=max_image_bytes)
    for i, record in enumerate(records):
        if record["error"] is not None:
            tagger.bad(i, "bad_metadata", FOLDER_FILE_FIELD, record["error"])
            continue
        prompt_issue = _prompt_problem(record["prompt"])
        if prompt_issue is not None:
            tagger.bad(i, "empty_prompt", prompt_column, prompt_issue)
            continue
        try:
            image_uri = folder_member(root, record["file_name"], FOLDER_FILE_FIELD)
            data = read_bytes(image_uri)
        except (OSError, InputLimitError) as err:
            tagger.bad(i, "unreadable_file", FOLDER_FILE_FIELD, f"cannot read {record['file_name']!r} ({err})")
            continue
        _check_and_keep(tagger, i, record["prompt"], prompt_column, data, FOLDER_FILE_FIELD)
    return tagger.table()


def _check_and_keep(tagger: _Tagger, index: int, prompt: Any, prompt_field: str, image: bytes | None,
                    image_field: str) -> None:
    prompt_issue = _prompt_problem(prompt)
    if prompt_issue is not None:
        tagger.bad(index, "empty_prompt", prompt_field, prompt_issue)
        return
    image_issue = image_problem(image, tagger.max_image_bytes)
    if image_issue is not None:
        tagger.bad(index, "bad_image", image_field, image_issue)
        return
    tagger.keep(index, prompt, image)


# ----------------------------------------------------------------------------- schema checks


def check_columns(schema: pa.Schema, data_format: str, prompt_column: str, image_column: str,
                  path: str) -> None:
    """Raise :class:`DataError` naming ``path`` and the column if a needed column is absent or mistyped.

    An extension type anywhere in a needed column (e.g. Ray's pickled objects, nested in an
    image struct) is refused before any value is converted: converting it would run code.
    """
    if data_format == "pickapic":
        expected = {prompt_column: "string", "jpg_0": "binary", "jpg_1": "binary",
                    "label_0": "number", "label_1": "number"}
    else:
        expected = {prompt_column: "string", image_column: "image"}
    for name, kind in expected.items():
        if name not in schema.names:
            raise DataError(
                f"{path}: missing column {name!r} (data.format={data_format!r}); "
                f"the file has columns {', '.join(schema.names)}"
            )
        try:
            check_schema(schema, path, [name], _KIND_TEXT[kind])
        except UnsafeParquetError as err:
            raise DataError(str(err)) from None
        dtype = schema.field(name).type
        if not _type_matches(dtype, kind):
            raise DataError(f"{path}: column {name!r} has type {dtype}, expected {_KIND_TEXT[kind]}")


_KIND_TEXT = {
    "string": "a string column",
    "binary": "a binary column of encoded image bytes",
    "number": "a numeric column",
    "image": "binary image bytes or a struct with a 'bytes' field",
}


def _type_matches(dtype: pa.DataType, kind: str) -> bool:
    if kind == "string":
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if kind == "binary":
        return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
    if kind == "number":
        return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)
    if pa.types.is_struct(dtype):
        index = dtype.get_field_index("bytes")
        return index >= 0 and _type_matches(dtype.field(index).type, "binary")
    return _type_matches(dtype, "binary")


# ----------------------------------------------------------------------------- files


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://`` / ``gs://`` / ``file://`` URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"{uri}: cannot open this location ({err})") from err


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name.lstrip('/')}"


def _uri_prefix(uri: str) -> str:
    """``s3://`` for ``s3://bucket/key``; empty for local paths (pyarrow paths then are absolute)."""
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def read_file_bytes(uri: str, max_bytes: int = MAX_METADATA_BYTES, limit_key: str = "MAX_METADATA_BYTES") -> bytes:
    """The whole content of a local or remote regular file of at most ``max_bytes`` (``OSError``
    if unreadable; :class:`~spin_ray.input_limits.InputLimitError` if not a regular file or too big)."""
    filesystem, path = _split_uri(uri)
    return read_regular_file(filesystem, path, max_bytes, limit_key)


def list_parquet_files(path: str) -> list[str]:
    """The parquet files of ``path`` (a file, a directory searched recursively, or a glob), sorted.

    Glob patterns use :mod:`fnmatch` on the full path (``*`` also matches ``/``).
    """
    filesystem, inner = _split_uri(path)
    prefix = _uri_prefix(path)
    if any(char in inner for char in "*?["):
        base = inner[: min(inner.find(c) for c in "*?[" if c in inner)].rsplit("/", 1)[0] or "/"
        infos = _list_tree(filesystem, base, path)
        found = [info.path for info in infos if info.is_file and fnmatchcase(info.path, inner)]
    else:
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{path}: no such file or directory (data.path)")
        if info.type == pafs.FileType.File:
            return [prefix + inner]
        infos = _list_tree(filesystem, inner, path)
        found = [i.path for i in infos if i.is_file and i.path.endswith(".parquet")]
    if not found:
        raise DataError(f"{path}: no .parquet files found (data.path)")
    return [prefix + p for p in sorted(found)]


def _list_tree(filesystem: pafs.FileSystem, base: str, shown: str) -> list[pafs.FileInfo]:
    try:
        return filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"{shown}: cannot list {base} ({err})") from err


# ----------------------------------------------------------------------------- planning


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
    return _plan_parquet(cfg)


def _plan_parquet(cfg: DataConfig) -> tuple[list[ReadUnit], ReadStats]:
    files = list_parquet_files(cfg.path)
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(_read_footer, files))
    units, stats, next_row_id = [], ReadStats(), 0
    for file, footer in zip(files, footers, strict=True):
        if isinstance(footer, str):
            if cfg.on_bad_row == "fail":
                raise DataError(f"{file}: unreadable parquet file ({footer}); {_SKIP_HINT}")
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
        filesystem, path = _split_uri(uri)
        with filesystem.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata
    except (OSError, pa.ArrowException) as err:
        return _one_line(err)


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


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
    filesystem, inner = _split_uri(root)
    present = [name for name in METADATA_FILES
               if filesystem.get_file_info(_join(inner, name)).type == pafs.FileType.File]
    if len(present) != 1:
        found = "both" if present else "neither"
        raise DataError(f"{root}: expected exactly one of {' or '.join(METADATA_FILES)} (found {found})")
    metadata_path = _uri_prefix(root) + _join(inner, present[0])
    try:
        text = read_file_bytes(metadata_path).decode("utf-8")
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


# ----------------------------------------------------------------------------- reading units


def read_unit(unit: ReadUnit, cfg: DataConfig) -> pa.Table:
    """Read and check one unit: its tagged table (output columns + ``status``)."""
    if cfg.format == "folder":
        root = unit.path.rsplit("/", 1)[0]
        return clean_folder_records(unit.records, metadata_path=unit.path, root=root,
                                    file_row_offset=unit.file_row_offset, first_row_id=unit.first_row_id,
                                    prompt_column=cfg.prompt_column, on_bad_row=cfg.on_bad_row,
                                    max_image_bytes=cfg.max_image_bytes)
    try:
        table = _read_row_group(unit, cfg)
    except (OSError, pa.ArrowException, InputLimitError) as err:  # over the cap: its rows are unreadable
        return _unreadable_group(unit, cfg, err)
    if cfg.format == "pickapic":
        return clean_pickapic_table(table, path=unit.path, file_row_offset=unit.file_row_offset,
                                    first_row_id=unit.first_row_id, prompt_column=cfg.prompt_column,
                                    on_bad_row=cfg.on_bad_row, max_image_bytes=cfg.max_image_bytes)
    return clean_image_text_table(table, path=unit.path, file_row_offset=unit.file_row_offset,
                                  first_row_id=unit.first_row_id, prompt_column=cfg.prompt_column,
                                  image_column=cfg.image_column, on_bad_row=cfg.on_bad_row,
                                  max_image_bytes=cfg.max_image_bytes)


def _read_row_group(unit: ReadUnit, cfg: DataConfig) -> pa.Table:
    columns = (list(PICKAPIC_COLUMNS[1:]) + [cfg.prompt_column] if cfg.format == "pickapic"
               else [cfg.prompt_column, cfg.image_column])
    filesystem, path = _split_uri(unit.path)
    with filesystem.open_input_file(path) as handle:
        return read_parquet_capped(pq.ParquetFile(handle), columns, cfg.max_row_group_bytes,
                                   where=f"{unit.path}: row group {unit.row_group}",
                                   limit_key="data.max_row_group_bytes", row_groups=[unit.row_group])


def _unreadable_group(unit: ReadUnit, cfg: DataConfig, err: Exception) -> pa.Table:
    rows = f"rows {unit.file_row_offset}-{unit.file_row_offset + unit.num_rows - 1}"
    if cfg.on_bad_row == "fail":
        raise DataError(f"{unit.path}: row group {unit.row_group} ({rows}) is unreadable "
                        f"({_one_line(err)}); {_SKIP_HINT}")
    return pa.table({
        "prompt": [""] * unit.num_rows,
        "image": [b""] * unit.num_rows,
        "row_id": list(range(unit.first_row_id, unit.first_row_id + unit.num_rows)),
        "status": ["unreadable_file"] * unit.num_rows,
    }, schema=TAGGED_SCHEMA)


def read_units_batch(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    """``map_batches`` body: a batch of JSON-encoded units (column ``unit``) -> one tagged table."""
    tables = [read_unit(ReadUnit.from_json(text), cfg) for text in batch.column("unit").to_pylist()]
    return pa.concat_tables(tables) if tables else TAGGED_SCHEMA.empty_table()


# ----------------------------------------------------------------------------- plain Python reader


def iter_sft_rows(cfg: DataConfig, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"prompt", "image", "row_id"}`` rows in ``row_id`` order, without Ray.

    ``stats`` (if given) is updated as units are read. After the last row (or at
    ``max_rows``) the bad-row share is checked against ``max_bad_fraction`` and a
    :class:`DataError` is raised if it is too high or no row was usable.
    """
    stats = stats if stats is not None else ReadStats()
    units, plan_stats = plan_read(cfg)
    stats.add(plan_stats)
    for unit in units:
        tagged = read_unit(unit, cfg)
        unit_stats = tagged_stats(tagged)
        unit_stats.rows_kept = 0  # counted below, as rows are delivered
        stats.add(unit_stats)
        for row in select_kept(tagged).to_pylist():
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


def read_sft_dataset(cfg: DataConfig) -> tuple[ray.data.Dataset, ReadStats]:
    """The SFT rows as a Ray dataset (``prompt``, ``image``, ``row_id``) and the read's stats.

    Reads and checks every unit once in Ray tasks (materialised; see the module docstring),
    raises :class:`DataError` on a bad row under ``fail``, on too many bad rows under
    ``skip``, and when no row is usable.
    """
    units, stats = plan_read(cfg)
    parts = []
    ok_ids: list[pa.Array] = []
    for window in _windows(units, cfg.max_rows, stats):
        tagged = _materialize_tagged(window, cfg)
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
    return dataset.map_batches(select_kept, fn_kwargs={"max_row_id": cutoff}, batch_format="pyarrow"), stats


def _materialize_tagged(units: list[ReadUnit], cfg: DataConfig) -> ray.data.MaterializedDataset:
    """Read ``units`` in Ray tasks (one block each) into a materialised tagged dataset."""
    import ray.data  # Ray only at this edge: the pure readers above must not need it

    items = [{"unit": unit.to_json()} for unit in units]
    tagged = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_units_batch, fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow",
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
