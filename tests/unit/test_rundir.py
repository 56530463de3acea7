"""Tests of spin_ray.rundir on local disk, fsspec's memory:// and an S3 server (moto).

The behaviour tests run against every backend through the ``run_dir`` fixture; the S3
variant starts moto's ThreadedMotoServer on 127.0.0.1 and is skipped when moto or s3fs is
missing (``pip install 'moto[server]' s3fs``, the project's dev extra).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray import rundir as rundir_module
from spin_ray.input_limits import InputLimitError
from spin_ray.rundir import DONE, RunDir

BUCKET = "spin-ray-test"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict]:
    """storage_options of a moto S3 server on loopback, with one bucket."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
    }
    try:
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
    except FileExistsError:  # moto keeps its buckets per process: another module's server made it
        pass
    yield options
    server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunDir]:
    """A fresh, empty run directory on each backend."""
    name = f"run-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        yield RunDir(tmp_path / name)
    elif request.param == "memory":
        run = RunDir(f"memory://{name}")
        yield run
        if run.fs.exists(run.root):
            run.fs.rm(run.root, recursive=True)
    else:
        options = request.getfixturevalue("s3_options")
        yield RunDir(f"s3://{BUCKET}/{name}", storage_options=options)


def make_model_dir(root: Path) -> Path:
    """A small diffusers-like directory with a nested file and a binary file."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "Toy"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 4)
    return root


# ----------------------------------------------------------------------------- paths


def test_paths_and_iteration_names(run_dir: RunDir):
    assert RunDir.iteration(3) == "iter_3"
    assert run_dir.path("iter_3", "model") == run_dir.path("iter_3/model")
    assert run_dir.path("iter_3", "model").endswith("/iter_3/model")
    if not run_dir.is_local:
        assert run_dir.path().split("://")[0] in ("memory", "s3")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="iteration number must be an int >= 1"):
            RunDir.iteration(bad)
    with pytest.raises(ValueError, match="without '..'"):
        run_dir.path("iter_1", "..", "..", "elsewhere")


def test_pickles_as_url_and_options(run_dir: RunDir):
    run_dir.write_text_atomic("config.yaml", "seed: 1\n")
    clone = pickle.loads(pickle.dumps(run_dir))
    assert clone.path() == run_dir.path()
    assert clone.read_text("config.yaml") == "seed: 1\n"


def test_relative_local_run_dir_pickles_as_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/default")
    monkeypatch.chdir("/")
    assert pickle.loads(pickle.dumps(run)).path() == str(tmp_path / "runs" / "default")


def test_file_url_and_plain_path_are_the_same_local_dir(tmp_path: Path):
    by_url = RunDir(f"file://{tmp_path}/run")
    by_path = RunDir(tmp_path / "run")
    assert by_url.is_local and by_url.path() == by_path.path() == str(tmp_path / "run")
    assert by_url.local_path("iter_1") == tmp_path / "run" / "iter_1"


def test_local_path_refuses_remote_run_dirs():
    with pytest.raises(ValueError, match="not on local disk"):
        RunDir("memory://somewhere").local_path("iter_1")


# ----------------------------------------------------------------------------- atomic writes


def test_text_and_json_round_trip_and_overwrite(run_dir: RunDir):
    assert not run_dir.exists("config.yaml")
    run_dir.write_text_atomic("config.yaml", "a: 1\n")
    run_dir.write_text_atomic("config.yaml", "a: 2\n")
    assert run_dir.read_text("config.yaml") == "a: 2\n"
    run_dir.write_json_atomic("iter_1/metrics.json", {"loss": 0.5, "steps": [1, 2]})
    assert run_dir.read_json("iter_1/metrics.json") == {"loss": 0.5, "steps": [1, 2]}
    assert run_dir.exists("iter_1") and run_dir.exists("iter_1/metrics.json")


def test_reading_missing_or_bad_files_names_the_path(run_dir: RunDir):
    with pytest.raises(FileNotFoundError, match=r"iter_9/metrics\.json: no such file"):
        run_dir.read_json("iter_9/metrics.json")
    run_dir.write_text_atomic("broken.json", "{not json")
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON"):
        run_dir.read_json("broken.json")


def test_writer_failing_midway_leaves_previous_version_intact(run_dir: RunDir):
    run_dir.write_json_atomic("iter_1/metrics.json", {"version": 1})
    with pytest.raises(RuntimeError, match="writer died"):
        with run_dir.open_atomic("iter_1/metrics.json") as f:
            f.write(b'{"version": 2, "trunc')
            raise RuntimeError("writer died")
    assert run_dir.read_json("iter_1/metrics.json") == {"version": 1}
    if run_dir.is_local:  # the temp file was cleaned up
        assert sorted(p.name for p in run_dir.local_path("iter_1").iterdir()) == ["metrics.json"]


def test_killed_writer_leaves_previous_version_intact(tmp_path: Path):
    # A child process writes a 64 MiB file through open_atomic and SIGKILLs itself halfway:
    # no cleanup code runs, as when a node dies.
    run = RunDir(tmp_path / "run")
    run.write_bytes_atomic("big.bin", b"old version")
    script = textwrap.dedent(
        f"""
        import os, signal
        from spin_ray.rundir import RunDir
        with RunDir({str(run.path())!r}).open_atomic("big.bin") as f:
            for i in range(64):
                f.write(b"x" * (1 << 20))
                if i == 32:
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=False)
    assert result.returncode == -signal.SIGKILL
    assert run.local_path("big.bin").read_bytes() == b"old version"
    # What is left is a hidden temp file holding the partial data, never the target name.
    leftovers = [p for p in run.local_path().iterdir() if p.name != "big.bin"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".big.bin.")
    assert leftovers[0].stat().st_size >= 32 << 20


# ----------------------------------------------------------------------------- DONE markers


def test_done_marker_semantics(run_dir: RunDir):
    run_dir.write_text_atomic("iter_1/config.yaml", "beta: 2000\n")
    run_dir.write_bytes_atomic("iter_1/opponents/part-0.parquet", b"rows")
    assert run_dir.exists("iter_1") and not run_dir.is_done("iter_1")  # files alone are not completion
    run_dir.mark_done("iter_1", {"iteration": 1, "loss": 0.6})
    assert run_dir.is_done("iter_1")
    assert run_dir.read_done("iter_1") == {"iteration": 1, "loss": 0.6}
    assert json.loads(run_dir.read_text(f"iter_1/{DONE}")) == {"iteration": 1, "loss": 0.6}


def test_remove_incomplete_removes_only_unfinished_dirs(run_dir: RunDir):
    run_dir.write_bytes_atomic("iter_1/model/weights.bin", b"w")
    run_dir.mark_done("iter_1", {})
    run_dir.write_bytes_atomic("iter_2/opponents/part-0.parquet", b"half")
    assert run_dir.remove_incomplete("iter_1") is False
    assert run_dir.exists("iter_1/model/weights.bin")
    assert run_dir.remove_incomplete("iter_2") is True
    assert not run_dir.exists("iter_2")
    assert run_dir.remove_incomplete("iter_3") is False  # nothing there
    with pytest.raises(ValueError, match="refusing to remove the run dir itself"):
        run_dir.remove_incomplete("")


def test_last_done_iteration_counts_the_contiguous_prefix(run_dir: RunDir, caplog: pytest.LogCaptureFixture):
    assert run_dir.last_done_iteration() == 0  # the run dir does not even exist yet
    run_dir.write_text_atomic("config.yaml", "x: 1\n")
    assert run_dir.last_done_iteration() == 0
    run_dir.mark_done("iter_1", {})
    run_dir.write_bytes_atomic("iter_2/model/weights.bin", b"unfinished")  # no DONE
    run_dir.mark_done("iter_3", {})  # after a gap
    run_dir.mark_done("iter_10", {})  # numeric, not lexicographic, order
    run_dir.mark_done(run_dir.baseline("sft"), {})
    with caplog.at_level(logging.WARNING, logger="spin_ray.rundir"):
        assert run_dir.last_done_iteration() == 1
    assert "iterations [3, 10] are DONE but iteration 2 is not" in caplog.text
    assert run_dir.done_iterations() == [1, 3, 10]
    run_dir.mark_done("iter_2", {})
    assert run_dir.last_done_iteration() == 3


# ----------------------------------------------------------------------------- publish_dir


def test_publish_dir_copies_files_then_marks_done(run_dir: RunDir, tmp_path: Path):
    source = make_model_dir(tmp_path / "built")
    published = run_dir.publish_dir(source, "iter_1/model", {"step": 50})
    assert published == run_dir.path("iter_1/model")
    assert run_dir.is_done("iter_1/model")
    done = run_dir.read_done("iter_1/model")
    assert done["step"] == 50 and len(done["publish_id"]) == 32
    assert run_dir.read_text("iter_1/model/unet/config.json") == '{"sample_size": 8}'
    assert source.is_dir()  # copied, not moved
    if run_dir.is_local:  # no staging sibling left behind
        assert sorted(p.name for p in run_dir.local_path("iter_1").iterdir()) == ["model"]
    # Round trip back to local disk, as a generation actor does before from_pretrained.
    fetched = run_dir.download_dir("iter_1/model", tmp_path / "fetched")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (fetched / weights).read_bytes() == (source / weights).read_bytes()
    assert (fetched / "model_index.json").read_text() == '{"_class_name": "Toy"}'


def test_publish_dir_refuses_to_overwrite_and_replaces_half_written(run_dir: RunDir, tmp_path: Path):
    source = make_model_dir(tmp_path / "built")
    run_dir.write_bytes_atomic("iter_1/model/stale-from-crash.bin", b"partial")  # no DONE
    run_dir.publish_dir(source, "iter_1/model")
    assert not run_dir.exists("iter_1/model/stale-from-crash.bin")
    done = run_dir.read_done("iter_1/model")
    assert set(done) == {"publish_id", "files"}  # the manifest lists the new files, not the stale one
    assert sorted(done["files"]) == ["model_index.json", "unet/config.json",
                                     "unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileExistsError, match="already published"):
        run_dir.publish_dir(source, "iter_1/model")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        run_dir.publish_dir(tmp_path / "missing", "iter_2/model")


def test_local_copy_reuses_a_download_until_republished(
    run_dir: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = make_model_dir(tmp_path / "built")
    run_dir.publish_dir(source, "iter_1/model")
    cache = tmp_path / "cache"
    first = Path(run_dir.local_copy("iter_1/model", cache_dir=cache))
    assert (first / "unet" / "config.json").read_text() == '{"sample_size": 8}'
    if run_dir.is_local:
        assert first == run_dir.local_path("iter_1/model") and not cache.exists()
        return
    assert first.parent == cache
    downloads: list[str] = []
    real_download = run_dir.download_dir
    monkeypatch.setattr(run_dir, "download_dir", lambda rel, d: downloads.append(rel) or real_download(rel, d))
    assert Path(run_dir.local_copy("iter_1/model", cache_dir=cache)) == first and downloads == []
    # Deleted and published again under the same name: the stale copy is replaced.
    run_dir.fs.rm(run_dir.fs_path("iter_1/model"), recursive=True)
    (source / "unet" / "config.json").write_text('{"sample_size": 16}')
    run_dir.publish_dir(source, "iter_1/model")
    again = Path(run_dir.local_copy("iter_1/model", cache_dir=cache))
    assert downloads == ["iter_1/model"]
    assert (again / "unet" / "config.json").read_text() == '{"sample_size": 16}'
    assert [p.name for p in cache.iterdir()] == [again.name]  # no staging left


def test_upload_file(run_dir: RunDir, tmp_path: Path):
    local = tmp_path / "train.parquet"
    pq.write_table(pa.table({"caption": ["a"]}), local)
    run_dir.upload_file(local, "toy_data/train.parquet")
    assert run_dir.exists("toy_data/train.parquet")
    fs = run_dir.arrow_filesystem()
    assert pq.read_table(run_dir.fs_path("toy_data/train.parquet"), filesystem=fs).column("caption").to_pylist() == ["a"]
    with pytest.raises(FileNotFoundError, match="is not a file"):
        run_dir.upload_file(tmp_path / "missing.parquet", "x.parquet")


def test_remote_publish_uploads_files_before_done(run_dir: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Object stores cannot rename a prefix: DONE must be written only after every upload.
    if run_dir.is_local:
        pytest.skip("local publishing renames a staged directory instead")
    source = make_model_dir(tmp_path / "built")
    uploads: list[tuple[list[str], bool]] = []
    real_put = run_dir.fs.put

    def spying_put(lpaths: list[str], rpaths: list[str], **kwargs: object) -> None:
        uploads.append((rpaths, run_dir.is_done("iter_1/model")))
        real_put(lpaths, rpaths, **kwargs)

    monkeypatch.setattr(run_dir.fs, "put", spying_put)
    run_dir.publish_dir(source, "iter_1/model")
    assert len(uploads) == 1
    uploaded, done_during_upload = uploads[0]
    assert len(uploaded) == 3 and not done_during_upload
    assert run_dir.is_done("iter_1/model")


def test_local_publish_that_dies_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = RunDir(tmp_path / "run")
    source = make_model_dir(tmp_path / "built")

    def die(_root: Path) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(rundir_module, "fsync_tree", die)
    with pytest.raises(OSError, match="disk vanished"):
        run.publish_dir(source, "iter_1/model")
    assert not run.exists("iter_1/model")
    assert list(run.local_path("iter_1").iterdir()) == []  # staging removed


def test_staging_left_by_a_killed_publish_is_not_done_and_is_cleaned(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    staging = run.local_path("iter_1") / ".model.publish-deadbeef"
    make_model_dir(staging)
    (staging / DONE).write_text("{}")  # even a complete-looking staging dir is not the target
    assert not run.is_done("iter_1/model")
    assert run.remove_incomplete("iter_1/model") is True
    assert not staging.exists()
    run.publish_dir(make_model_dir(tmp_path / "built"), "iter_1/model")
    assert run.is_done("iter_1/model")


@pytest.mark.parametrize("key", ["../../ESCAPED.txt", "sub/../../../ESCAPED.txt"])
def test_a_hostile_object_key_cannot_write_outside_the_download(tmp_path: Path, key: str):
    """Issue 23, finding 3: an object store takes any key; ``..`` in one must not escape."""
    run = RunDir(f"memory://run-{uuid.uuid4().hex[:8]}")
    try:
        run.publish_dir(make_model_dir(tmp_path / "built"), "iter_1/model")
        run.fs.pipe_file(f"{run.fs_path('iter_1/model')}/{key}", b"planted")
        destination = tmp_path / "a" / "b" / "dest"  # the key's target would be tmp_path/a/ESCAPED.txt
        with pytest.raises(InputLimitError, match=r"object key '.*ESCAPED\.txt' resolves to .*, outside .*dest"):
            run.download_dir("iter_1/model", destination)
        cache = tmp_path / "a" / "b" / "cache"
        with pytest.raises(InputLimitError, match="outside"):
            run.local_copy("iter_1/model", cache_dir=cache)
        assert [p.name for p in tmp_path.rglob("ESCAPED.txt")] == []
        assert not cache.exists() or list(cache.iterdir()) == []  # nothing staged is left
    finally:
        run.fs.rm(run.root, recursive=True)


# ----------------------------------------------------------------------------- parquet through pyarrow


def test_parquet_shards_through_arrow_filesystem(run_dir: RunDir):
    fs = run_dir.arrow_filesystem()
    table = pa.table({"prompt": ["a cat", "a dog"], "seed": [1, 2]})
    fs.create_dir(run_dir.fs_path("prepared"), recursive=True)
    pq.write_table(table, run_dir.fs_path("prepared/part-00000.parquet"), filesystem=fs)
    run_dir.mark_done("prepared", {"rows": 2})
    assert run_dir.is_done("prepared")
    back = pq.read_table(run_dir.fs_path("prepared/part-00000.parquet"), filesystem=fs)
    assert back.equals(table)


# ----------------------------------------------------------------------------- layout (issue 15)


def test_layout_names_every_place_of_a_run():
    layout = RunDir("/tmp/unused-run-dir")
    assert layout.model(2) == "iter_2/model"
    assert layout.opponents(1) == "iter_1/opponents"
    assert layout.baseline("sft") == "baseline_sft"
    assert layout.stage_train(layout.baseline("sft")) == "baseline_sft/train"
    assert layout.eval("iter_1") == "eval/iter_1"
    assert layout.eval("base", prompt_set="parti") == "eval/parti/base"
    assert layout.sweep_trial(2, "ab12") == "sweep/iter_2/trial_ab12"
    assert layout.pbt_trial("x", 3) == "sweep/pbt/trial_x/iter_3"
    assert layout.stage_of_model("sft") == "baseline_sft"
    assert layout.stage_of_model("spin_iter_4") == "iter_4"
    assert layout.stage_of_model("base") is None
    assert layout.model_name("baseline_sft") == "sft" and layout.model_name("iter_3") == "iter_3"
    with pytest.raises(ValueError, match="plain name"):
        layout.baseline("a/b")


def test_set_aside_moves_a_finished_stage_and_never_overwrites(run_dir: RunDir, caplog: pytest.LogCaptureFixture):
    run_dir.write_text_atomic("iter_2/model/weights.bin", "theta_2")
    run_dir.mark_done("iter_2", {})
    with caplog.at_level(logging.WARNING, logger="spin_ray.rundir"):
        first = run_dir.set_aside("iter_2", "was trained against another opponent")
    assert "was trained against another opponent" in caplog.text
    assert not run_dir.exists("iter_2") and run_dir.read_text(f"{first}/model/weights.bin") == "theta_2"
    run_dir.mark_done("iter_2", {})
    second = run_dir.set_aside("iter_2", "again")
    assert second != first and run_dir.is_done(first) and run_dir.is_done(second)
    assert run_dir.glob("iter_2.stale-*") == sorted([first, second])


def test_layout_of_sweeps_and_evaluation_round_trips():
    layout = RunDir("/tmp/unused-run-dir")
    trial = layout.sweep_trial(2, "ab12")
    assert layout.stage_of_model_dir(layout.stage_model(trial)) == trial
    assert layout.trial_id_of(layout.trial_dir_name("ab12")) == "ab12"
    assert layout.eval_scores(layout.eval("iter_1")) == "eval/iter_1/scores.parquet"
    assert layout.stage_score(trial).startswith(trial + "/") and layout.stage_lineage(trial).startswith(trial + "/")
    assert layout.sweep_opponent_record(2).startswith("sweep/iter_2/")
    assert layout.sweep_trials_table(2).startswith("sweep/iter_2/") and layout.sweep_beta_plot(2).startswith("sweep/")
    assert layout.tune_experiment("sweep/pbt") == "sweep/pbt/tune"
    assert layout.stage_progress("iter_3") == "iter_3/progress.json"
    assert layout.prepared_data() == "prepared/data" and layout.done_marker("iter_1") == "iter_1/DONE"
