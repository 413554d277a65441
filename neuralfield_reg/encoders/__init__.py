"""Multiresolution hash-grid encodings behind one interface, with selectable backends.

``backend="torch"`` is the pure-PyTorch reference and is always available. ``"native"`` (the
compiled kernels of ``cuda_ext/``, built on first use) and ``"tcnn"`` (tiny-cuda-nn's grid
encoding, CUDA only) raise :class:`BackendUnavailableError` with the reason when they cannot be
used. ``"auto"`` picks ``"native"`` when it builds, else ``"torch"``, and never fails (it warns
once if it had to fall back). It does not pick ``"tcnn"``, which has not been timed against the
native CUDA kernels yet: tcnn runs only when named.
"""

from __future__ import annotations

import warnings

# (the submodule .torch shadows the name `torch` in this package's namespace)
from torch import device as torch_device

from .base import HashGridConfig, HashGridEncoding, GridLayout, grid_layout
from .torch import TorchHashGridEncoding

BACKENDS = ("auto", "torch", "native", "tcnn")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot be used here; the message says why."""


def backend_unavailable_reason(backend: str, device=None) -> str | None:
    """None when ``backend`` can be used on ``device`` (default CPU; for ``"tcnn"``, any device
    when None), else a sentence saying why not."""
    named_device = device
    device = torch_device(device if device is not None else "cpu")
    if backend == "torch":
        return None
    if backend == "native":
        from . import native
        reason = native.native_unavailable_reason()
        if reason is None and device.type == "cuda" and not native.has_cuda_kernels():
            reason = ("the native kernels were built without CUDA (no CUDA toolkit found when they were "
                      "built); install one and clear the torch extensions cache to rebuild")
        return reason
    if backend == "tcnn":
        try:
            import tinycudann  # noqa: F401
        except Exception as error:  # noqa: BLE001 - ImportError, or tinycudann's OSError without a GPU
            return f"tinycudann cannot be imported ({type(error).__name__}: {error}); it is optional and not on PyPI"
        if named_device is not None and device.type != "cuda":
            return f"tiny-cuda-nn runs on CUDA devices only, not {device}; use backend='native' or 'torch'"
        return None
    raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


_fallback_warned = False


def resolve_backend(backend: str = "auto", device=None) -> str:
    """The concrete backend for a request on ``device``.

    ``"auto"`` prefers the compiled kernels (built on first use: about half a minute with ninja, two
    minutes without) and falls back to
    the torch backend with one warning when they are unavailable. A backend named explicitly
    raises :class:`BackendUnavailableError` with the reason instead of falling back.
    """
    global _fallback_warned
    if backend == "auto":
        reason = backend_unavailable_reason("native", device)
        if reason is None:
            return "native"
        if not _fallback_warned:
            warnings.warn(f"backend='auto' uses the torch backend: the native kernels are unavailable: {reason}",
                          RuntimeWarning, stacklevel=2)
            _fallback_warned = True
        return "torch"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def make_encoding(dim: int, config: HashGridConfig = HashGridConfig(), backend: str = "auto",
                  n_tables: int = 1, device=None) -> HashGridEncoding:
    """Build a hash-grid encoding of ``n_tables`` tables for ``dim``-dimensional unit coordinates,
    for use on ``device`` (the module itself is created on the CPU; move it with ``.to``)."""
    name = resolve_backend(backend, device)
    if name == "native":
        from .native import NativeHashGridEncoding
        return NativeHashGridEncoding(dim, config, n_tables)
    if name == "tcnn":
        from .tcnn import TcnnHashGridEncoding
        return TcnnHashGridEncoding(dim, config, n_tables)
    return TorchHashGridEncoding(dim, config, n_tables)


__all__ = ["BACKENDS", "BackendUnavailableError", "GridLayout", "HashGridConfig", "HashGridEncoding",
           "TorchHashGridEncoding", "backend_unavailable_reason", "grid_layout", "make_encoding",
           "resolve_backend"]
