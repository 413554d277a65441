"""Safe files: atomic saves (temporary file + rename) and loads that never unpickle objects."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(state: dict, path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder, renamed into place:
    an existing file is replaced whole or left as it was, never half-written."""
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def safe_load(path, *, format_name: str, what: str) -> dict:
    """Read a file written by :func:`atomic_save` with ``weights_only=True`` (tensors and plain
    values only) and check its ``"format"`` tag; ``what`` names the file kind in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no file at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"path: {str(path)!r} is not a readable {what} "
                         f"(truncated or foreign file?): {error}") from error
    if not isinstance(state, dict) or state.get("format") != format_name:
        raise ValueError(f"path: {str(path)!r} is not a {what} file")
    return state
