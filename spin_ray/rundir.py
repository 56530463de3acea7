"""The run directory: layout, atomic writes, DONE markers and resume.

A run directory lives on local disk or behind any fsspec URL (``s3://``, ``gs://``,
``file://``, ``memory://``); remote protocols need their fsspec driver installed (``s3fs``,
``gcsfs``). Its layout (what lives where) is :mod:`spin_ray.run_layout`, whose methods RunDir
inherits; this module is the one file-system layer through which code reaches a run's files.

Completeness is defined by the DONE marker and nothing else: a directory without DONE is
unfinished, whatever it holds, and is removed (:meth:`RunDir.remove_incomplete`) before it
is written again. DONE is written after everything else in its directory.

Atomicity. A single file is replaced atomically: on local disk by writing a temporary file
in the same directory, fsync, ``os.replace``; on object stores by one PUT of the whole
object (object stores never show half an object). A whole directory is published with
:meth:`RunDir.publish_dir`: on local disk it is assembled under a hidden sibling name
(DONE included) and renamed into place; object stores cannot rename a prefix atomically, so
the files are uploaded first and DONE last. A writer killed midway leaves at most a hidden
temporary sibling (``.<name>.*.tmp`` or ``.<name>.publish-*``), never a finished-looking file
or directory.

Integrity. A published directory's DONE (and the prepared table's) records every file's sha256
and size; :meth:`RunDir.verify` and :meth:`RunDir.local_copy` (:mod:`spin_ray.rundir_copies`)
check them before the files are used again (:mod:`spin_ray.integrity`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem

from spin_ray.errors import StorageError, first_line
from spin_ray.file_modes import make_tree_public
from spin_ray.input_limits import InputLimitError
from spin_ray.integrity import MANIFEST_KEY, local_manifest, manifest_of, remember_verified
from spin_ray.local_files import fsync_dir, fsync_tree, local_atomic_file
from spin_ray.run_layout import RunLayout, iteration_number
from spin_ray.rundir_copies import LocalCopies

logger = logging.getLogger(__name__)

DONE = RunLayout.DONE


def _done_text(info: dict[str, Any]) -> str:
    """The text of a DONE marker holding ``info`` (the same bytes wherever it is written)."""
    return json.dumps(info, indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- the run directory


class RunDir(RunLayout, LocalCopies):
    """A run directory on local disk or behind an fsspec URL; see the module docstring. Its
    layout methods (``model(k)``, ``stage_metrics(stage)``, ...) come from :class:`RunLayout`.

    Methods take paths relative to the run directory, ``/``-separated (``"iter_2/model"``).
    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for
    an S3-compatible store). A RunDir pickles as its URL and options, so Ray tasks can take it.
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as err:
            raise StorageError(f"run_dir {self.url!r}: its filesystem driver is not installed ({err})") from err
        except (ValueError, OSError) as err:  # fsspec: "Protocol not known: ..."; a driver that cannot start
            raise StorageError(f"run_dir {self.url!r}: not a usable local path or fsspec URL ({first_line(err)})") from err
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, Any]]]:
        # A local run dir travels as its absolute path: the receiver may have another cwd.
        return (RunDir, (self.path() if self.is_local else self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"RunDir({self.path()!r})"

    # ------------------------------------------------------------------ paths

    def fs_path(self, rel: str = "") -> str:
        """Path of ``rel`` inside :attr:`fs` (no protocol), e.g. ``bucket/run/iter_1``."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts or rel.startswith("/"):  # a name from a config or an object key climbing out
            raise InputLimitError(f"run dir path {rel!r}: must be relative to the run dir, without '..'")
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def path(self, *parts: str) -> str:
        """Full location of ``parts`` joined: a local path, or a URL with the protocol."""
        full = self.fs_path("/".join(parts))
        return full if self.is_local else self.fs.unstrip_protocol(full)

    def local_path(self, rel: str = "") -> Path:
        """``rel`` as a local :class:`Path`; only for run dirs on local disk."""
        if not self.is_local:
            raise ValueError(f"run dir {self.path()} is not on local disk; use path() or fs instead")
        return Path(self.fs_path(rel))

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        """A pyarrow view of :attr:`fs` for ``pyarrow.parquet``, Ray Data (``filesystem=``) and Ray
        Train (``RunConfig(storage_filesystem=...)``); pair it with :meth:`fs_path`."""
        if self.is_local:
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    # ------------------------------------------------------------------ reading

    def exists(self, rel: str) -> bool:
        """Whether a file or directory ``rel`` exists (listings are re-read, not cached)."""
        full = self.fs_path(rel)
        self.fs.invalidate_cache(full)
        return bool(self.fs.exists(full))

    def read_text(self, rel: str) -> str:
        """Contents of the UTF-8 text file ``rel``; errors name the full path."""
        try:
            return self.fs.cat_file(self.fs_path(rel)).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path(rel)}: no such file") from None

    def read_json(self, rel: str) -> Any:
        """Parsed JSON file ``rel``; errors name the full path."""
        text = self.read_text(rel)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path(rel)}: invalid JSON ({err})") from err

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        """Binary handle on the file ``rel`` (for pyarrow and other streaming readers)."""
        with self.fs.open(self.fs_path(rel), "rb") as handle:
            yield handle

    def glob(self, pattern: str) -> list[str]:
        """Run-dir-relative paths matching ``pattern`` (fsspec glob, e.g. ``"a/*.parquet"``),
        sorted; listings are re-read, not cached."""
        self.fs.invalidate_cache(self.root)
        root = self.root.rstrip("/") + "/"
        found = self.fs.glob(self.fs_path(pattern))
        return sorted(path[len(root):] if path.startswith(root) else path for path in found)

    def find(self, rel: str = "") -> list[str]:
        """Run-dir-relative paths of every file under ``rel``, sorted."""
        self.fs.invalidate_cache(self.root)
        root = self.root.rstrip("/") + "/"
        return sorted(path[len(root):] for path in self.fs.find(self.fs_path(rel)) if path.startswith(root))

    def is_file(self, rel: str) -> bool:
        return bool(self.fs.isfile(self.fs_path(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.fs_path(rel)))

    # ------------------------------------------------------------------ atomic writes

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[IO[bytes]]:
        """Binary file handle whose contents replace ``rel`` only if the block succeeds.

        If the block raises (or the process dies) the previous version of ``rel`` stays as it
        was. Object stores buffer in memory and upload once at the end (one atomic PUT).
        """
        full = self.fs_path(rel)
        if self.is_local:
            with local_atomic_file(full) as f:
                yield f
            return
        buffer = io.BytesIO()
        yield buffer
        self.fs.pipe_file(full, buffer.getvalue())

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` atomically."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def write_text_atomic(self, rel: str, text: str) -> None:
        """Replace ``rel`` with UTF-8 ``text`` atomically."""
        self.write_bytes_atomic(rel, text.encode("utf-8"))

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        """Replace ``rel`` with ``obj`` as indented JSON, atomically."""
        self.write_text_atomic(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_run_config(self, text: str) -> None:
        """Write the run's ``config.yaml``: a job's first write, so a run dir that cannot be
        written (no permission, a file in the way, no credentials) fails here as a
        :class:`~spin_ray.errors.StorageError` instead of deep inside a Ray task."""
        try:
            self.write_text_atomic(self.CONFIG, text)
        except OSError as err:
            raise StorageError(f"run_dir {self.path()}: cannot write to it ({first_line(err)})") from err

    # ------------------------------------------------------------------ DONE markers

    def is_done(self, rel: str) -> bool:
        """Whether directory ``rel`` is complete (has its DONE marker)."""
        return self.exists(self.done_marker(rel))

    CHECKSUMMED = (RunLayout.PREPARED,)
    """Directories whose DONE records every file's sha256 and size when marked done (a published
    model's DONE always does, :meth:`publish_dir`); a stage directory holds checkpoints and
    caches, so it is not one of them (:mod:`spin_ray.integrity`)."""

    def mark_done(self, rel: str, info: dict[str, Any], *, checksums: bool | None = None) -> None:
        """Declare directory ``rel`` complete: write ``info`` as JSON to ``rel/DONE``; with
        ``checksums`` (default: ``rel`` is one of :attr:`CHECKSUMMED`) ``info`` gains the
        manifest of every file under ``rel``, each read back once to hash it.

        Call it only after everything else in ``rel`` is written.
        """
        if checksums if checksums is not None else rel in self.CHECKSUMMED:
            names = [path[len(rel) + 1:] for path in self.find(rel) if path != self.done_marker(rel)]
            info = {**info, MANIFEST_KEY: manifest_of(names, lambda name: self.open_read(f"{rel}/{name}"))}
        text = _done_text(info)
        self.write_text_atomic(self.done_marker(rel), text)
        if MANIFEST_KEY in info:
            remember_verified(self.path(rel), text)  # just hashed: no need to read it again in this process

    def read_done(self, rel: str) -> dict[str, Any]:
        """The info stored in ``rel/DONE``."""
        return self.read_json(self.done_marker(rel))

    def remove_incomplete(self, rel: str) -> bool:
        """Delete directory ``rel`` if it exists without DONE, with any leftover temporary
        siblings of a killed local publish. Returns whether anything was removed; a complete
        directory is never touched."""
        if not rel.strip("/"):
            raise ValueError("remove_incomplete: refusing to remove the run dir itself; pass a subdirectory")
        if self.is_done(rel):
            return False
        removed = False
        if self.exists(rel):
            self.fs.rm(self.fs_path(rel), recursive=True)
            removed = True
        if self.is_local:
            target = self.local_path(rel)
            for leftover in target.parent.glob(f".{target.name}.publish-*"):
                shutil.rmtree(leftover, ignore_errors=True)
                removed = True
        return removed

    def remove(self, rel: str) -> None:
        """Delete file or directory ``rel`` (finished or not); the run dir itself is refused."""
        if not rel.strip("/"):
            raise ValueError("remove: refusing to remove the run dir itself; pass a subdirectory")
        self.fs.rm(self.fs_path(rel), recursive=True)

    def move(self, rel: str, new_rel: str) -> None:
        """Rename ``rel`` to ``new_rel``: one rename on local disk; on object stores every
        object is copied, then the originals deleted (s3fs's recursive ``mv`` trips over the
        directory placeholders it lists, so objects are copied one by one)."""
        source, target = self.fs_path(rel), self.fs_path(new_rel)
        if self.is_local:
            self.fs.mv(source, target, recursive=True)
            return
        self.fs.invalidate_cache()  # copy what is there now, not a listing cached earlier
        for path in self.fs.find(source):
            self.fs.copy(path, target + path[len(source):])
        self.fs.rm(source, recursive=True)

    def set_aside(self, rel: str, why: str) -> str:
        """Move the finished ``rel`` aside to ``<rel>.stale-<time>`` (work is never deleted: a
        stale stage may still be worth a look) and log ``why``; returns the new place."""
        stamp = int(time.time())
        while self.exists(self.aside_name(rel, stamp)):
            stamp += 1
        aside = self.aside_name(rel, stamp)
        logger.warning("%s %s; moving it to %s", self.path(rel), why, aside)
        self.move(rel, aside)
        return aside

    # ------------------------------------------------------------------ directories

    def publish_dir(self, local_dir: str | os.PathLike[str], rel: str, info: dict[str, Any] | None = None) -> str:
        """Copy the locally built directory ``local_dir`` to ``rel`` and mark it DONE with ``info``.

        Local run dir: copied to a hidden sibling, DONE written inside, fsynced, renamed into
        place, so ``rel`` appears complete or not at all. Object store: files are uploaded,
        then DONE. A half-published ``rel`` (no DONE) is removed first; an already published
        one raises FileExistsError. DONE holds ``info`` plus ``publish_id``, a fresh random id
        that tells one publication from another (see :meth:`local_copy`). Returns
        :meth:`path` of ``rel``.
        """
        source = Path(local_dir)
        if not source.is_dir():
            raise NotADirectoryError(f"publish_dir: {source} is not a directory")
        if self.is_done(rel):
            raise FileExistsError(f"{self.path(rel)}: already published (has {DONE}); remove it to replace it")
        self.remove_incomplete(rel)
        info = {**(info or {}), MANIFEST_KEY: local_manifest(source), "publish_id": uuid.uuid4().hex}
        if self.is_local:
            self._publish_local(source, rel, info)
        else:
            self._publish_remote(source, rel, info)
        remember_verified(self.path(rel), _done_text(info))  # hashed from the source just now
        return self.path(rel)

    def _publish_local(self, source: Path, rel: str, info: dict[str, Any]) -> None:
        target = self.local_path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.publish-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(source, staging)
            make_tree_public(staging)  # copytree keeps the source's modes: a mkdtemp source is 0700
            with local_atomic_file(str(staging / DONE)) as f:
                f.write(_done_text(info).encode("utf-8"))
            fsync_tree(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(target.parent)

    def _publish_remote(self, source: Path, rel: str, info: dict[str, Any]) -> None:
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != DONE)
        if files:
            remote = [self.fs_path(f"{rel}/{p.relative_to(source).as_posix()}") for p in files]
            self.fs.put([str(p) for p in files], remote)
        self.mark_done(rel, info, checksums=False)  # the manifest is in info already

    def upload_file(self, local_file: str | os.PathLike[str], rel: str) -> None:
        """Copy one local file to ``rel``, atomically (temp file + rename, or one object upload)."""
        source = Path(local_file)
        if not source.is_file():
            raise FileNotFoundError(f"upload_file: {source} is not a file")
        if self.is_local:
            with open(source, "rb") as src, self.open_atomic(rel) as dst:
                shutil.copyfileobj(src, dst)
        else:
            self.fs.put_file(str(source), self.fs_path(rel))

    # ------------------------------------------------------------------ resume

    def done_iterations(self) -> list[int]:
        """Sorted numbers k of every ``iter_<k>`` that has its DONE marker."""
        self.fs.invalidate_cache(self.root)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        numbers = [k for k in map(iteration_number, names) if k is not None]
        return sorted(k for k in numbers if k >= 1 and self.is_done(self.iteration(k)))

    def last_done_iteration(self) -> int:
        """The largest K such that iterations 1..K are all DONE (0 if iteration 1 is not).

        Iterations form a chain (theta_k is trained against theta_{k-1}), so a DONE
        iteration after a gap was trained against an opponent that will be replaced: it is
        ignored, with a warning.
        """
        done = self.done_iterations()
        last = 0
        while last + 1 in done:
            last += 1
        stale = [k for k in done if k > last]
        if stale:
            logger.warning(
                "%s: iterations %s are DONE but iteration %d is not; they will be redone after it",
                self.path(), stale, last + 1,
            )
        return last
