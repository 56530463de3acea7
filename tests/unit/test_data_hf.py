"""``data.format: hf`` (spin_ray.data.hf): tiny datasets built and saved by the test with the
``datasets`` library itself (``save_to_disk``, several shards), read through the package's own
readers (``iter_sft_rows``, the plain-Python path of the same ``read_unit`` the Ray reader maps)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from spin_ray.config import DataConfig
from spin_ray.data import DataError, ReadStats, iter_sft_rows

datasets = pytest.importorskip("datasets")


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_text(path, images: list[bytes], texts: list[str], num_shards: int = 2) -> None:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": data, "path": None} for data in images], "text": texts}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path), num_shards=num_shards)


def hf_config(path, **changes) -> DataConfig:
    # DataConfig's format Literal gains "hf" in spin_ray/config.py; the readers take the value as it is
    return DataConfig(path=str(path), format="hf", prompt_column="text", image_column="image", **changes)


def test_image_text_rows_keep_their_bytes_and_index_over_the_shards(tmp_path):
    images = [png((10 * i, 0, 0)) for i in range(5)]
    images[2] = b"not an image"
    texts = [f"prompt {i}" for i in range(5)]
    save_image_text(tmp_path / "ds", images, texts)
    stats = ReadStats()
    rows = list(iter_sft_rows(hf_config(tmp_path / "ds", on_bad_row="skip", max_bad_fraction=0.5), stats))
    assert [row["row_id"] for row in rows] == [0, 1, 3, 4]  # row 2's image is bad; ids run over both shards
    assert [row["prompt"] for row in rows] == [texts[i] for i in (0, 1, 3, 4)]
    assert [row["image"] for row in rows] == [images[i] for i in (0, 1, 3, 4)]
    assert stats.bad_rows == {"bad_image": 1} and stats.rows_read == 5


def test_a_bad_row_under_fail_names_the_arrow_file_and_the_row(tmp_path):
    save_image_text(tmp_path / "ds", [png((0, 0, 0)), b"junk"], ["a", "b"], num_shards=1)
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow.*row 1"):
        list(iter_sft_rows(hf_config(tmp_path / "ds")))


def test_a_pickapic_dataset_dict_reads_its_train_split_winners(tmp_path):
    red, blue, green = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))
    split = datasets.Dataset.from_dict({
        "caption": ["left wins", "right wins", "a tie"], "jpg_0": [red, red, green], "jpg_1": [blue, blue, green],
        "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5],
    })
    datasets.DatasetDict({"train": split, "test": split.select([0])}).save_to_disk(str(tmp_path / "pap"))
    cfg = DataConfig(path=str(tmp_path / "pap"), format="hf")  # Pick-a-Pic's columns are recognised
    stats = ReadStats()
    rows = list(iter_sft_rows(cfg, stats, with_loser=True))
    assert [(row["row_id"], row["prompt"]) for row in rows] == [(0, "left wins"), (1, "right wins")]
    assert [(row["image"], row["image_lose"]) for row in rows] == [(red, blue), (blue, red)]
    assert stats.ties_dropped == 1


def test_a_folder_that_is_not_a_saved_dataset_is_one_line_error(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: no state\.json; expected a folder written by datasets' save_to_disk"):
        list(iter_sft_rows(hf_config(tmp_path / "plain")))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"without a 'train' split \(it has validation\)"):
        list(iter_sft_rows(hf_config(tmp_path / "dd")))


def test_the_units_cross_to_ray_tasks_with_their_layout(tmp_path):
    """read_sft_dataset ships each unit to a Ray task as JSON (read_units_batch): the layout must survive."""
    import pyarrow as pa

    from spin_ray.data import plan_read, read_units_batch, select_kept

    save_image_text(tmp_path / "ds", [png((0, 0, 0)), png((9, 9, 9)), png((5, 5, 5))], ["a", "b", "c"])
    cfg = hf_config(tmp_path / "ds")
    units, _ = plan_read(cfg)
    assert [(unit.layout, unit.first_row_id, unit.num_rows) for unit in units] == [("parquet", 0, 2), ("parquet", 2, 1)]
    tagged = read_units_batch(pa.table({"unit": [unit.to_json() for unit in units]}), cfg)
    assert select_kept(tagged).column("prompt").to_pylist() == ["a", "b", "c"]
