"""Image: an array and its Grid, kept together from reading a file to writing one."""

from __future__ import annotations

import numpy as np
import torch

from .grid import Grid


class Image:
    """A 2D or 3D array (numpy or torch, kept as given) on a :class:`Grid`.

    Args:
        data: ``(H, W)`` or ``(D, H, W)`` array or tensor, array axis ``k`` along grid axis ``k``.
        grid: its grid (``grid.shape == data.shape``); or give ``affine`` (4x4 voxel-to-world,
            RAS+ mm) or ``spacing`` (voxel sizes in mm, voxel 0 at the world origin) instead.
        name: what error messages call the image (an argument or a file name).
    """

    __slots__ = ("data", "grid")

    def __init__(self, data, grid: Grid | None = None, *, affine=None, spacing=None, name: str = "image"):
        if not isinstance(data, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(data).__name__}")
        if data.ndim not in (2, 3):
            raise ValueError(f"{name}: expected a 2D or 3D image, got shape {tuple(data.shape)}")
        given = [k for k, v in (("grid", grid), ("affine", affine), ("spacing", spacing)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{name}: give one of grid, affine and spacing, got {' and '.join(given)}")
        shape = tuple(data.shape)
        if grid is None:
            grid = Grid(shape, affine, name=name) if spacing is None else \
                Grid.from_spacing(shape, spacing, name=name)
        elif not isinstance(grid, Grid):
            raise TypeError(f"{name}: grid must be a Grid, got {type(grid).__name__}")
        elif grid.shape != shape:
            raise ValueError(f"{name}: the array's shape {shape} is not its grid's {grid.shape}")
        self.data = data
        self.grid = grid

    @property
    def shape(self) -> tuple[int, ...]:
        return self.grid.shape

    @property
    def dim(self) -> int:
        return self.grid.dim

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world matrix (RAS+ mm)."""
        return self.grid.affine

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.grid.spacing

    def numpy(self) -> np.ndarray:
        data = self.data
        return data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data

    def with_data(self, data) -> "Image":
        """Another array on the same grid."""
        return Image(data, self.grid)

    def __repr__(self) -> str:
        return f"Image({type(self.data).__name__} {self.data.dtype}, {self.grid!r})"
