"""``data.format: hf``: a Hugging Face ``datasets`` dataset as SFT input.

``data.path`` is a directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, whose
``train`` split is read), or a hub dataset id (``owner/name``, when the machine is online: loaded
with ``datasets.load_dataset(id, split="train")`` into its cache, whose files are then read the
same way). Either way the data is Arrow IPC stream files (``data-00000-of-000NN.arrow``), read
here with pyarrow, memory-mapped: one :class:`~spin_ray.data.plan.ReadUnit` per record batch, so
rows keep stable ``row_id`` values (their index over the files in the dataset's order) and a bad
row is named by file and row, as in the parquet formats. Ray Data's own reader
(``ray.data.from_huggingface``) is not used: it yields neither a row's index nor a way to count an
unreadable part instead of failing (the reasons :mod:`spin_ray.data` plans its reads itself).

The columns are recognised from the schema: Pick-a-Pic's (``caption``, ``jpg_0``, ``jpg_1``,
``label_0``, ``label_1``) or ``(data.image_column, data.prompt_column)``, the image an ``Image``
feature (a struct with ``bytes``) or binary bytes.
"""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa

from spin_ray.config import DataConfig
from spin_ray.data.cleaning import PICKAPIC_COLUMNS
from spin_ray.data.columns import check_columns
from spin_ray.data.errors import DataError
from spin_ray.data.files import split_uri

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SPLIT = "train"
STATE_FILE = "state.json"
DICT_FILE = "dataset_dict.json"


def layout_of(schema: pa.Schema) -> str:
    """``pickapic`` when the schema has Pick-a-Pic's columns, else ``parquet`` (image + caption)."""
    return "pickapic" if set(PICKAPIC_COLUMNS[1:]) <= set(schema.names) else "parquet"


def arrow_files(path: str) -> list[str]:
    """The dataset's Arrow files in its own order, from a ``save_to_disk`` directory or a hub id."""
    if os.path.isdir(path):
        return _saved_files(path)
    if HUB_ID.match(path):
        return _hub_files(path)
    raise DataError(f"{path}: not a directory saved with datasets' save_to_disk, nor a hub dataset id "
                    "(owner/name) (data.path with data.format=hf)")


def _saved_files(root: str) -> list[str]:
    if os.path.isfile(os.path.join(root, DICT_FILE)):  # a DatasetDict: its splits are folders
        splits = _read_json(os.path.join(root, DICT_FILE)).get("splits", [])
        if SPLIT not in splits:
            raise DataError(f"{root}: a DatasetDict without a {SPLIT!r} split (it has {', '.join(splits)}); "
                            f"give the split's folder as data.path")
        root = os.path.join(root, SPLIT)
    state_path = os.path.join(root, STATE_FILE)
    if not os.path.isfile(state_path):
        raise DataError(f"{root}: no {STATE_FILE}; expected a folder written by datasets' save_to_disk")
    names = [entry.get("filename") for entry in _read_json(state_path).get("_data_files", [])]
    if not names or not all(isinstance(name, str) and "/" not in name and name != ".." for name in names):
        raise DataError(f"{state_path}: '_data_files' does not list the dataset's arrow files")
    return [os.path.join(os.path.abspath(root), name) for name in names]


def _hub_files(dataset_id: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id}: reading a hub dataset needs the datasets package: "
                        "pip install 'spin_ray[hf]'") from None
    # the user's chosen dataset, data files only (no loading script runs: datasets 4+ dropped them)
    dataset = datasets.load_dataset(dataset_id, split=SPLIT)  # nosec B615
    return [entry["filename"] for entry in dataset.cache_files]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def open_stream(path: str) -> pa.ipc.RecordBatchStreamReader:
    """An Arrow stream reader on ``path``: memory-mapped when local (a batch costs no copy)."""
    if "://" not in path:
        return pa.ipc.open_stream(pa.memory_map(path, "r"))
    filesystem, inner = split_uri(path)
    return pa.ipc.open_stream(filesystem.open_input_file(inner))


def plan_hf(cfg: DataConfig):
    """The read units of an ``hf`` dataset (one per record batch), in ``row_id`` order, and its layout."""
    from spin_ray.data.plan import ReadUnit

    units, next_row_id, layout = [], 0, None
    for file in arrow_files(cfg.path):
        try:
            reader = open_stream(file)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{file}: not an Arrow stream file ({err})") from err
        if layout is None:
            layout = layout_of(reader.schema)
        check_columns(reader.schema, layout, cfg.prompt_column, cfg.image_column, file)
        offset = 0
        for index, batch in enumerate(reader):
            units.append(ReadUnit(file, offset, next_row_id + offset, batch.num_rows, row_group=index, layout=layout))
            offset += batch.num_rows
        next_row_id += offset
    return units


def read_hf_batch(path: str, index: int, columns: list[str], max_bytes: int) -> pa.Table:
    """Record batch ``index`` of the Arrow stream file ``path``, ``columns`` only; over ``max_bytes``
    (``data.max_row_group_bytes``) it is refused like an oversized parquet row group."""
    from spin_ray.input_limits import InputLimitError

    for position, batch in enumerate(open_stream(path)):
        if position == index:
            table = pa.Table.from_batches([batch]).select(columns)
            if table.nbytes > max_bytes:
                raise InputLimitError(f"{path}: record batch {index} holds {table.nbytes} bytes, over "
                                      f"data.max_row_group_bytes={max_bytes}")
            return table
    raise DataError(f"{path}: has no record batch {index} (the file changed since the read was planned)")
