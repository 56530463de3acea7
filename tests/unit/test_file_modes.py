"""Run-directory files get the umask's usual modes (issue 14): the atomic writes (mkstemp, 0600)
and published directories (copied from a mkdtemp folder, 0700) are 0644 / 0755 under umask 022,
and a stricter umask is respected too."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from spin_ray.file_modes import current_umask, dir_mode, file_mode, make_tree_public
from spin_ray.rundir import RunDir


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_being_changed(umask):
    umask(0o027)
    assert current_umask() == 0o027 and file_mode() == 0o640 and dir_mode() == 0o750
    assert os.umask(0o027) == 0o027  # still in place


@pytest.mark.parametrize("mask, files, dirs", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(umask, tmp_path, mask, files, dirs):
    umask(mask)
    run = RunDir(tmp_path / "run")
    run.write_run_config("seed: 0\n")
    run.write_json_atomic("iter_1/metrics.json", {"loss": 1.0})
    run.mark_done("iter_1", {"steps": 1})
    (tmp_path / "plot.png").write_bytes(b"png")
    run.upload_file(tmp_path / "plot.png", "report/plot.png")
    for rel in ["config.yaml", "iter_1/metrics.json", "iter_1/DONE", "report/plot.png"]:
        assert mode(tmp_path / "run" / rel) == files, rel
    for rel in ["", "iter_1", "report"]:
        assert mode(tmp_path / "run" / rel) == dirs, rel


def test_a_published_directory_built_in_mkdtemp_is_shared(umask, tmp_path):
    umask(0o022)
    source = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as a TemporaryDirectory is
    (source / "unet").mkdir()
    fd, private = tempfile.mkstemp(dir=source / "unet", suffix=".safetensors")  # 0600
    os.close(fd)
    (source / "model_index.json").write_text("{}")
    published = Path(RunDir(tmp_path / "run").publish_dir(source, "iter_1/model", {"steps": 1}))
    assert mode(published) == 0o755 and mode(published / "unet") == 0o755
    for file in [published / "model_index.json", published / "DONE", published / "unet" / Path(private).name]:
        assert mode(file) == 0o644, file


def test_make_tree_public_keeps_execute_bits_and_skips_links(umask, tmp_path):
    umask(0o022)
    (tmp_path / "tree").mkdir(mode=0o700)
    script = tmp_path / "tree" / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o700)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    (tmp_path / "tree" / "link").symlink_to(outside)
    make_tree_public(tmp_path / "tree")
    assert mode(tmp_path / "tree") == 0o755 and mode(script) == 0o755 and mode(outside) == 0o600
