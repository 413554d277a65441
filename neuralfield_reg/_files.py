"""Safe files: atomic saves (temporary file + rename) and loads that never unpickle objects."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path, write: Callable[[str], None], *, suffix: str = ".tmp") -> None:
    """Write ``path`` through a temporary file in the same folder, renamed into place: an
    existing file is replaced whole or left as it was, never half-written.

    Args:
        write: called with the temporary file's name; writes the whole file there.
        suffix: the temporary name's ending (writers such as nibabel choose the format by it).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_save(state: dict, path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


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
