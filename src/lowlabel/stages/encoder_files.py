"""Encoder files as stages read them: a file that does not load is the user's to fix, in one line."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from lowlabel.errors import first_line
from lowlabel.stages.common import StageError


def load_failure(error: BaseException) -> str:
    """Why a model or checkpoint file did not load, in a few words."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds code or objects other than weights, refused by the safe loader (nothing in it was run)"
    return first_line(error)


def load_encoder_file(path: Path, remake: str) -> tuple[Any, dict[str, Any]]:
    """:func:`lowlabel.models.store.load_encoder`, with a file that does not load (tampered,
    cut off, another format) as a StageError naming it and ``remake``, the command that
    writes it again."""
    from lowlabel.models.store import load_encoder

    try:
        return load_encoder(path)
    except Exception as error:  # what a bad file raises depends on the format's loader
        raise StageError(f"{path} cannot be loaded: {load_failure(error)}; re-create it with `{remake}`") from None
