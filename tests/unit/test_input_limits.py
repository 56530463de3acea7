"""Issue 23, findings 4 and 5: hostile inputs are bad rows or one-line errors, never a read
outside the folder, a hang on a fifo or a decompression bomb in memory (docs/SECURITY.md).

Every hostile file is built small here: a PNG whose few KB decode to 81 Mpx, a parquet file
whose few KB decompress to megabytes, ``file_name`` values with ``..`` and symlinks.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spin_ray import input_limits
from spin_ray.config import ConfigError, DataConfig, from_dict
from spin_ray.data import DataError, ReadStats, image_problem, iter_sft_rows
from spin_ray.eval.prompt_sets import PromptSetError, load_prompts
from spin_ray.input_limits import (
    MAX_IMAGE_PIXELS,
    InputLimitError,
    decode_image,
    folder_member,
    image_bomb_guard,
    read_local_file,
    read_parquet_capped,
)


def png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 9000, height: int = 9000) -> bytes:
    """A valid, all-black 1-bit PNG: about 10 KB that decode to width x height pixels.

    9000 x 9000 = 81 Mpx is under PIL's default limit (89.5 Mpx), so PIL alone decodes it.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def read_all(cfg: DataConfig) -> tuple[list[dict], ReadStats]:
    stats = ReadStats()
    return list(iter_sft_rows(cfg, stats)), stats


def folder(root: Path, records: list[dict], images: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True)
    for name, data in (images or {}).items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


SKIP = {"on_bad_row": "skip", "max_bad_fraction": 1.0}


# ----------------------------------------------------------------------------- finding 4: folders


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/../outside.png", "link.png"])
def test_folder_file_name_outside_the_folder_is_a_bad_row_and_never_read(tmp_path, name):
    (tmp_path / "outside.png").write_bytes(png())  # a valid image one level up
    root = folder(tmp_path / "f", [{"file_name": "a.png", "caption": "in"}, {"file_name": name, "caption": "out"}],
                  {"a.png": png()})
    (root / "sub").mkdir()
    (root / "link.png").symlink_to(tmp_path / "outside.png")  # a symlink is followed, then refused
    with pytest.raises(DataError, match=r"record 1 \(row_id 1\), field 'file_name': cannot read .*outside"):
        read_all(DataConfig(path=str(root), format="folder"))
    out, stats = read_all(DataConfig(path=str(root), format="folder", **SKIP))
    assert [row["prompt"] for row in out] == ["in"]
    assert stats.bad_rows == {"unreadable_file": 1}


def test_folder_file_name_to_dev_zero_is_refused_without_reading(tmp_path):
    root = folder(tmp_path / "f", [{"file_name": "a.png", "caption": "in"},
                                   {"file_name": "../" * 20 + "dev/zero", "caption": "zero"}], {"a.png": png()})
    out, stats = read_all(DataConfig(path=str(root), format="folder", **SKIP))
    assert len(out) == 1 and stats.bad_rows == {"unreadable_file": 1}


def test_a_fifo_in_the_folder_is_refused_without_waiting_for_a_writer(tmp_path):
    root = folder(tmp_path / "f", [{"file_name": "a.png", "caption": "in"}, {"file_name": "pipe.png", "caption": "p"}],
                  {"a.png": png()})
    os.mkfifo(root / "pipe.png")
    result: list = []
    reader = threading.Thread(target=lambda: result.append(read_all(DataConfig(path=str(root), format="folder",
                                                                               **SKIP))), daemon=True)
    reader.start()
    reader.join(timeout=20)
    try:
        assert result, "reading the folder blocked on the fifo"
        out, stats = result[0]
        assert len(out) == 1 and stats.bad_rows == {"unreadable_file": 1}
    finally:
        if reader.is_alive():  # release the blocked open() so the thread can end
            os.close(os.open(root / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))


def test_a_folder_image_over_max_image_bytes_is_not_read(tmp_path):
    root = folder(tmp_path / "f", [{"file_name": "a.png", "caption": "small"}, {"file_name": "b.png", "caption": "big"}],
                  {"a.png": png(), "b.png": png(64)})
    cfg = DataConfig(path=str(root), format="folder", max_image_bytes=len(png()) + 1)
    with pytest.raises(DataError, match=r"record 1 .* bytes, more than data\.max_image_bytes="):
        read_all(cfg)
    out, stats = read_all(DataConfig(path=str(root), format="folder", max_image_bytes=len(png()) + 1, **SKIP))
    assert [row["prompt"] for row in out] == ["small"] and stats.bad_rows == {"unreadable_file": 1}


def test_read_local_file_refuses_devices_and_oversized_files(tmp_path):
    with pytest.raises(InputLimitError, match="/dev/zero: not a regular file"):
        read_local_file("/dev/zero", 1 << 20, "some.key")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    assert read_local_file(path, 100, "some.key") == b"x" * 100
    with pytest.raises(InputLimitError, match=r"f\.bin: 100 bytes, more than some\.key=99"):
        read_local_file(path, 99, "some.key")


def test_object_store_folders_are_contained_lexically():
    assert folder_member("s3://bucket/data", "sub/../a.png") == "s3://bucket/data/a.png"
    assert folder_member("s3://bucket/data", "/a.png") == "s3://bucket/data/a.png"
    for name in ("../a.png", "x/../../data2/a.png", "../../../etc/passwd"):
        with pytest.raises(InputLimitError, match=r"file_name .* outside s3://bucket/data; refusing it"):
            folder_member("s3://bucket/data", name)


# ----------------------------------------------------------------------------- finding 5: image bombs


def test_an_image_bomb_is_refused_from_its_header():
    bomb = png_bomb()
    assert len(bomb) < 64 * 1024
    assert 9000 * 9000 > MAX_IMAGE_PIXELS
    problem = image_problem(bomb)
    assert problem is not None and "67108864" in problem and "\n" not in problem
    with pytest.raises((InputLimitError, Image.DecompressionBombWarning)):
        decode_image(bomb)


def test_the_size_is_checked_before_any_pixel_is_decoded(monkeypatch):
    # Header only: a full decode would fail as truncated; the size check must come first.
    header_only = png_bomb(4000, 4000)[:33 + 8 + 64]  # signature, IHDR, the start of IDAT
    monkeypatch.setattr(input_limits, "MAX_IMAGE_PIXELS", 10_000_000)  # PIL errors itself only at 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the guard sets it: restore after
    with pytest.raises((InputLimitError, Image.DecompressionBombWarning), match="4000|16000000"):
        decode_image(header_only)


def test_decompression_bomb_warnings_are_errors_inside_the_guard(monkeypatch):
    monkeypatch.setattr(input_limits, "MAX_IMAGE_PIXELS", 200)  # 16x16 is over it, under twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the guard sets it: restore after
    with image_bomb_guard(), pytest.raises(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(png()))
    assert Image.MAX_IMAGE_PIXELS == 200


def test_an_image_bomb_in_training_data_is_a_bad_row(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"caption": ["fine", "bomb"], "image": [png(), png_bomb()]}), path)
    with pytest.raises(DataError, match=r"row 1 \(row_id 1\), field 'image': image bytes do not decode"):
        read_all(DataConfig(path=str(path), format="parquet"))
    out, stats = read_all(DataConfig(path=str(path), format="parquet", **SKIP))
    assert [row["prompt"] for row in out] == ["fine"] and stats.bad_rows == {"bad_image": 1}


def test_an_image_cell_over_max_image_bytes_is_a_bad_row(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"caption": ["small", "big"], "image": [png(), png(64)]}), path)
    cfg = DataConfig(path=str(path), format="parquet", max_image_bytes=len(png()) + 1, **SKIP)
    out, stats = read_all(cfg)
    assert [row["prompt"] for row in out] == ["small"] and stats.bad_rows == {"bad_image": 1}


# ----------------------------------------------------------------------------- finding 5: parquet bombs


def parquet_bomb(path: Path, column: str = "caption", megabytes: int = 8, **extra: list) -> Path:
    """One row whose ``column`` is ``megabytes`` MB of one letter: a few KB on disk."""
    pq.write_table(pa.table({column: ["x" * (megabytes << 20)], **extra}), path, compression="zstd")
    assert path.stat().st_size < 64 * 1024
    return path


def test_a_parquet_row_group_over_the_cap_is_unreadable_rows(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"caption": ["fine"], "image": [png()]}), tmp_path / "data" / "a.parquet")
    parquet_bomb(tmp_path / "data" / "b.parquet", image=[png()])
    cfg = DataConfig(path=str(tmp_path / "data"), format="parquet", max_row_group_bytes=1 << 20)
    with pytest.raises(DataError, match=r"b\.parquet: row group 0 .*more than data\.max_row_group_bytes=1048576"):
        read_all(cfg)
    out, stats = read_all(DataConfig(path=cfg.path, format="parquet", max_row_group_bytes=1 << 20, **SKIP))
    assert [row["prompt"] for row in out] == ["fine"] and stats.bad_rows == {"unreadable_file": 1}


def test_the_decoded_size_is_capped_even_when_the_footer_understates_it(tmp_path, monkeypatch):
    path = parquet_bomb(tmp_path / "bomb.parquet")
    monkeypatch.setattr(input_limits, "declared_bytes", lambda *args: 0)  # a footer that lies
    with pq.ParquetFile(path) as parquet, pytest.raises(InputLimitError, match="once decoded"):
        read_parquet_capped(parquet, ["caption"], 1 << 20, where=str(path), limit_key="k")


# ----------------------------------------------------------------------------- finding 5: prompt files


@pytest.mark.parametrize("suffix", [".txt", ".json", ".tsv"])
def test_a_prompt_file_over_the_cap_is_refused_unread(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text({".txt": "a cat\n" * 100, ".json": json.dumps(["a cat"] * 100),
                     ".tsv": "Prompt\n" + "a cat\n" * 100}[suffix])
    assert load_prompts(path, max_file_bytes=1 << 20)[0] == "a cat"
    with pytest.raises(PromptSetError, match=r"prompts\.\w+: \d+ bytes, more than eval\.max_prompt_file_bytes=100"):
        load_prompts(path, max_file_bytes=100)


def test_a_prompt_file_that_is_a_device_is_refused(tmp_path):
    link = tmp_path / "prompts.txt"
    link.symlink_to("/dev/null")
    with pytest.raises(PromptSetError, match="not a regular file"):
        load_prompts(link)


def test_a_prompt_parquet_bomb_is_refused(tmp_path):
    path = parquet_bomb(tmp_path / "prompts.parquet")
    with pytest.raises(PromptSetError, match=r"prompts\.parquet: \d+ bytes .*more than eval\.max_prompt_file_bytes"):
        load_prompts(path, max_file_bytes=1 << 20)


# ----------------------------------------------------------------------------- config keys


def test_the_caps_are_config_keys_with_safe_defaults():
    cfg = from_dict({"data": {"max_image_bytes": 1024, "max_row_group_bytes": 2048},
                     "eval": {"max_prompt_file_bytes": 4096}})
    assert (cfg.data.max_image_bytes, cfg.data.max_row_group_bytes, cfg.eval.max_prompt_file_bytes) == (1024, 2048,
                                                                                                          4096)
    defaults = from_dict({})
    assert defaults.data.max_image_bytes == input_limits.DEFAULT_MAX_IMAGE_BYTES == 64 << 20
    assert defaults.data.max_row_group_bytes == 1 << 30
    assert defaults.eval.max_prompt_file_bytes == 64 << 20
    for key in ("data.max_image_bytes", "data.max_row_group_bytes", "eval.max_prompt_file_bytes"):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"{key}: must be >= 1"):
            from_dict({section: {name: 0}})
