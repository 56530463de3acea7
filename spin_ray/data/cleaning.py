"""Row checks: a format's rows become a tagged table, each row kept, a tie or bad for one reason.

The functions here are pure (no Ray, no planning): they take rows already read (a parquet
row group, or folder metadata records whose image files they read) and apply the bad-row
policy (``on_bad_row``) row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa
from PIL import Image

from spin_ray.data.columns import check_columns
from spin_ray.data.errors import SKIP_HINT, DataError
from spin_ray.data.files import read_file_bytes
from spin_ray.data.stats import STATUS_OK, STATUS_TIE, TAGGED_SCHEMA
from spin_ray.input_limits import DEFAULT_MAX_IMAGE_BYTES, InputLimitError, decode_image, folder_member

OnBadRow = Literal["skip", "fail"]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PICKAPIC_LABELS = (0.0, 0.5, 1.0)
FOLDER_FILE_FIELD = "file_name"


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

    def keep(self, index: int, prompt: str, image: bytes, loser: bytes = b"") -> None:
        self._append(index, prompt, image, STATUS_OK, loser)

    def tie(self, index: int) -> None:
        self._append(index, "", b"", STATUS_TIE)

    def bad(self, index: int, reason: str, field_name: str, problem: str) -> None:
        if self.on_bad_row == "fail":
            raise DataError(
                f"{self.path}: {self.row_word} {self.file_row_offset + index} (row_id {self.first_row_id + index}), "
                f"field {field_name!r}: {problem}; {SKIP_HINT}"
            )
        self._append(index, "", b"", reason)

    def _append(self, index: int, prompt: str, image: bytes, status: str, loser: bytes = b"") -> None:
        for name, value in zip(TAGGED_SCHEMA.names, (prompt, image, self.first_row_id + index, loser, status),
                               strict=True):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=TAGGED_SCHEMA)


# ----------------------------------------------------------------------------- pure batch functions


def clean_pickapic_table(table: pa.Table, *, path: str, file_row_offset: int = 0, first_row_id: int = 0,
                         prompt_column: str = "caption", on_bad_row: OnBadRow = "fail",
                         max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, with_loser: bool = False) -> pa.Table:
    """Pick-a-Pic v2 rows -> tagged table (winner image, caption, row_id, loser image, status).

    Args:
        table: rows with ``prompt_column``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``.
        path: source file, for messages.
        file_row_offset: index in ``path`` of the table's first row.
        first_row_id: ``row_id`` of the table's first row.
        with_loser: keep the loser image too (``image_lose``, for Diffusion-DPO), checked like the
            winner (a loser that does not decode is a ``bad_image`` row); else it is not read.
            Ties (label 0.5) have no winner and are dropped and counted either way.
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
        loser = images[1 - winner][i].as_py() if with_loser else None
        _check_and_keep(tagger, i, columns[prompt_column][i], prompt_column,
                        images[winner][i].as_py(), f"jpg_{winner}", loser=loser, loser_field=f"jpg_{1 - winner}")
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
                    image_field: str, loser: bytes | None = None, loser_field: str = "") -> None:
    """Keep the row when its prompt and image (and ``loser``, when given) are good, else tag it bad."""
    prompt_issue = _prompt_problem(prompt)
    if prompt_issue is not None:
        tagger.bad(index, "empty_prompt", prompt_field, prompt_issue)
        return
    image_issue = image_problem(image, tagger.max_image_bytes)
    if image_issue is not None:
        tagger.bad(index, "bad_image", image_field, image_issue)
        return
    if loser is not None:
        loser_issue = image_problem(loser, tagger.max_image_bytes)
        if loser_issue is not None:
            tagger.bad(index, "bad_image", loser_field, loser_issue)
            return
    tagger.keep(index, prompt, image, loser or b"")
