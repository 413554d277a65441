"""Input checks shared by the public entry points.

Every public function checks its inputs once, at the entry, and raises ``ValueError`` or
``TypeError`` with a message that names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

def describe(value) -> str:
    """A short description of a value for error messages: type, shape and dtype."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def as_tensor(name: str, value, *, device=None) -> tuple[torch.Tensor, bool]:
    """Turn a numpy array or tensor into a tensor; return it and whether the input was numpy."""
    if isinstance(value, torch.Tensor):
        tensor = value if device is None else value.to(device)
        return tensor, False
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got an array of Python objects")
        if value.dtype.fields:
            raise TypeError(f"{name}: expected an array of numbers, one per voxel, got several channels per voxel "
                            f"(e.g. RGB: dtype {value.dtype}); convert it to one channel (a grey-level image) first")
        if value.dtype.kind not in "biufc":
            raise TypeError(f"{name}: expected an array of numbers, got dtype {value.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return (tensor if device is None else tensor.to(device)), True
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {describe(value)}")


def check_image(name: str, value, *, dims: Sequence[int] = (2, 3), device=None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """Check an image of shape (H, W) or (D, H, W) and return it as a floating tensor.

    Integer and boolean images are converted to ``dtype``; complex images, wrong ndim,
    axes shorter than 2 voxels and NaN/Inf raise.
    """
    tensor, was_numpy = as_tensor(name, value, device=device)
    check_image_shape(name, tensor, dims, value)
    if tensor.is_complex():
        raise TypeError(f"{name}: expected a real-valued image, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(dtype)
    elif tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(dtype)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: the image contains NaN or Inf values ({bad} of {tensor.numel()} voxels); "
                         "replace them first (e.g. NaN background with 0: numpy.nan_to_num)")
    return tensor, was_numpy


def check_mask(name: str, tensor: torch.Tensor, value=None) -> torch.Tensor:
    """A mask's values: boolean, or 0/1 in any real dtype (a value such as 0.5 or 255 is
    refused rather than read as "inside"); returns it as a boolean tensor, refused when empty."""
    value = tensor if value is None else value
    if tensor.is_complex() or (tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())):
        raise ValueError(f"{name}: expected a boolean or 0/1 mask, got {describe(value)}")
    if tensor.dtype != torch.bool:
        other = tensor[(tensor != 0) & (tensor != 1)]
        if other.numel():
            values = sorted(set(other[:1000].tolist()))
            hint = " (a mask of 0 and one other value: write it as 0/1, e.g. mask > 0)" if len(values) == 1 else ""
            raise ValueError(f"{name}: expected a boolean or 0/1 mask, got values such as {values[:3]}{hint}")
    tensor = tensor != 0
    if not bool(tensor.any()):
        raise ValueError(f"{name}: the mask is empty; nothing would be compared")
    return tensor


def check_image_shape(name: str, tensor, dims: Sequence[int] = (2, 3), value=None) -> None:
    """The shape checks of :func:`check_image`: ``dims`` axes, not empty, every axis >= 2 voxels."""
    value = tensor if value is None else value
    if tensor.ndim not in dims:
        expected = " or ".join(f"{d}D" for d in dims)
        raise ValueError(
            f"{name}: expected a {expected} image (H, W) or (D, H, W) with no channel or batch "
            f"axis, got {describe(value)}")
    if math.prod(tensor.shape) == 0:
        raise ValueError(f"{name}: the image is empty ({describe(value)})")
    if min(tensor.shape) < 2:
        raise ValueError(f"{name}: every axis needs at least 2 voxels, got shape {tuple(tensor.shape)}")


def check_spacing(name: str, spacing, ndim: int) -> tuple[float, ...]:
    """Check a voxel spacing: None (1 per axis), one positive number, or one per axis."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = (float(spacing),) * ndim
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError as error:
        raise TypeError(f"{name}: expected None, a number or {ndim} numbers, got {spacing!r}") from error
    if len(values) != ndim:
        raise ValueError(f"{name}: expected {ndim} values (one per axis), got {len(values)}: {spacing!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name}: every spacing must be positive and finite, got {spacing!r}")
    return values


def check_points(name: str, points: torch.Tensor, ndim: int) -> None:
    """Check coordinates of shape (..., ndim)."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor of shape (..., {ndim}), got {describe(points)}")
    if points.ndim < 1 or points.shape[-1] != ndim:
        raise ValueError(f"{name}: expected shape (..., {ndim}), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"{name}: expected floating coordinates, got dtype {points.dtype}")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def to_output(tensor: torch.Tensor, as_numpy: bool):
    """Return a tensor as the kind that came in (numpy in, numpy out)."""
    return tensor.detach().cpu().numpy() if as_numpy else tensor


_KIND_TEXT = {"int": "an integer", "number": "a number", "bool": "True or False", "str": "a string",
              "ints": "a sequence of integers", "numbers": "a sequence of numbers"}


def _of_kind(value, kind: str) -> bool:
    import numbers
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (tuple, list)) and all(_of_kind(v, kind[:-1]) for v in value)


def check_fields(owner, kinds: dict[str, str], *, owner_name: str | None = None) -> None:
    """Check the types of a frozen config dataclass's fields before their values are checked.

    ``kinds`` maps a field to ``"int"``, ``"number"``, ``"bool"``, ``"str"``, ``"ints"`` or
    ``"numbers"`` (sequences, stored as tuples), with a trailing ``"?"`` when None is allowed.
    Raises ``TypeError`` naming ``Owner.field`` (``True`` is not an integer, ``2.5`` is not a
    width, ``"fast"`` is not a learning rate); ``owner_name`` replaces the class's name there.
    """
    name = owner_name or type(owner).__name__
    for field, kind in kinds.items():
        value = getattr(owner, field)
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        if not _of_kind(value, kind):
            expected = _KIND_TEXT[kind] + (" or None" if optional else "")
            raise TypeError(f"{name}.{field}: expected {expected}, got {value!r}")
        if kind in ("ints", "numbers"):
            object.__setattr__(owner, field, tuple(value))
        elif kind == "int":
            object.__setattr__(owner, field, int(value))
        elif kind == "number":
            object.__setattr__(owner, field, float(value))
