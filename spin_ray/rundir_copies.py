"""Checked local copies of a run directory's finished directories (a mixin of :class:`~spin_ray.rundir.RunDir`).

A model is loaded from a local directory (``from_pretrained``): on local disk the run
directory's own folder, on object stores a download into this user's cache, reused while its
DONE equals the remote one. Either way the files are checked against the sha256 and sizes of
their DONE (:mod:`spin_ray.integrity`) before the path is handed out, once per process: the
download is checked rather than the store read a second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from spin_ray.input_limits import InputLimitError, contained_local_path
from spin_ray.integrity import MANIFEST_KEY, IntegrityError, redo_hint, verified_once, verify_manifest
from spin_ray.run_layout import RunLayout
from spin_ray.user_cache import user_cache_dir

if TYPE_CHECKING:
    from spin_ray.rundir import RunDir

logger = logging.getLogger(__name__)
DONE = RunLayout.DONE


def _download_target(destination: Path, remote_root: str, remote_path: str) -> Path:
    """Where ``remote_path`` (found under ``remote_root``) goes inside ``destination``; refused
    if the key is not under the root or resolves outside ``destination`` (issue 23, finding 3)."""
    if not remote_path.startswith(remote_root.rstrip("/") + "/"):
        raise InputLimitError(f"object key {remote_path!r}: not under {remote_root!r}; refusing to download it")
    key = remote_path[len(remote_root):].lstrip("/")
    return contained_local_path(destination, key, what=f"{remote_path}: object key")


def _stage_of(rel: str, full_path: str) -> tuple[str, str]:
    """(stage name, its location) of the finished directory ``rel`` found at ``full_path``: a
    model's stage is the folder holding it (``.../iter_2/model`` -> ``iter_2``, also when the
    run dir handed in is that folder, as the evaluation's ``RunDir(".../iter_2").local_copy("model")``)."""
    if rel == "model" or rel.endswith("/model"):
        stage_path = full_path.rstrip("/").rsplit("/", 1)[0]
        return stage_path.rsplit("/", 1)[-1], stage_path
    return rel, full_path


class LocalCopies:
    """:meth:`verify`, :meth:`download_dir` and :meth:`local_copy` of :class:`~spin_ray.rundir.RunDir`."""

    def verify(self: RunDir, rel: str) -> None:
        """Check the files of the finished directory ``rel`` against the manifest in its DONE
        (:mod:`spin_ray.integrity`), once per process; raises
        :class:`~spin_ray.integrity.IntegrityError` naming the damaged file and the stage."""
        done_text = self.read_text(self.done_marker(rel))
        manifest = json.loads(done_text).get(MANIFEST_KEY)
        if manifest is None:  # written before checksums existed: nothing to compare with
            return
        stage, stage_path = _stage_of(rel, self.path(rel))
        verified_once(self.path(rel), done_text, lambda: verify_manifest(
            manifest, lambda name: self.open_read(f"{rel}/{name}"), lambda name: self.size(f"{rel}/{name}"),
            where=self.path(rel), stage=stage, redo=redo_hint(stage, stage_path)))

    def download_dir(self: RunDir, rel: str, local_dir: str | os.PathLike[str]) -> Path:
        """A local directory holding ``rel`` (e.g. a model for ``from_pretrained``).

        Local run dir: ``rel`` itself, no copy. Object store: every file under ``rel`` is
        downloaded into ``local_dir``, which is returned. An object key that would land
        outside ``local_dir`` (``../`` in a key: an object store takes any string) is refused
        with :class:`~spin_ray.input_limits.InputLimitError` before anything is downloaded.
        """
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.path(rel)}: no such directory")
        if self.is_local:
            return self.local_path(rel)
        remote_root = self.fs_path(rel)
        remote = [p for p in self.fs.find(remote_root) if not p.endswith("/")]
        destination = Path(local_dir)
        local = [str(_download_target(destination, remote_root, p)) for p in remote]
        for path in local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(remote, local)
        return destination

    def local_copy(self: RunDir, rel: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
        """A local directory with the contents of ``rel``, e.g. a model for ``from_pretrained``.

        Local run dir: ``rel`` itself. Object store: a download under ``cache_dir`` (default
        ``rundir_cache`` in this user's private cache folder, :mod:`spin_ray.user_cache`),
        reused while its DONE equals the remote DONE (a
        published directory's DONE carries a unique ``publish_id``); the download is staged
        and renamed, so a killed download is never reused.
        """
        if self.is_local:
            if not self.exists(rel):
                raise FileNotFoundError(f"{self.path(rel)}: no such directory")
            if self.is_done(rel):
                self.verify(rel)
            return str(self.local_path(rel))
        cache_root = Path(cache_dir) if cache_dir is not None else user_cache_dir("rundir_cache")
        target = cache_root / hashlib.sha256(self.path(rel).encode("utf-8")).hexdigest()[:20]
        remote_done = self.read_text(self.done_marker(rel)) if self.is_done(rel) else None
        cached_done = target / DONE
        if remote_done is not None and cached_done.is_file() and cached_done.read_text("utf-8") == remote_done:
            try:
                self._verify_copy(rel, target, remote_done)
                return str(target)
            except IntegrityError as err:  # the cached copy was damaged: download it again
                logger.warning("%s; downloading it again", err)
        staging = cache_root / f".{target.name}.{uuid.uuid4().hex[:12]}"
        try:
            self.download_dir(rel, staging)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if remote_done is not None:
            self._verify_copy(rel, target, remote_done)
        return str(target)

    def _verify_copy(self: RunDir, rel: str, copy: Path, done_text: str) -> None:
        """Check the local ``copy`` of the finished ``rel`` against the manifest of its DONE
        (``done_text``), once per process: the download is read instead of the store again."""
        manifest = json.loads(done_text).get(MANIFEST_KEY)
        if manifest is None:
            return
        stage, stage_path = _stage_of(rel, self.path(rel))
        verified_once(str(copy), done_text, lambda: verify_manifest(
            manifest, lambda name: open(copy / name, "rb"), lambda name: (copy / name).stat().st_size,
            where=self.path(rel), stage=stage, redo=redo_hint(stage, stage_path)))
