"""Per-user cache folders (issue 23, finding 8): mode 0700, owner checked, no symlink followed;
the run-dir download cache and the model locks live there, not at shared names in /tmp."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spin_ray import user_cache
from spin_ray.user_cache import CACHE_ENV, CacheDirError, private_dir, user_cache_dir, user_cache_root


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """A fresh temp folder in place of /tmp, no $SPIN_RAY_CACHE_DIR."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setattr(user_cache.tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_cache_is_a_private_folder_of_this_user(tmp_root):
    folder = user_cache_dir("rundir_cache")
    root = tmp_root / f"spin_ray-{os.getuid()}"
    assert folder == root / "rundir_cache"
    assert mode(root) == 0o700 and mode(folder) == 0o700
    assert os.lstat(root).st_uid == os.getuid()
    assert user_cache_dir("rundir_cache") == folder  # reused


def test_a_planted_symlink_is_refused_and_not_followed(tmp_root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("attacker")
    (tmp_root / f"spin_ray-{os.getuid()}").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CacheDirError, match="is a symlink; refusing to follow it"):
        user_cache_dir("rundir_cache")
    assert list(elsewhere.iterdir()) == []  # nothing was created through the link


def test_a_folder_open_to_others_or_a_file_is_refused(tmp_root):
    root = tmp_root / f"spin_ray-{os.getuid()}"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    with pytest.raises(CacheDirError, match="mode 0777; expected 0700"):
        user_cache_root()
    root.rmdir()
    root.write_text("not a folder")
    with pytest.raises(CacheDirError, match="is not a directory"):
        user_cache_root()


def test_a_folder_of_another_user_is_refused(tmp_root, monkeypatch):
    user_cache_root()
    monkeypatch.setattr(user_cache, "_uid", lambda: os.getuid() + 1)  # as seen by another user
    with pytest.raises(CacheDirError, match=r"owned by uid \d+, not by this user"):
        private_dir(tmp_root / f"spin_ray-{os.getuid()}")


def test_the_environment_variable_moves_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine" / "cache"))
    assert user_cache_dir("locks") == tmp_path / "mine" / "cache" / "locks"
    assert mode(tmp_path / "mine" / "cache") == 0o700
    with pytest.raises(ValueError, match="not a plain folder name"):
        user_cache_dir("../x")


def test_run_dir_downloads_and_model_locks_use_the_private_folder(tmp_root, monkeypatch):
    import spin_ray.eval.scoring as scoring
    from spin_ray.rundir import RunDir

    class FakeRemote(RunDir):
        is_local = False

        def __init__(self):
            pass

        def path(self, *parts):
            return "memory://bucket/run/" + "/".join(parts)

        def is_done(self, rel):
            return False

        def download_dir(self, rel, local_dir):
            Path(local_dir).mkdir(parents=True)
            (Path(local_dir) / "weights.safetensors").write_bytes(b"x")
            return Path(local_dir)

    local = Path(FakeRemote().local_copy("iter_1/model"))
    assert local.parent == tmp_root / f"spin_ray-{os.getuid()}" / "rundir_cache"
    assert (local / "weights.safetensors").read_bytes() == b"x"

    locks = []
    monkeypatch.setattr(scoring, "RunDir", lambda parent: type("R", (), {"local_copy": lambda self, leaf: leaf})())
    monkeypatch.setattr("filelock.FileLock", lambda path: locks.append(path) or _NullLock())
    scoring._local_model("s3://bucket/run/iter_1/model")
    assert Path(locks[0]).parent == tmp_root / f"spin_ray-{os.getuid()}" / "locks"
    assert not list(tmp_root.glob("spin_ray_model_*")) and not (tmp_root / "spin_ray_rundir_cache").exists()


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
