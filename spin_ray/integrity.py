"""Checksums of finished files: a manifest written into ``DONE``, verified before the files are used.

A finished directory's ``DONE`` (a published model: :meth:`RunDir.publish_dir`; the prepared
table: :meth:`RunDir.mark_done`) holds ``files``: for every file under the directory, its
sha256 and size in bytes. Before a finished stage's outputs are used again (theta_k as an
opponent or a starting point, a model for evaluation, the prepared table), the files are
checked against it (:func:`verify_manifest`): the size first (cheap, catches a cut-off copy),
then the sha256 read through in 1 MiB chunks (catches a flipped byte). A mismatch is an
:class:`IntegrityError` naming the file and the stage and how to redo it.

Verification is done once per process for each (place, DONE) pair (:func:`verified_once`):
a driver that reuses theta_2 as opponent and then evaluates it reads its files once. A
``DONE`` without ``files`` (written before checksums existed) is trusted as it is.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from spin_ray.errors import UserError
from spin_ray.run_layout import RunLayout

MANIFEST_KEY = "files"
"""The key of ``DONE`` that holds the manifest: relative path -> ``{"sha256": hex, "size": bytes}``."""
CHUNK_BYTES = 1 << 20

_verified: set[tuple[str, str]] = set()
_lock = threading.Lock()


class IntegrityError(UserError, OSError):
    """A finished file no longer matches the checksum recorded in its ``DONE``."""

    label = "integrity error"


Opener = Callable[[str], AbstractContextManager[IO[bytes]]]


def digest_stream(handle: IO[bytes]) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of what ``handle`` yields, read in :data:`CHUNK_BYTES` chunks."""
    sha, size = hashlib.sha256(), 0
    while chunk := handle.read(CHUNK_BYTES):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


NOT_CHECKSUMMED = (RunLayout.DONE, "README.md")
"""Files of a finished directory left out of its manifest: the marker itself, and a model's card
(spin_ray.model_card), documentation that is rewritten once the model is evaluated, also in a copy
of the model published elsewhere (a sweep's winner)."""


def local_manifest(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The manifest of every file under the local ``directory`` (:data:`NOT_CHECKSUMMED` excepted)."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in NOT_CHECKSUMMED)
    return manifest_of((p.relative_to(root).as_posix() for p in files), lambda name: open(root / name, "rb"))


def manifest_of(names: Iterable[str], opener: Opener) -> dict[str, dict[str, Any]]:
    """The manifest of the files ``names``, each read through ``opener(name)``."""
    manifest: dict[str, dict[str, Any]] = {}
    for name in names:
        with opener(name) as handle:
            sha, size = digest_stream(handle)
        manifest[name] = {"sha256": sha, "size": size}
    return manifest


def verify_manifest(manifest: dict[str, dict[str, Any]], opener: Opener, size_of: Callable[[str], int], *,
                    where: str, stage: str, redo: str) -> None:
    """Check every file of ``manifest`` (read through ``opener``; ``size_of`` raises
    FileNotFoundError for a missing one); the first mismatch raises :class:`IntegrityError`
    naming the file (under ``where``), the ``stage`` and ``redo`` (how to redo it)."""
    for name, expected in sorted(manifest.items()):
        try:
            size = size_of(name)
        except FileNotFoundError:
            raise _damaged(where, name, stage, redo, "is missing") from None
        if size != expected["size"]:
            raise _damaged(where, name, stage, redo, f"has {size} bytes, {expected['size']} were recorded")
        with opener(name) as handle:
            sha, _ = digest_stream(handle)
        if sha != expected["sha256"]:
            raise _damaged(where, name, stage, redo, f"has sha256 {sha[:12]}..., {expected['sha256'][:12]}... "
                                                     "was recorded (damaged since it was written)")


def _damaged(where: str, name: str, stage: str, redo: str, what: str) -> IntegrityError:
    return IntegrityError(f"{where.rstrip('/')}/{name} {what}; the finished stage {stage} cannot be trusted: {redo}")


def done_digest(done_text: str) -> str:
    """A short fingerprint of a ``DONE`` marker's text (it changes with every publication)."""
    return hashlib.sha256(done_text.encode("utf-8")).hexdigest()


def verified_once(place: str, done_text: str, verify: Callable[[], None]) -> None:
    """Run ``verify`` unless it already passed in this process for ``place`` with this ``DONE``."""
    key = (place, done_digest(done_text))
    with _lock:
        if key in _verified:
            return
    verify()
    remember_verified(place, done_text)


def remember_verified(place: str, done_text: str) -> None:
    """Record that ``place`` matches ``done_text`` (e.g. its manifest was just computed from it)."""
    with _lock:
        _verified.add((place, done_digest(done_text)))


def forget_verified() -> None:
    """Forget every verification of this process (tests; a long-lived driver re-checking)."""
    with _lock:
        _verified.clear()


def redo_hint(stage: str, path: str) -> str:
    """How to redo a damaged ``stage``: ``--restart-from`` for a stage of the self-play chain,
    else remove the directory."""
    top = stage.split("/", 1)[0]
    if "/" not in stage and (top == "prepared" or top.startswith(("iter_", "baseline_"))):
        return f"rerun with --restart-from {stage} to redo it and the stages after it"
    return f"remove {path} and rerun to redo it"
