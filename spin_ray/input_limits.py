"""Limits on input this job does not trust (issue 23, findings 3-5); see docs/SECURITY.md.

Downloaded training data and prompt files are untrusted: a name in them must not lead a read
outside its folder, a file must not be a device or a fifo, and nothing may grow in memory
far beyond what its file costs on disk (decompression bombs). Every check here runs before
the expensive step (the read, the decode) and fails with :class:`InputLimitError`, a one-line
message naming the input and the limit; the callers turn it into a bad row or their own error.

- Containment: :func:`contained_local_path` (symlinks resolved), :func:`folder_member`.
- Regular files under a size cap: :func:`read_regular_file`, :func:`read_local_file`.
- Images: :data:`MAX_IMAGE_PIXELS`, :func:`decode_image` (size checked from the header).
- Parquet: :func:`declared_bytes` (footer sizes) and :func:`read_parquet_capped` (decoded sizes).
- Text: :func:`decode_utf8` (a byte that is not UTF-8 is named by its line).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from spin_ray.config import DataConfig, EvalConfig
from spin_ray.errors import UserError

MAX_IMAGE_PIXELS = 1 << 26
"""Largest image accepted, in pixels (67,108,864: 8192 x 8192, about 200 MB as RGB). PIL's own
default (89.5 Mpx, an error only at twice that) let a 518 KB PNG decode to 507 MB. Training
and evaluation images are 512-1024 px, so this leaves room for any real photograph."""

DEFAULT_MAX_IMAGE_BYTES: int = DataConfig.max_image_bytes
"""Default ``data.max_image_bytes`` (64 MiB): one encoded image (a parquet cell or a folder's file)."""
DEFAULT_MAX_PROMPT_FILE_BYTES: int = EvalConfig.max_prompt_file_bytes
"""Default ``eval.max_prompt_file_bytes`` (64 MiB): one prompt file (a parquet file's caption column)."""
MAX_METADATA_BYTES = 256 << 20
"""An image folder's ``metadata.jsonl`` / ``metadata.csv`` (several million records)."""

PARQUET_BATCH_ROWS = 32
"""Rows decoded at a time by :func:`read_parquet_capped`: the cap is checked between batches."""


class InputLimitError(UserError, ValueError):
    """Input outside its folder, not a regular file, or over a limit; one line naming both."""


# ----------------------------------------------------------------------------- containment


def contained_local_path(root: str | os.PathLike[str], key: str, what: str = "key") -> Path:
    """``root/key`` with symlinks and ``..`` resolved; refused unless strictly inside ``root``.

    A leading ``/`` in ``key`` is dropped (object keys and ``file_name`` values are relative).
    """
    base = Path(os.path.realpath(root))
    try:
        target = Path(os.path.realpath(base / key.lstrip("/")))
    except ValueError as err:  # an embedded NUL byte
        raise InputLimitError(f"{what} {key!r}: not a valid path ({err})") from None
    if target == base or not target.is_relative_to(base):
        raise InputLimitError(f"{what} {key!r} resolves to {target}, outside {base}; refusing it")
    return target


def folder_member(root: str, name: str, what: str = "file_name") -> str:
    """The location of ``name`` inside the folder ``root`` (a local path or a URI), refused if
    it leaves ``root``. Local paths resolve symlinks; object-store URIs have none, so their
    paths are normalised lexically (``a/../b`` is ``b``)."""
    if "://" not in root or root.startswith("file://"):
        local_root = root[len("file://"):] if root.startswith("file://") else root
        return str(contained_local_path(local_root, name, what))
    scheme, inner = root.split("://", 1)
    base = posixpath.normpath("/" + inner)
    target = posixpath.normpath(posixpath.join(base, name.lstrip("/")))
    if "\x00" in name or not target.startswith(base.rstrip("/") + "/"):
        raise InputLimitError(f"{what} {name!r} resolves to {scheme}:/{target}, outside {root}; refusing it")
    return f"{scheme}://{target.lstrip('/')}"


# ----------------------------------------------------------------------------- regular files, capped


@contextlib.contextmanager
def open_regular_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading, refused unless it is a regular file. The check is
    on the opened descriptor, so the file cannot be swapped for a device after it."""
    # O_NONBLOCK: opening a fifo must not wait for a writer (fstat then refuses it).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    handle = os.fdopen(fd, "rb")
    with handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputLimitError(f"{path}: not a regular file; expected a plain file, not a device, "
                                  "fifo or directory")
        yield handle


def read_local_file(path: str | os.PathLike[str], max_bytes: int, limit_key: str) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular_file`), refused unread if
    over ``max_bytes`` (``limit_key`` names the setting); the read stops at ``max_bytes + 1``
    in case the file grows after the check."""
    with open_regular_file(path) as handle:
        _check_size(path, os.fstat(handle.fileno()).st_size, max_bytes, limit_key)
        data = handle.read(max_bytes + 1)
    _check_size(path, len(data), max_bytes, limit_key)
    return data


def read_regular_file(filesystem: pafs.FileSystem, path: str, max_bytes: int, limit_key: str) -> bytes:
    """:func:`read_local_file` for a pyarrow filesystem path (local or an object store)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return read_local_file(path, max_bytes, limit_key)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file")
    if info.type != pafs.FileType.File:
        raise InputLimitError(f"{path}: not a regular file (a {info.type.name.lower()})")
    _check_size(path, info.size, max_bytes, limit_key)
    with filesystem.open_input_stream(path) as stream:
        data = stream.read(max_bytes + 1)
    _check_size(path, len(data), max_bytes, limit_key)
    return data


def _check_size(where: object, size: int | None, max_bytes: int, limit_key: str) -> None:
    if size is not None and size > max_bytes:
        raise InputLimitError(f"{where}: {size} bytes, more than {limit_key}={max_bytes}")


# ----------------------------------------------------------------------------- images


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; otherwise an :class:`InputLimitError` naming ``where``, the line
    (1-based) and the offset of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputLimitError(f"{where}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                              f"{err.start}); save the file as UTF-8") from None


@contextlib.contextmanager
def image_bomb_guard() -> Iterator[None]:
    """Within the block PIL refuses images over :data:`MAX_IMAGE_PIXELS`: its
    ``DecompressionBombWarning`` (above the limit; the error comes only at twice it) is raised."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def check_image_size(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an opened (header-only) image whose width x height exceeds ``max_pixels``."""
    width, height = image.size
    if width * height > max_pixels:
        raise InputLimitError(f"image is {width}x{height} = {width * height} pixels, more than "
                              f"MAX_IMAGE_PIXELS={max_pixels} (spin_ray.input_limits); a decompression bomb?")


def decode_image(data: bytes) -> Image.Image:
    """The fully decoded image of ``data``. Its size is read from the header (``Image.open``
    is lazy) and checked before any pixel is decoded; a bomb raises :class:`InputLimitError`
    or ``DecompressionBombWarning`` / ``DecompressionBombError``."""
    with image_bomb_guard():
        image = Image.open(io.BytesIO(data))
        try:
            check_image_size(image)
            image.load()  # decodes every pixel: catches truncated files that open() accepts
        except BaseException:
            image.close()
            raise
    return image


# ----------------------------------------------------------------------------- parquet


def declared_bytes(metadata: pq.FileMetaData, columns: Sequence[str], row_groups: Sequence[int]) -> int:
    """Uncompressed bytes the footer declares for ``columns`` (top-level names, nested
    children included) in ``row_groups``: known before anything is decompressed."""
    wanted = set(columns)
    total = 0
    for group in row_groups:
        meta = metadata.row_group(group)
        for index in range(meta.num_columns):
            chunk = meta.column(index)
            if chunk.path_in_schema.split(".", 1)[0] in wanted:
                total += chunk.total_uncompressed_size
    return total


def read_parquet_capped(parquet: pq.ParquetFile, columns: Sequence[str], max_bytes: int, *, where: str,
                        limit_key: str, row_groups: Sequence[int] | None = None) -> pa.Table:
    """``columns`` of ``row_groups`` (default all) of an open parquet file, refused if they hold
    more than ``max_bytes``: first by the footer's declared sizes, then, since a footer can
    lie, by the decoded size, checked every :data:`PARQUET_BATCH_ROWS` rows."""
    groups = list(range(parquet.metadata.num_row_groups)) if row_groups is None else list(row_groups)
    declared = declared_bytes(parquet.metadata, columns, groups)
    if declared > max_bytes:
        raise InputLimitError(f"{where}: {declared} bytes uncompressed (declared in the footer), "
                              f"more than {limit_key}={max_bytes}")
    batches, decoded = [], 0
    for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=list(columns)):
        decoded += batch.nbytes
        if decoded > max_bytes:
            raise InputLimitError(f"{where}: more than {limit_key}={max_bytes} bytes once decoded "
                                  f"(the footer declared {declared})")
        batches.append(batch)
    if not batches:  # no rows: read_row_groups gives the empty table with its schema
        return parquet.read_row_groups(groups, columns=list(columns))
    return pa.Table.from_batches(batches)
