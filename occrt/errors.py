"""The error types users see.

`FormatError` is the one error a reader raises for a bad or corrupt `.occ` file (or a bad payload given to a codec's
decoder): it names the byte offset where the problem is and what is wrong. `OccError` is the base of every error that
the command line prints as one line instead of a traceback.
"""
from __future__ import annotations


class OccError(Exception):
    """Base class: an error with a message meant for the user (the CLI prints it as one line)."""


class FormatError(OccError):
    """A `.occ` file (or a codec payload inside it) is malformed, truncated or corrupt.

    `offset` is the absolute byte offset in the file where the problem was found (or, for a payload decoded on its
    own, the offset inside that payload), `None` when the problem is not tied to one place.
    """

    def __init__(self, message: str, offset: int | None = None, *, path: str | None = None):
        self.offset = offset
        self.path = path
        self.reason = message
        where = "" if offset is None else f" at byte {offset}"
        prefix = f"{path}: " if path else ""
        super().__init__(f"{prefix}invalid .occ file{where}: {message}")

    def relocated(self, base: int, path: str | None = None) -> "FormatError":
        """The same error with its offset moved by `base` (a payload's position in the file)."""
        offset = None if self.offset is None else base + self.offset
        return FormatError(self.reason, offset, path=path or self.path)


class UnsupportedModelError(OccError):
    """A source checkpoint uses an architecture or feature the converter does not handle."""


class ConversionError(OccError):
    """A source checkpoint is missing a piece or holds something inconsistent."""
