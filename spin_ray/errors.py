"""Errors the user can fix, and how a job finds one inside the wrappers Ray puts around it.

A :class:`UserError` is a mistake in the config, the data, a model path or the run directory:
its message names the place and the fix, so the command line prints it as one line and exits
with code 2 (:func:`spin_ray.cli.run_job`). Every other exception is a bug and keeps its
traceback. The concrete classes also derive from the builtin they replace (``ValueError``,
``OSError``, ...), so existing ``except`` clauses keep catching them.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message says what is wrong and where."""

    label = "error"
    """How the command line introduces the message (``error: ...``)."""


class StorageError(UserError, OSError):
    """The run directory (``run_dir``) cannot be used: unknown protocol, missing fsspec driver,
    or not writable."""

    label = "storage error"


class ModelError(UserError, OSError):
    """A model path or hub id does not lead to a usable diffusers pipeline."""

    label = "model error"


class ModelDirError(ModelError, FileNotFoundError):
    """A local model directory is missing or lacks a part of a diffusers pipeline."""


def first_line(err: BaseException) -> str:
    """The first line of an error's text (some drivers' messages run over dozens of lines)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def find_user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``err``, looking through Ray's wrappers, else None.

    Ray re-raises a task's or actor's exception as a ``RayTaskError`` (with the original in
    ``.cause``; it may even subclass the original's class, but its text is the remote
    traceback), Ray Data raises ``UserCodeException`` from the UDF's error, and Ray Train
    collects the workers' errors in ``worker_failures``. Only explicit causes are followed,
    never ``__context__``: an error raised while handling a user error is a bug of its own.
    """
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = _ray_wrapped(current)
        if isinstance(current, UserError) and not wrapped:
            return current
        pending.extend(wrapped)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return None


def _ray_wrapped(err: BaseException) -> list[BaseException]:
    """The exceptions a Ray wrapper carries: a task's ``cause``, Ray Train's worker and
    controller failures (and the user exception inside its traceback holder)."""
    found: list[object] = [getattr(err, "cause", None), getattr(err, "controller_failure", None),
                           getattr(err, "_base_exc", None)]
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict):
        found.extend(failures.values())
    return [e for e in found if isinstance(e, BaseException) and e is not err]
