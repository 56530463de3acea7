"""Parquet reads that refuse columns whose conversion to Python runs code (issue 23, finding 1).

Importing ``ray.data`` registers an Arrow extension type for arbitrary Python objects
(``ray.data.arrow_pickled_object``); reading a parquet file then rebuilds that type from the
file's schema, and ``to_pylist`` / ``to_numpy`` / ``as_py`` on such a column unpickle every
value. A downloaded prompt file or a file planted in a run directory could so run code on the
driver. Any other Python extension type converts through its own Python code as well.

So the schema is checked before any data is read, and an extension type anywhere in a read
column (nested in a struct, list, map or dictionary too) is refused. The one exception is
Ray's fixed-shape tensor types, which :func:`spin_ray.opponents.write_batch` writes: their
values are plain numbers (their storage is still checked). An extension type this process has
not registered comes back as its storage type, with its name in the field metadata: that is
refused too, since a process that does register it (a Ray worker) would rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.errors import UserError

ALLOWED_EXTENSIONS = frozenset({"ray.data.arrow_tensor", "ray.data.arrow_tensor_v2"})
"""Extension types we write ourselves (opponent latents): numbers only, nothing unpickled."""

EXTENSION_NAME_KEY = b"ARROW:extension:name"


class UnsafeParquetError(UserError, ValueError):
    """A parquet column has an extension type; the message names the file and the column."""


def check_schema(schema: pa.Schema, where: str, columns: Sequence[str] | None = None,
                 expected: str = "plain arrow types") -> None:
    """Raise :class:`UnsafeParquetError` if a column of ``schema`` (only ``columns`` when
    given: the others are never converted) holds a refused extension type at any depth."""
    for field in schema:
        if columns is not None and field.name not in columns:
            continue
        extension = _refused_extension(field)
        if extension is not None:
            raise UnsafeParquetError(
                f"{where}: column {field.name!r} has extension type {extension}; expected {expected} "
                "— refusing to read it: converting such a column runs that type's Python code "
                "(Ray's arrow_pickled_object unpickles every value)")


def read_table_checked(source: Any, columns: Sequence[str] | None = None, *, where: str | None = None,
                       expected: str = "plain arrow types") -> pa.Table:
    """``pq.read_table(source, columns=columns)`` for one file (a path or an open binary
    file), after :func:`check_schema` on its footer; ``where`` names it in the error.

    A missing column raises ``pa.ArrowInvalid`` as ``pq.read_table`` does (``ParquetFile.read``
    alone would leave it out silently).
    """
    where = where or str(source)
    with pq.ParquetFile(source) as parquet:  # closes ``source`` only if it opened it
        schema = parquet.schema_arrow
        check_schema(schema, where, columns, expected)
        missing = [name for name in columns or () if name not in schema.names]
        if missing:
            raise pa.ArrowInvalid(f"{where}: no column {missing[0]!r}; columns are {', '.join(schema.names)}")
        return parquet.read(columns=list(columns) if columns is not None else None)


def _refused_extension(field: pa.Field) -> str | None:
    """The name of the first refused extension type in ``field``, or None."""
    name = (field.metadata or {}).get(EXTENSION_NAME_KEY)
    if name is not None:  # not registered in this process: read as its storage type
        return name.decode("utf-8", errors="replace")
    return _refused_in_type(field.type)


def _refused_in_type(dtype: pa.DataType) -> str | None:
    if isinstance(dtype, pa.BaseExtensionType):
        if dtype.extension_name not in ALLOWED_EXTENSIONS:
            return dtype.extension_name
        return _refused_in_type(dtype.storage_type)
    if pa.types.is_dictionary(dtype):  # reports no child fields
        return _refused_in_type(dtype.value_type)
    for index in range(dtype.num_fields):  # struct, list, map and union children
        found = _refused_extension(dtype.field(index))
        if found is not None:
            return found
    return None
