"""Problems with the user's input or setup, as one kind: a stage prints such an error as one
line and exits 2 (no traceback). Each module keeps its own error class (ConfigError,
DataSourceError, StorageError, ...) and adds :class:`UserError` as a base; this module imports
nothing, so catching them all costs a stage no imports."""

from __future__ import annotations


class UserError(Exception):
    """The message says what is wrong (the file, field or setting and its value) and what to change."""


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: enough to name the failure in a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
