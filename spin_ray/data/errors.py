"""The error a bad SFT data set raises, and the wording its messages share."""

from __future__ import annotations

from spin_ray.errors import UserError

SKIP_HINT = "set data.on_bad_row=skip to drop such rows"


class DataError(UserError, ValueError):
    """The SFT data is unusable; the message names the file, row, field and what was expected."""

    label = "data error"


def one_line(err: Exception) -> str:
    """``err`` as ``TypeName: message`` on one line, to quote inside a message."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
