"""The user's files: URIs and local paths, listing parquet files, reading a file's bytes.

Local paths and ``s3://`` / ``gs://`` / ``file://`` URIs go through ``pyarrow.fs``: the same
filesystems Ray Data reads with, and no second client library for object stores.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase

import pyarrow as pa
import pyarrow.fs as pafs

from spin_ray.data.errors import DataError
from spin_ray.input_limits import MAX_METADATA_BYTES, read_regular_file


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://`` / ``gs://`` / ``file://`` URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"{uri}: cannot open this location ({err})") from err


def join_path(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name.lstrip('/')}"


def uri_prefix(uri: str) -> str:
    """``s3://`` for ``s3://bucket/key``; empty for local paths (pyarrow paths then are absolute)."""
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def read_file_bytes(uri: str, max_bytes: int = MAX_METADATA_BYTES, limit_key: str = "MAX_METADATA_BYTES") -> bytes:
    """The whole content of a local or remote regular file of at most ``max_bytes`` (``OSError``
    if unreadable; :class:`~spin_ray.input_limits.InputLimitError` if not a regular file or too big)."""
    filesystem, path = split_uri(uri)
    return read_regular_file(filesystem, path, max_bytes, limit_key)


def list_parquet_files(path: str) -> list[str]:
    """The parquet files of ``path`` (a file, a directory searched recursively, or a glob), sorted.

    Glob patterns use :mod:`fnmatch` on the full path (``*`` also matches ``/``).
    """
    filesystem, inner = split_uri(path)
    prefix = uri_prefix(path)
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
