"""Coordinates on the image domain and sampling images at arbitrary points.

Convention (shared by the whole library, as in the ICON family):

* An image of shape ``(N_0, ..., N_{d-1})`` covers the unit cube ``[0, 1]^d``.
* Coordinate component ``k`` runs along array axis ``k`` (not reversed as in
  ``torch.nn.functional.grid_sample``), and voxel ``i`` along that axis has its centre at
  ``i / (N_k - 1)``: the first and last voxel centres lie on the faces of the cube.
* The physical size of the domain along axis ``k`` is its extent ``(N_k - 1) * spacing_k``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..validation import check_choice, check_points


def identity_grid(shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """Unit coordinates of every voxel centre.

    Args:
        shape: the grid, ``(H, W)`` or ``(D, H, W)``; each axis at least 2 voxels.
    Returns:
        Tensor of shape ``(*shape, d)``; ``grid[i, j] = (i / (H - 1), j / (W - 1))``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0 or min(shape) < 2:
        raise ValueError(f"shape: expected every axis to have at least 2 voxels, got {shape}")
    axes = [torch.linspace(0.0, 1.0, n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _axis_sizes(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([n - 1 for n in shape], dtype=like.dtype, device=like.device)


def voxel_to_unit(voxels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices (..., d), fractional allowed, to unit coordinates on a grid of ``shape``."""
    return voxels / _axis_sizes(shape, voxels)


def unit_to_voxel(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Unit coordinates (..., d) to fractional voxel indices on a grid of ``shape``."""
    return points * _axis_sizes(shape, points)


def physical_extent(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, ...]:
    """Physical size of the domain along each axis: ``(N_k - 1) * spacing_k``."""
    return tuple((n - 1) * s for n, s in zip(shape, spacing))


def sample(image: torch.Tensor, points: torch.Tensor, *, mode: str = "linear",
           padding: str = "border") -> torch.Tensor:
    """Sample an image at unit coordinates.

    Convention: ``points[..., k]`` runs along array axis ``k`` of the image, voxel centres
    at ``i / (N_k - 1)``.

    Args:
        image: ``(*spatial)`` or ``(C, *spatial)`` with ``d`` spatial axes (``d`` is taken from
            ``points``). ``mode="linear"`` needs a floating image; ``"nearest"`` and ``"label"``
            take any dtype and return that dtype (label maps stay integer).
        points: ``(..., d)`` unit coordinates; differentiable in ``"linear"`` mode.
        mode: ``"linear"`` (bi/trilinear), ``"nearest"``, or ``"label"`` (for label maps: each
            label's indicator interpolated linearly, the most likely label taken).
        padding: ``"border"`` (points outside take the nearest edge value) or ``"zeros"``.
    Returns:
        ``(...)`` or ``(C, ...)``: the image values at ``points``.
    """
    check_choice("mode", mode, ("linear", "nearest", "label"))
    check_choice("padding", padding, ("border", "zeros"))
    ndim = points.shape[-1] if points.ndim else 0
    if ndim not in (2, 3):
        raise ValueError(f"points: expected shape (..., 2) or (..., 3), got {tuple(points.shape)}")
    check_points("points", points, ndim)
    if image.ndim not in (ndim, ndim + 1):
        raise ValueError(f"image: expected {ndim} spatial axes, optionally after one channel axis, "
                         f"got shape {tuple(image.shape)}")
    has_channels = image.ndim == ndim + 1
    spatial = tuple(image.shape[-ndim:])
    if min(spatial) < 1 or image.numel() == 0:
        raise ValueError(f"image: expected a non-empty image, got shape {tuple(image.shape)}")
    batch_shape = points.shape[:-1]
    flat = points.reshape(-1, ndim)
    if mode in ("nearest", "label"):
        pick = _sample_nearest if mode == "nearest" else _sample_label
        values = pick(image if has_channels else image[None], flat, spatial, padding)
    else:
        if not image.is_floating_point():
            raise TypeError(f"image: linear sampling needs a floating image, got {image.dtype}; "
                            "use mode='nearest' for label maps")
        values = _sample_linear(image if has_channels else image[None], flat, padding)
    values = values.reshape(values.shape[0], *batch_shape)
    return values if has_channels else values[0]


def _sample_linear(image: torch.Tensor, flat: torch.Tensor, padding: str) -> torch.Tensor:
    """``(C, *spatial)`` image at ``(N, d)`` points -> ``(C, N)``: a batch of one for :func:`sample_batch`."""
    return sample_batch(image[None], flat[None], padding=padding)[0]


def _sample_nearest(image: torch.Tensor, flat: torch.Tensor, spatial: tuple[int, ...],
                    padding: str) -> torch.Tensor:
    voxels = torch.round(unit_to_voxel(flat.detach(), spatial)).long()
    sizes = torch.tensor(spatial, device=flat.device)
    inside = ((voxels >= 0) & (voxels < sizes)).all(-1)
    voxels = torch.minimum(voxels.clamp_min(0), sizes - 1)
    strides = torch.tensor([math.prod(spatial[k + 1:]) for k in range(len(spatial))],
                           device=flat.device)
    index = (voxels * strides).sum(-1)
    values = image.reshape(image.shape[0], -1)[:, index]
    if padding == "zeros":
        values = torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values


def _sample_label(image: torch.Tensor, flat: torch.Tensor, spatial: tuple[int, ...],
                  padding: str) -> torch.Tensor:
    """Label interpolation: each label's indicator interpolated (bi/trilinearly) at the point, and
    the label with the largest weight wins (ITK's label-image interpolation; ties go to the
    corner met first). Smoother, more faithful boundaries than nearest neighbour, and only
    labels present in the image come out. Exact: at a point, the weight of label ``l`` is the sum
    of the linear weights of the ``2^d`` corner voxels holding ``l``."""
    d = len(spatial)
    position = unit_to_voxel(flat.detach(), spatial)
    sizes = torch.tensor(spatial, device=flat.device)
    inside = ((position >= -0.5) & (position <= sizes - 0.5)).all(-1)
    position = torch.minimum(position.clamp_min(0), (sizes - 1).to(position.dtype))
    low = torch.minimum(position.floor().long(), sizes - 2).clamp_min(0)
    strides = [math.prod(spatial[k + 1:]) for k in range(d)]
    base = low @ torch.tensor(strides, device=flat.device)                            # (N,) flat index
    source = image.reshape(image.shape[0], -1)
    # corner c's bit k (from the most significant) says upper (1) or lower (0) along axis k
    offsets = [sum(strides[k] for k in range(d) if (corner >> (d - 1 - k)) & 1) for corner in range(1 << d)]
    labels = [source.index_select(1, base + offset) for offset in offsets]           # 2^d x (C, N)
    values = labels[0].clone()
    # Where the corners hold different labels (near boundaries: a minority of the voxels), the
    # weight of each corner's label; elsewhere that one label wins outright.
    mixed = labels[1] != labels[0]
    for corner_labels in labels[2:]:
        mixed |= corner_labels != labels[0]                                          # (C, N)
    if bool(mixed.any()):
        channel, point = mixed.nonzero(as_tuple=True)
        corners = torch.stack([corner_labels[channel, point] for corner_labels in labels], -1)   # (M, 2^d)
        fraction = position[point] - low[point]                                       # (M, d)
        corner_weights = [torch.ones_like(fraction[:, 0])]
        for k in range(d):                     # the corners' linear weights, in corner order
            corner_weights = [w * f for w in corner_weights for f in (1.0 - fraction[:, k], fraction[:, k])]
        corner_weights = torch.stack(corner_weights, -1)                              # (M, 2^d)
        same = corners[:, :, None] == corners[:, None, :]                             # (M, 2^d, 2^d)
        total = (same * corner_weights[:, None, :]).sum(-1)                           # (M, 2^d)
        values[channel, point] = torch.gather(corners, -1, total.argmax(-1, keepdim=True))[:, 0]
    if padding == "zeros":
        values = torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values


def sample_batch(images: torch.Tensor, points: torch.Tensor, *, padding: str = "border") -> torch.Tensor:
    """Linear sampling of a batch of images, each at its own points.

    Convention: as :func:`sample` (component ``k`` along array axis ``k``, voxel centres at
    ``i / (N_k - 1)``).

    Args:
        images: ``(B, C, *spatial)`` floating images with ``d`` spatial axes.
        points: ``(B, *S, d)`` unit coordinates, any point layout ``S``; differentiable.
        padding: ``"border"`` or ``"zeros"``.
    Returns:
        ``(B, C, *S)``.
    """
    check_choice("padding", padding, ("border", "zeros"))
    ndim = images.ndim - 2
    if ndim not in (2, 3) or points.shape[-1] != ndim or points.shape[0] != images.shape[0]:
        raise ValueError(f"images and points: expected (B, C, *spatial) with 2 or 3 spatial axes and "
                         f"(B, ..., d) points, got {tuple(images.shape)} and {tuple(points.shape)}")
    batch, layout = points.shape[0], points.shape[1:-1]
    # grid_sample reads grid component 0 along the *last* array axis. Reversing the images'
    # spatial axes (a view) lines that up with our convention, so the points need no flip.
    reversed_axes = (0, 1, *range(images.ndim - 1, 1, -1))
    grid = points.reshape(batch, -1, *([1] * (ndim - 1)), ndim).to(images.dtype) * 2.0 - 1.0
    out = F.grid_sample(images.permute(reversed_axes), grid, mode="bilinear", padding_mode=padding,
                        align_corners=True)
    return out.reshape(batch, images.shape[1], *layout)
