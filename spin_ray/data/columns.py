"""Schema checks: every column a format needs is present, of the right type, and safe to convert."""

from __future__ import annotations

import pyarrow as pa

from spin_ray.data.errors import DataError
from spin_ray.safe_parquet import UnsafeParquetError, check_schema


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
