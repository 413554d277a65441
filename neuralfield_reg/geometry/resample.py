"""Resampling an Image onto another Grid by world coordinates (no registration: the headers'
alignment, what "doing nothing" gives)."""

from __future__ import annotations

import numpy as np
import torch

from .coords import identity_grid, sample
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
