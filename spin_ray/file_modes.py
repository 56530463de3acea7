"""Usual permissions for files made through :mod:`tempfile`.

``tempfile.mkstemp`` creates 0600 files and ``tempfile.mkdtemp`` 0700 directories whatever the
umask, which is right for secrets but not for run-directory content that is meant to be shared
(reports, metrics, models). Files that are built in a temporary place and then renamed into
the run directory get the mode an ordinary ``open``/``mkdir`` would have given them:
0666 & ~umask (0644 under the default umask 022) and 0777 & ~umask (0755). The per-user
caches of :mod:`spin_ray.user_cache` stay private on purpose and do not use this module.
"""

from __future__ import annotations

import functools
import os
import stat
import threading

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux's
    ``/proc/self/status``); elsewhere read once by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_swapping()


@functools.lru_cache(maxsize=1)
def _umask_by_swapping() -> int:
    # os.umask can only be read by setting it; another thread creating a file in between would
    # get the temporary value, so set a restrictive one and do it once per process.
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new ordinary file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new directory under the current umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def make_tree_public(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything under it the umask's usual modes (executable files keep
    their execute bits), e.g. after ``shutil.copytree`` from a ``mkdtemp`` directory."""
    files, dirs = file_mode(), dir_mode()
    os.chmod(root, dirs)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):  # chmod would follow it to whatever it points at
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, dirs if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else files)
