"""Resampling an Image onto another Grid by world coordinates (no registration: the headers'
alignment, what "doing nothing" gives), and onto a coarser grid over the same field of view."""

from __future__ import annotations

import math

import numpy as np
import torch

from .coords import identity_grid, sample
from .filters import gaussian_blur, resample
from .grid import Grid
from .image import Image

_CHUNK = 1 << 18


def resample_to(image: Image, grid: Grid, *, mode: str = "linear", padding: str = "border") -> Image:
    """``image`` on ``grid``: each voxel of ``grid`` takes the value at its world position.

    Args:
        mode: ``"linear"`` (intensities; integer images are sampled as float32) or
            ``"nearest"`` (label maps, dtype kept).
        padding: ``"border"`` (outside the image, its nearest edge value) or ``"zeros"``.
    Returns:
        An Image on ``grid``, numpy or torch as the input.
    """
    if not isinstance(image, Image) or not isinstance(grid, Grid):
        raise TypeError(f"image, grid: expected an Image and a Grid, got {type(image).__name__} and "
                        f"{type(grid).__name__}")
    if image.dim != grid.dim:
        raise ValueError(f"grid: expected a {image.dim}D grid for a {image.dim}D image, got {grid}")
    was_numpy = isinstance(image.data, np.ndarray)
    data = torch.from_numpy(np.ascontiguousarray(image.data)) if was_numpy else image.data
    if mode == "linear" and not data.is_floating_point():
        data = data.to(torch.float32)
    if image.grid.same_as(grid, tolerance=1e-6):
        out = data.clone()
    else:
        matrix = image.grid.world_to_unit_matrix() @ grid.unit_to_world_matrix()
        d = grid.dim
        linear = torch.as_tensor(matrix[:d, :d].T, device=data.device)
        offset = torch.as_tensor(matrix[:d, d], device=data.device)
        points = identity_grid(grid.shape, dtype=torch.float64, device=data.device).reshape(-1, d)
        dtype = data.dtype if data.is_floating_point() else torch.float32
        values = [sample(data, (chunk @ linear + offset).to(dtype), mode=mode, padding=padding)
                  for chunk in points.split(_CHUNK)]
        out = torch.cat(values).reshape(grid.shape)
    return Image(out.numpy() if was_numpy else out, grid)


def coarser_grid(grid: Grid, spacing: float, *, min_factor: float = 1.5) -> Grid:
    """``grid`` with fewer voxels along each axis whose voxels are at least ``min_factor`` times
    finer than ``spacing`` (mm): those axes get the fewest voxels with a spacing of at most
    ``spacing`` over the same field of view. The first and last voxel centres stay where they are
    (same origin, direction and world extent), so the unit cube, and every map in unit
    coordinates, is the same on both grids. ``grid`` itself when no axis qualifies."""
    shape = [n if spacing < min_factor * s else math.ceil((n - 1) * s / spacing - 1e-9) + 1
             for n, s in zip(grid.shape, grid.spacing)]
    if tuple(shape) == tuple(grid.shape):
        return grid
    stretch = np.ones(4)                              # each voxel axis (a column of the affine) stretched
    stretch[:grid.dim] = [(n - 1) / (m - 1) for n, m in zip(grid.shape, shape)]
    return Grid(shape, grid.affine @ np.diag(stretch))


def coarsen(data: torch.Tensor, grid: Grid, coarse: Grid) -> torch.Tensor:
    """An image ``(*grid.shape)`` on :func:`coarser_grid`'s ``coarse``: each coarsened axis
    smoothed first against aliasing (a Gaussian of ``(f - 1) / 2`` voxels for a factor ``f``, as
    scikit-image's rescale does), then resampled linearly over the shared unit cube."""
    if coarse is grid:
        return data
    sigmas = [0.0 if m == n else ((n - 1) / (m - 1) - 1.0) / 2.0 for n, m in zip(grid.shape, coarse.shape)]
    return resample(gaussian_blur(data.float(), sigmas), coarse.shape)
