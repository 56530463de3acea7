"""Checksums of finished files (issue 19, item 3): recorded in DONE, verified before reuse.

Fault injection: files of a published model or of the prepared table are damaged after they
were marked DONE (a flipped byte, a cut-off copy, a missing file) on local disk, fsspec's
memory:// and an S3 server (moto), and the next use must refuse them naming the file and the
stage. Expected digests are computed here with hashlib, independently of spin_ray.integrity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_rundir import BUCKET, make_model_dir, run_dir, s3_options  # noqa: F401  (fixtures storage uses)

from spin_ray import integrity
from spin_ray.cli import guarded
from spin_ray.integrity import IntegrityError
from spin_ray.rundir import RunDir

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def storage(run_dir: RunDir) -> RunDir:  # noqa: F811  (the fixture, imported from test_rundir)
    """A fresh, empty run directory on each backend (test_rundir's ``run_dir``)."""
    return run_dir


@pytest.fixture(autouse=True)
def fresh_process_cache():
    """Each test starts as a new process would: nothing verified yet."""
    integrity.forget_verified()
    yield
    integrity.forget_verified()


def flip_byte(rundir: RunDir, rel: str, position: int) -> None:
    """Invert one byte of the finished file ``rel`` in place (bit rot, a hand edit)."""
    data = bytearray(rundir.fs.cat_file(rundir.fs_path(rel)))
    data[position] ^= 0xFF
    rundir.fs.pipe_file(rundir.fs_path(rel), bytes(data))


def test_publish_records_sha256_and_size_of_every_file(storage: RunDir, tmp_path: Path):
    source = make_model_dir(tmp_path / "built")
    storage.publish_dir(source, "iter_1/model")
    files = storage.read_done("iter_1/model")["files"]
    expected = {p.relative_to(source).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                   "size": p.stat().st_size}
                for p in source.rglob("*") if p.is_file()}
    assert files == expected


def test_a_models_card_is_not_checksummed_so_a_published_copy_may_rewrite_it(tmp_path: Path):
    # A sweep publishes its winner's model (card included) as iter_k and writes iter_k's own card;
    # the evaluation rewrites every card with its scores. Neither may make the model look damaged.
    storage = RunDir(tmp_path / "run")
    source = make_model_dir(tmp_path / "built")
    (source / "README.md").write_text("---\nbase_model: x\n---\nthe trial's card\n")
    storage.publish_dir(source, "iter_1/model")
    assert "README.md" not in storage.read_done("iter_1/model")["files"]
    (tmp_path / "run" / "iter_1" / "model" / "README.md").write_text("iter_1's card, with its scores\n")
    integrity.forget_verified()
    storage.verify("iter_1/model")


def test_a_flipped_byte_in_a_published_model_is_refused_before_use(storage: RunDir, tmp_path: Path):
    storage.publish_dir(make_model_dir(tmp_path / "built"), "iter_2/model")
    flip_byte(storage, f"iter_2/model/{WEIGHTS}", 512)  # the middle of the 1 KiB weights
    integrity.forget_verified()  # a later process (a rerun) uses theta_2
    with pytest.raises(IntegrityError) as caught:
        storage.local_copy("iter_2/model", cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert storage.path(f"iter_2/model/{WEIGHTS}") in message
    assert "sha256" in message and "--restart-from iter_2" in message


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_cut_off_or_missing_file_is_refused_by_its_size(storage: RunDir, tmp_path: Path, damage: str):
    storage.publish_dir(make_model_dir(tmp_path / "built"), "baseline_sft/model")
    rel = f"baseline_sft/model/{WEIGHTS}"
    if damage == "truncated":  # a partial copy
        storage.fs.pipe_file(storage.fs_path(rel), storage.fs.cat_file(storage.fs_path(rel))[:100])
    else:
        storage.fs.rm(storage.fs_path(rel))
    integrity.forget_verified()
    expected = "has 100 bytes, 1024 were recorded" if damage == "truncated" else "is missing"
    with pytest.raises(IntegrityError, match=expected) as caught:
        storage.verify("baseline_sft/model")
    assert "--restart-from baseline_sft" in str(caught.value)


def test_every_single_byte_flip_is_detected(tmp_path: Path):
    rundir = RunDir(tmp_path / "run")
    source = make_model_dir(tmp_path / "built")
    rundir.publish_dir(source, "iter_1/model")
    rel = "iter_1/model/model_index.json"
    for position in range(len((source / "model_index.json").read_bytes())):
        flip_byte(rundir, rel, position)
        integrity.forget_verified()
        with pytest.raises(IntegrityError, match="model_index.json"):
            rundir.verify("iter_1/model")
        flip_byte(rundir, rel, position)  # undone: intact again
        integrity.forget_verified()
        rundir.verify("iter_1/model")


def test_the_prepared_table_is_checksummed_when_marked_done(storage: RunDir):
    shard = bytes(range(256)) * 8
    storage.write_bytes_atomic("prepared/data/part-0.parquet", shard)
    storage.mark_done("prepared", {"n_rows": 3})
    done = storage.read_done("prepared")
    assert done["n_rows"] == 3
    assert done["files"] == {"data/part-0.parquet": {"sha256": hashlib.sha256(shard).hexdigest(), "size": 2048}}
    storage.verify("prepared")
    flip_byte(storage, "prepared/data/part-0.parquet", 1000)
    integrity.forget_verified()
    with pytest.raises(IntegrityError, match="part-0.parquet .*prepared.*--restart-from prepared"):
        storage.verify("prepared")


def test_a_stage_directory_is_not_checksummed(tmp_path: Path):
    rundir = RunDir(tmp_path / "run")
    rundir.write_text_atomic("iter_1/metrics.json", "{}")
    rundir.mark_done("iter_1", {"steps": 2})
    assert "files" not in rundir.read_done("iter_1")  # checkpoints and caches are not hashed


def test_verification_reads_the_files_once_per_process(storage: RunDir, tmp_path: Path, monkeypatch):
    storage.publish_dir(make_model_dir(tmp_path / "built"), "iter_1/model")
    integrity.forget_verified()
    reads: list[int] = []
    real = integrity.digest_stream
    monkeypatch.setattr(integrity, "digest_stream", lambda handle: reads.append(1) or real(handle))
    cache = tmp_path / "cache"
    first = storage.local_copy("iter_1/model", cache_dir=cache)
    assert len(reads) == 3  # the three files, once
    assert storage.local_copy("iter_1/model", cache_dir=cache) == first and len(reads) == 3


def test_a_damaged_download_cache_is_downloaded_again(tmp_path: Path):
    rundir = RunDir("memory://integrity-cache")
    try:
        rundir.publish_dir(make_model_dir(tmp_path / "built"), "iter_1/model")
        cache = tmp_path / "cache"
        copy = Path(rundir.local_copy("iter_1/model", cache_dir=cache))
        good = (copy / WEIGHTS).read_bytes()
        (copy / WEIGHTS).write_bytes(good[:10] + bytes([good[10] ^ 1]) + good[11:])
        integrity.forget_verified()
        again = Path(rundir.local_copy("iter_1/model", cache_dir=cache))
        assert (again / WEIGHTS).read_bytes() == good
    finally:
        rundir.fs.rm(rundir.root, recursive=True)


def test_a_done_without_checksums_is_trusted(tmp_path: Path):
    rundir = RunDir(tmp_path / "run")
    rundir.write_text_atomic("iter_1/model/model_index.json", "{}")
    rundir.write_json_atomic("iter_1/model/DONE", {"publish_id": "old"})  # an older run directory
    assert rundir.local_copy("iter_1/model") == str(rundir.local_path("iter_1/model"))


def test_an_integrity_error_exits_with_code_2(tmp_path: Path, capsys):
    rundir = RunDir(tmp_path / "run")
    rundir.publish_dir(make_model_dir(tmp_path / "built"), "iter_1/model")
    flip_byte(rundir, f"iter_1/model/{WEIGHTS}", 3)
    integrity.forget_verified()
    assert guarded(lambda: rundir.local_copy("iter_1/model") and 0) == 2
    assert capsys.readouterr().err.startswith("integrity error: ")


def test_a_model_reached_from_its_stage_folder_names_that_stage(tmp_path: Path):
    rundir = RunDir(tmp_path / "run")
    rundir.publish_dir(make_model_dir(tmp_path / "built"), "iter_3/model")
    flip_byte(rundir, f"iter_3/model/{WEIGHTS}", 0)
    integrity.forget_verified()
    with pytest.raises(IntegrityError, match="stage iter_3 .*--restart-from iter_3"):
        RunDir(tmp_path / "run" / "iter_3").local_copy("model")  # as the evaluation opens a run's model URL
    rundir.publish_dir(make_model_dir(tmp_path / "built2"), "sweep/iter_1/trial_a/model")
    flip_byte(rundir, f"sweep/iter_1/trial_a/model/{WEIGHTS}", 0)
    integrity.forget_verified()
    with pytest.raises(IntegrityError, match=f"stage trial_a .*remove {tmp_path / 'run'}/sweep/iter_1/trial_a"):
        rundir.verify("sweep/iter_1/trial_a/model")
