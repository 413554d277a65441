"""Safe files: atomic saves (temporary file + rename) and loads that never unpickle objects."""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

# The writer threads of the innermost background_writes block (None: write at once).
_WRITERS: contextvars.ContextVar = contextvars.ContextVar("neuralfield_reg_writers", default=None)


@contextlib.contextmanager
def background_writes(workers: int = 2) -> Iterator[None]:
    """Within this block, :func:`atomic_write` hands each file to one of ``workers`` threads and
    returns at once, so that writing (chiefly the zlib compression of ``.nii.gz`` files, which
    releases the GIL) runs beside the caller's next computation. Leaving the block waits for every
    write; then the block's own error is raised if it had one, else the first failed write's.
    What a write is given must not change after the call (the library's outputs are fresh arrays)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="nfreg-write")
    futures: list[Future] = []
    token = _WRITERS.set((pool, futures))
    try:
        yield
    finally:
        _WRITERS.reset(token)
        pool.shutdown(wait=True)
    for future in futures:
        future.result()                  # the first failed write's error


def atomic_write(path, write: Callable[[str], None], *, suffix: str = ".tmp") -> None:
    """Write ``path`` through a temporary file in the same folder, renamed into place: an
    existing file is replaced whole or left as it was, never half-written. Inside
    :func:`background_writes` the write runs on a writer thread (a missing folder still raises here).

    Args:
        write: called with the temporary file's name; writes the whole file there.
        suffix: the temporary name's ending (writers such as nibabel choose the format by it).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist")
    mode = 0o666 & ~_umask()         # read here, in the calling thread (umask is process-wide)
    writers = _WRITERS.get()
    if writers is None:
        _write_and_rename(path, write, suffix, mode)
    else:
        pool, futures = writers
        futures.append(pool.submit(_write_and_rename, path, write, suffix, mode))


def _write_and_rename(path: Path, write: Callable[[str], None], suffix: str, mode: int) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)          # mkstemp makes 0600; files get the usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        text = str(error)
        # torch's message for a pickle with objects other than tensors advises loading it with
        # weights_only=False, i.e. running its code: not advice to pass on for a foreign file
        reason = ("it is not a file of tensors and plain values, the only kind read"
                  if "weights_only" in text else (text.splitlines() or [type(error).__name__])[0])
        raise ValueError(f"path: {str(path)!r} is not a readable {what} "
                         f"(truncated or foreign file?): {reason}") from error
    if not isinstance(state, dict) or state.get("format") != format_name:
        raise ValueError(f"path: {str(path)!r} is not a {what} file")
    return state


INCOMPLETE = "INCOMPLETE"


_MARKER_TEXT = ("An nfreg run is writing this folder, or was interrupted while it was: its files may be partial. "
                "Rerun to complete it.\n")


def _new_folder_with_marker(folder: Path) -> None:
    """Create ``folder`` with its ``INCOMPLETE`` marker already inside (made as a hidden sibling,
    then renamed), so that no interruption leaves a new output folder without its marker."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / INCOMPLETE).write_text(_MARKER_TEXT)
        os.chmod(staging, 0o777 & ~_umask())             # mkdtemp makes 0700; folders get the usual mode
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():                          # not another process creating it meanwhile
            raise
    finally:
        if staging.exists():
            (staging / INCOMPLETE).unlink(missing_ok=True)
            staging.rmdir()


def begin_outputs(folder, names) -> None:
    """Start replacing a folder's outputs: checks that the folder can be written (before any long
    work), drops its ``summary.json`` and every earlier output among ``names`` (so no stale file
    of another run stays), and leaves an ``INCOMPLETE`` marker that :func:`end_outputs` removes.
    An interrupted run therefore leaves a folder that says it is incomplete and holds only files
    of this run (and no summary). A folder is complete when it has a ``summary.json`` and no
    ``INCOMPLETE`` (the marker goes once every output is written, then the summary is written)."""
    folder = Path(folder)
    try:
        if not folder.exists():
            _new_folder_with_marker(folder)
        atomic_write_text(folder / INCOMPLETE, _MARKER_TEXT)
    except OSError as error:
        raise OSError(f"output folder: {str(folder)!r} cannot be written ({error})") from error
    for name in ("summary.json", *names):
        (folder / name).unlink(missing_ok=True)


def end_outputs(folder) -> None:
    """All outputs are written: remove the ``INCOMPLETE`` marker."""
    (Path(folder) / INCOMPLETE).unlink(missing_ok=True)


def same_file(a, b) -> bool:
    """Whether two paths name the same file (after links), whether or not ``b`` exists yet."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)
