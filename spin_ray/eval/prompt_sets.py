"""Evaluation prompt sets: one loader that recognises the set from its path.

- ``toy``: the toy world's held-out validation prompts (:func:`spin_ray.toy.world.validation_prompts`),
  the report's set.
- ``toy_selection``: other held-out toy prompts, none of them in ``toy``
  (:func:`spin_ray.toy.world.selection_prompts`), for ``eval.selection_prompts``.
- a ``.parquet`` file, or a directory of them: Pick-a-Pic (e.g. the ``test_unique`` or
  ``validation_unique`` split files); the ``caption`` column, with or without the image
  columns, deduplicated in order.
- a ``.tsv`` file: PartiPrompts (``Prompt`` column).
- a directory with ``anime.json``, ``concept-art.json``, ``paintings.json`` and
  ``photo.json``: the HPSv2 benchmark, each file a JSON list of prompts; the four styles
  are concatenated in that order. A single ``.json`` list file is read the same way.
- a ``.txt`` file: one prompt per line, blank lines skipped.

``eval.prompts`` is one such path or a list of them (:func:`prompt_set_paths`); each set gets
a short name (:func:`prompt_set_names`), its folder in the run dir when there are several.
``eval.selection_prompts`` names the sets that choose between models (sweep trials,
checkpoints; :func:`selection_prompt_set`), kept apart from the report's.

Prompt files are downloads, so untrusted (docs/SECURITY.md): each file must be a regular file
of at most ``max_file_bytes`` (``eval.max_prompt_file_bytes``; for parquet, the caption
column's uncompressed bytes), checked before it is read, not after.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.config import ConfigError
from spin_ray.errors import UserError
from spin_ray.input_limits import (
    DEFAULT_MAX_PROMPT_FILE_BYTES,
    InputLimitError,
    decode_utf8,
    open_regular_file,
    read_local_file,
    read_parquet_capped,
)
from spin_ray.safe_parquet import UnsafeParquetError, check_schema
from spin_ray.toy.world import selection_prompts, validation_prompts

TOY_SETS = {"toy": validation_prompts, "toy_selection": selection_prompts}
"""The toy world's named prompt sets: the report's and the selection's (disjoint)."""
PICKAPIC_CAPTION = "caption"
PARTIPROMPTS_COLUMN = "Prompt"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
LIMIT_KEY = "eval.max_prompt_file_bytes"


class PromptSetError(UserError, ValueError):
    """A prompt set cannot be read; the message names the file and what was expected."""


def prompt_set_paths(prompts: str | list[str]) -> list[str]:
    """``eval.prompts`` (one path or a list) as a non-empty list."""
    paths = [prompts] if isinstance(prompts, str) else list(prompts)
    paths = [p for p in paths if p.strip()]
    if not paths:
        raise ConfigError("eval.prompts: no prompt set given; expected a path (a .txt, .tsv, .json or .parquet file, "
                          "an HPSv2 benchmark directory) or 'toy', or a list of them")
    return paths


def selection_prompt_set(selection_prompts: str | list[str]) -> str:
    """The prompt set that ranks models (sweep trials, checkpoints): the first of
    ``eval.selection_prompts``; a one-line error when none is given."""
    paths = [selection_prompts] if isinstance(selection_prompts, str) else list(selection_prompts)
    paths = [p for p in paths if p.strip()]
    if not paths:
        raise ConfigError("eval.selection_prompts: no prompt set to select models on; set it to validation prompts "
                          "apart from eval.prompts (toy_selection for the toy world, Pick-a-Pic validation_unique "
                          "for the paper)")
    return paths[0]


def prompt_set_names(paths: Sequence[str]) -> list[str]:
    """A short, unique, file-system-safe name per prompt set (its file stem or directory name)."""
    names: list[str] = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem if path not in TOY_SETS else path
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "prompts"
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}_{n}", n + 1
        names.append(unique)
    return names


def load_prompts(path: str | Path, max_prompts: int | None = None,
                 max_file_bytes: int = DEFAULT_MAX_PROMPT_FILE_BYTES) -> list[str]:
    """The prompts of the set at ``path`` (see the module docstring), at most ``max_prompts``;
    a file over ``max_file_bytes`` is refused unread."""
    if max_prompts is not None and max_prompts < 1:
        raise PromptSetError(f"max_prompts: must be >= 1 or None, got {max_prompts}")
    toy = TOY_SETS.get(str(path))
    prompts = toy() if toy is not None else _load_path(Path(path), max_file_bytes)
    if not prompts:
        raise PromptSetError(f"{path}: the prompt set is empty")
    return prompts[:max_prompts] if max_prompts is not None else prompts


def _load_path(path: Path, max_bytes: int) -> list[str]:
    if path.is_dir():
        if any((path / f"{style}.json").exists() for style in HPS_STYLES):
            return _hps_directory(path, max_bytes)
        files = sorted(path.rglob("*.parquet"))
        if files:
            return _dedupe([p for file in files for p in _parquet_captions(file, max_bytes)])
        raise PromptSetError(
            f"{path}: directory holds neither the HPSv2 style files ({', '.join(HPS_STYLES)}.json) "
            "nor .parquet files"
        )
    if not path.exists():
        raise PromptSetError(f"{path}: no such file or directory (eval.prompts)")
    readers = {".parquet": lambda p, cap: _dedupe(_parquet_captions(p, cap)), ".tsv": _parti_prompts,
               ".json": _json_list, ".txt": _text_lines}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise PromptSetError(
            f"{path}: unknown prompt set; expected 'toy', 'toy_selection', a .parquet, .tsv, .json or .txt file, "
            "or an HPSv2 benchmark directory"
        )
    return reader(path, max_bytes)


def _dedupe(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _parquet_captions(path: Path, max_bytes: int) -> list[str]:
    """The caption column; schema (finding 1) and size (finding 5) are checked before reading."""
    try:
        with open_regular_file(path) as handle, pq.ParquetFile(handle) as parquet:
            names = parquet.schema_arrow.names
            if PICKAPIC_CAPTION not in names:
                raise PromptSetError(f"{path}: no {PICKAPIC_CAPTION!r} column; columns are {', '.join(names)}")
            check_schema(parquet.schema_arrow, str(path), [PICKAPIC_CAPTION],
                         "plain arrow types (strings for prompts)")
            table = read_parquet_capped(parquet, [PICKAPIC_CAPTION], max_bytes, where=str(path), limit_key=LIMIT_KEY)
        column = table.column(PICKAPIC_CAPTION)
    except (UnsafeParquetError, InputLimitError) as err:  # refused before any value is converted
        raise PromptSetError(str(err)) from None
    except (OSError, pa.ArrowException) as err:
        raise PromptSetError(f"{path}: cannot read parquet ({err})") from err
    return _clean([value for value in column.to_pylist() if isinstance(value, str)])


def _read_text(path: Path, max_bytes: int) -> str:
    """The UTF-8 text of the regular file ``path``, refused unread above ``max_bytes``; text that
    is not UTF-8 is refused naming the line (1-based) of its first bad byte."""
    try:
        return decode_utf8(read_local_file(path, max_bytes, LIMIT_KEY), str(path))
    except InputLimitError as err:
        raise PromptSetError(str(err)) from None


def _parti_prompts(path: Path, max_bytes: int) -> list[str]:
    reader = csv.DictReader(io.StringIO(_read_text(path, max_bytes), newline=""), delimiter="\t")
    if reader.fieldnames is None or PARTIPROMPTS_COLUMN not in reader.fieldnames:
        raise PromptSetError(
            f"{path}: no {PARTIPROMPTS_COLUMN!r} column in the TSV header {reader.fieldnames}"
        )
    return _clean([row[PARTIPROMPTS_COLUMN] or "" for row in reader])


def _hps_directory(path: Path, max_bytes: int) -> list[str]:
    missing = [f"{style}.json" for style in HPS_STYLES if not (path / f"{style}.json").exists()]
    if missing:
        raise PromptSetError(f"{path}: HPSv2 benchmark directory lacks {', '.join(missing)}")
    return [prompt for style in HPS_STYLES for prompt in _json_list(path / f"{style}.json", max_bytes)]


def _json_list(path: Path, max_bytes: int) -> list[str]:
    try:
        values = json.loads(_read_text(path, max_bytes))
    except json.JSONDecodeError as err:
        raise PromptSetError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PromptSetError(f"{path}: expected a JSON list of prompt strings")
    return _clean(values)


def _text_lines(path: Path, max_bytes: int) -> list[str]:
    return _clean(_read_text(path, max_bytes).splitlines())


def _clean(prompts: list[str]) -> list[str]:
    """Stripped prompts without blanks."""
    return [p.strip() for p in prompts if p.strip()]
