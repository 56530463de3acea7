"""What console tests write into: a text buffer that says whether it is a terminal."""

from __future__ import annotations

import io


class Output(io.StringIO):
    """``sys.stdout`` stand-in whose ``isatty()`` answers ``tty``."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty
