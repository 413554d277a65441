"""Multiresolution hash-grid encodings behind one interface, with selectable backends.

``backend="torch"`` is the pure-PyTorch reference and is always available. ``"native"`` (the
compiled kernels of ``cuda_ext/``) and ``"tcnn"`` (tiny-cuda-nn) raise
:class:`BackendUnavailableError` with the reason when they cannot be used; ``"auto"`` picks the
fastest backend that is available on the device and never fails.
"""

from __future__ import annotations

from .base import HashGridConfig, HashGridEncoding, GridLayout, grid_layout
from .torch import TorchHashGridEncoding

BACKENDS = ("auto", "torch", "native", "tcnn")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot be used here; the message says why."""


def backend_unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can be used, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "native":
        return ("the compiled hash-grid kernels (cuda_ext/) are not part of this version yet; "
                "use backend='torch' or 'auto'")
    if backend == "tcnn":
        try:
            import tinycudann  # noqa: F401
        except ImportError as error:
            return f"tinycudann is not installed ({error}); it is optional and not on PyPI"
        return "the tinycudann backend is not wired in this version yet; use backend='torch' or 'auto'"
    raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend name for a request; raises if a named backend is unavailable."""
    if backend == "auto":
        return "torch"
    reason = backend_unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def make_encoding(dim: int, config: HashGridConfig = HashGridConfig(), backend: str = "auto",
                  n_tables: int = 1) -> HashGridEncoding:
    """Build a hash-grid encoding of ``n_tables`` tables for ``dim``-dimensional unit coordinates."""
    name = resolve_backend(backend)
    return {"torch": TorchHashGridEncoding}[name](dim, config, n_tables)


__all__ = ["BACKENDS", "BackendUnavailableError", "GridLayout", "HashGridConfig", "HashGridEncoding",
           "TorchHashGridEncoding", "backend_unavailable_reason", "grid_layout", "make_encoding",
           "resolve_backend"]
