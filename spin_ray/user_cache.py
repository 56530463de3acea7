"""Per-user cache folders (issue 23, finding 8); see docs/SECURITY.md.

Downloads of run-directory models and the locks that guard them used to live at fixed,
predictable names in the shared temp folder (``/tmp/spin_ray_rundir_cache/<hash>``,
``/tmp/spin_ray_model_<hash>.lock``): on a host with several users, another user could
create them first, as a symlink elsewhere or a folder holding a model of their own, and
the job would write into it or load from it. Now everything sits under one folder per user,
``<tmp>/spin_ray-<uid>`` (or ``$SPIN_RAY_CACHE_DIR``), which is created with mode 0700 and,
before every use, checked without following symlinks: a real directory, owned by this user,
with no access for group or others. Anything else is refused with :class:`CacheDirError`;
nothing is deleted or repaired silently. Inside it only this user can create names, so the
sub-folders are checked the same way but cannot have been planted.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from spin_ray.errors import UserError

CACHE_ENV = "SPIN_RAY_CACHE_DIR"
"""Environment variable naming the per-user cache root instead of ``<tmp>/spin_ray-<uid>``."""


class CacheDirError(UserError, RuntimeError):
    """A cache folder is not a private directory of this user; one line naming it and why."""


def _uid() -> int:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else 0


def user_cache_root() -> Path:
    """This user's private cache root, created (mode 0700) and checked; see the module docstring."""
    configured = os.environ.get(CACHE_ENV)
    if not configured:
        return private_dir(Path(tempfile.gettempdir()) / f"spin_ray-{_uid()}")
    root = Path(configured).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    return private_dir(root)


def user_cache_dir(name: str) -> Path:
    """``<user cache root>/<name>``: a private sub-folder (``rundir_cache``, ``locks``, ...)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"user_cache_dir: {name!r} is not a plain folder name")
    return private_dir(user_cache_root() / name)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can use: created with mode 0700 if missing, else
    refused unless it is a real directory (not a symlink) owned by this user, without group or
    other permissions."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise CacheDirError(f"{path}: cannot create the cache folder, its parent does not exist") from None
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    """Raise :class:`CacheDirError` unless ``path`` itself (never a symlink's target) is a
    directory owned by this user with no group or other permissions."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise CacheDirError(f"{path}: cache folder is a symlink; refusing to follow it (remove it and rerun)")
    if not stat.S_ISDIR(info.st_mode):
        raise CacheDirError(f"{path}: cache folder is not a directory (remove it and rerun)")
    if info.st_uid != _uid():
        raise CacheDirError(f"{path}: cache folder is owned by uid {info.st_uid}, not by this user "
                            f"(uid {_uid()}); set {CACHE_ENV} to a folder of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise CacheDirError(f"{path}: cache folder has mode {stat.S_IMODE(info.st_mode):04o}; expected 0700 "
                            f"(owner only): chmod 700 it after checking its contents, or remove it")
