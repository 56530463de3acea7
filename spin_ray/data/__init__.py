"""SFT data readers: (prompt, image) rows for the "real" side of the SPIN loss.

Formats (``DataConfig.format``):

- ``pickapic``: Pick-a-Pic v2 parquet (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``,
  ``label_1``; other columns ignored). The winner is ``jpg_0`` when ``label_0 == 1`` and
  ``jpg_1`` when ``label_0 == 0``; ties (0.5) are dropped and counted. With ``with_loser`` (a
  Diffusion-DPO baseline) the other image is kept too, as ``image_lose``.
- ``parquet``: ``prompt_column`` + ``image_column`` holding encoded bytes, or a struct with
  a ``bytes`` field (how Hugging Face ``datasets`` writes images).
- ``folder``: image files plus ``metadata.jsonl`` or ``metadata.csv`` at the root, with
  ``file_name`` (the Hugging Face imagefolder convention; ``image_column`` if the metadata
  has no ``file_name``) and the caption field ``prompt_column``.
- ``hf``: a Hugging Face ``datasets`` dataset (a ``save_to_disk`` folder, a ``DatasetDict``'s
  ``train`` split, or a hub id when online) with Pick-a-Pic's columns or ``image_column`` +
  ``prompt_column``; its Arrow files are read one record batch per unit (:mod:`spin_ray.data.hf`).

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

Modules, in the order a read uses them (each imports only those above it):

- :mod:`spin_ray.data.errors`: :class:`DataError` and the wording its messages share.
- :mod:`spin_ray.data.stats`: the tagged table's schema and statuses, :class:`ReadStats`.
- :mod:`spin_ray.data.files`: local paths and URIs, listing parquet files, reading a file's bytes.
- :mod:`spin_ray.data.columns`: a format's needed columns are present and of the right type.
- :mod:`spin_ray.data.cleaning`: the pure row checks (``clean_*``, :func:`image_problem`).
- :mod:`spin_ray.data.plan`: :class:`ReadUnit` and :func:`plan_read` (footers, folder metadata).
- :mod:`spin_ray.data.read`: :func:`read_unit`, :func:`iter_sft_rows`, :func:`read_sft_dataset`.

Files are opened through ``pyarrow.fs`` (local paths and ``s3://`` / ``gs://`` / ``file://``
URIs): this package reads the user's own input data, and Ray Data takes a pyarrow filesystem,
so one filesystem layer serves both. Import the public names from ``spin_ray.data``.
"""

from spin_ray.data.cleaning import (
    FOLDER_FILE_FIELD,
    PICKAPIC_COLUMNS,
    PICKAPIC_LABELS,
    OnBadRow,
    clean_folder_records,
    clean_image_text_table,
    clean_pickapic_table,
    image_problem,
)
from spin_ray.data.columns import check_columns
from spin_ray.data.errors import DataError
from spin_ray.data.files import list_parquet_files, read_file_bytes
from spin_ray.data.plan import FOLDER_ROWS_PER_UNIT, METADATA_FILES, ReadUnit, plan_read, read_folder_metadata
from spin_ray.data.read import iter_sft_rows, read_sft_dataset, read_unit, read_units_batch
from spin_ray.data.stats import (
    BAD_REASONS,
    LOSER_COLUMN,
    OUTPUT_SCHEMA,
    PAIR_OUTPUT_SCHEMA,
    STATUS_OK,
    STATUS_TIE,
    TAGGED_SCHEMA,
    ReadStats,
    select_kept,
    tagged_stats,
)

__all__ = [
    "BAD_REASONS", "FOLDER_FILE_FIELD", "LOSER_COLUMN", "PAIR_OUTPUT_SCHEMA", "FOLDER_ROWS_PER_UNIT", "METADATA_FILES", "OUTPUT_SCHEMA",
    "PICKAPIC_COLUMNS", "PICKAPIC_LABELS", "STATUS_OK", "STATUS_TIE", "TAGGED_SCHEMA", "DataError",
    "OnBadRow", "ReadStats", "ReadUnit", "check_columns", "clean_folder_records", "clean_image_text_table",
    "clean_pickapic_table", "image_problem", "iter_sft_rows", "list_parquet_files", "plan_read",
    "read_file_bytes", "read_folder_metadata", "read_sft_dataset", "read_unit", "read_units_batch",
    "select_kept", "tagged_stats",
]
