"""The random points of a fit step: similarity voxels of each direction and gradient-ICON points.

Convention: points are unit coordinates of an image's domain (voxel centres at ``i / (N - 1)``);
``index`` holds the same voxels as flat indices in C order of that image's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import FitConfig
from ..geometry.coords import identity_grid


@dataclass(frozen=True)
class Points:
    """Similarity points of one direction: ``points`` ``(B, N, d)`` on a target grid (unit
    coordinates) and their flat voxel indices ``(B, N)``, or None for every voxel in order."""

    points: torch.Tensor
    index: torch.Tensor | None


@dataclass(frozen=True)
class Draw:
    """One step's points: ``B`` on the fixed grid (phi_AB's similarity), ``A`` on the moving grid
    (phi_BA's), and ``penalty`` ``(B, M, d)`` uniform points of the gradient-ICON penalty."""

    B: Points
    A: Points
    penalty: torch.Tensor


def patch_shape(shape, patch_size: int) -> list[int]:
    """The patch grid of :func:`patch_indices`: ``patch_size`` voxels per axis, or the whole axis
    where it is shorter."""
    return [min(patch_size, n) for n in shape]


def patch_indices(shape, n_pairs: int, n_patches: int, patch_size: int, generator: torch.Generator,
                  centres: torch.Tensor | None = None) -> torch.Tensor:
    """Flat voxel indices ``(n_pairs, n_patches * p^d)`` of random cubic patches inside a grid of
    ``shape``: each run of ``p^d`` indices is one patch in C order, ``p = min(patch_size, axis)``
    per axis (so a patch never leaves the grid).

    Args:
        centres: optional flat voxel indices ``(n_pairs, n_patches)``; each patch then contains
            its centre voxel (centred on it, shifted only to stay inside the grid).
    """
    device = generator.device
    patch = patch_shape(shape, patch_size)
    if centres is None:
        corners = torch.stack([torch.randint(n - p + 1, (n_pairs, n_patches), generator=generator, device=device)
                               for n, p in zip(shape, patch)], dim=-1)                  # (B, P, d)
    else:
        voxels = torch.stack(torch.unravel_index(centres, tuple(shape)), dim=-1)
        corners = torch.stack([(voxels[..., a] - p // 2).clamp(0, n - p) for a, (n, p) in enumerate(zip(shape, patch))],
                              dim=-1)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(p, device=device) for p in patch], indexing="ij"),
                          dim=-1).reshape(-1, len(shape))                                # (p^d, d)
    strides = torch.tensor([math.prod(shape[a + 1:]) for a in range(len(shape))], device=device)
    return ((corners[:, :, None, :] + offsets) * strides).sum(-1).reshape(n_pairs, -1)


def padded_nonzero(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of each row's set voxels, ``(B, max count)`` padded with the row's first
    one, and the counts ``(B,)``."""
    counts = masks.sum(1)
    rows, voxels = masks.nonzero(as_tuple=True)        # row by row, each row's voxels in increasing order
    starts = torch.cumsum(counts, 0) - counts
    padded = voxels[starts][:, None].repeat(1, int(counts.max()))      # padded with each row's first voxel
    padded[rows, torch.arange(len(voxels), device=masks.device) - starts[rows]] = voxels
    return padded, counts


class Sampler:
    """Draws each step's points for ``n_pairs`` pairs from one generator.

    Similarity points are all voxels, :attr:`points` random voxels (``config.similarity_points``,
    or ``config.similarity_fraction`` of the compared voxels where that is more), or
    ``config.lncc_patches`` random LNCC patches; with a mask for the target image (key ``"B"``:
    the fixed image, ``"A"``: the moving image), random voxels and patch centres are drawn inside
    it, so the budget goes where the similarity counts (the brain, not the background).
    """

    def __init__(self, config: FitConfig, shapes: dict[str, tuple[int, ...]], masks: dict[str, torch.Tensor | None],
                 n_pairs: int, generator: torch.Generator):
        self.config, self.shapes, self.n_pairs, self.generator = config, shapes, n_pairs, generator
        self.device = generator.device
        self.dim = len(shapes["B"])
        self.grids = {key: identity_grid(shape, device=self.device).reshape(-1, self.dim)
                      for key, shape in shapes.items()}
        self.mask_voxels = {key: None if mask is None else padded_nonzero(mask.reshape(n_pairs, -1))
                            for key, mask in masks.items()}
        self.points = self._point_count()

    def _point_count(self) -> int | None:
        """Random similarity voxels per step and direction (None: every voxel): ``similarity_points``,
        or ``similarity_fraction`` of the most voxels any direction and pair compares (its mask's,
        else its grid's) where that is more; one count for both directions, as the fused
        kernels need."""
        config = self.config
        if config.similarity_points is None or config.similarity_fraction <= 0:
            return config.similarity_points
        compared = max(self.grids[key].shape[0] if self.mask_voxels[key] is None
                       else int(self.mask_voxels[key][1].max()) for key in self.grids)
        return max(config.similarity_points, math.ceil(config.similarity_fraction * compared))

    def count(self, key: str) -> int:
        """Similarity points per pair of direction ``key`` (the same at every step)."""
        config, voxels = self.config, self.grids[key].shape[0]
        if config.similarity == "lncc":
            if config.lncc_patches is None:
                return voxels
            return config.lncc_patches * math.prod(patch_shape(self.shapes[key], config.lncc_patch_size))
        if self.points is None or self.points >= voxels:
            return voxels
        return self.points

    def draw(self) -> Draw:
        """The next step's points (fixed grid, moving grid, then the penalty's, in that order)."""
        B, A = self._similarity("B"), self._similarity("A")
        penalty = torch.rand(self.n_pairs, self.config.gradient_icon_points, self.dim, generator=self.generator,
                             device=self.device)
        return Draw(B=B, A=A, penalty=penalty)

    def at_points(self, values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """``(B, N)``: ``(B, ...)`` per-voxel values at the flat voxel indices (all when None)."""
        flat = values.reshape(self.n_pairs, -1)
        return flat if index is None else torch.gather(flat, 1, index)

    def _at_voxels(self, key: str, index: torch.Tensor) -> torch.Tensor:
        grid = self.grids[key]                     # grid[index], without advanced indexing's cost
        return grid.index_select(0, index.reshape(-1)).reshape(*index.shape, grid.shape[1])

    def _in_mask(self, key: str, count: int) -> torch.Tensor:
        voxels, counts = self.mask_voxels[key]
        draw = torch.rand(self.n_pairs, count, generator=self.generator, device=self.device)
        return torch.gather(voxels, 1, (draw * counts[:, None]).long().clamp_max(voxels.shape[1] - 1))

    def _similarity(self, key: str) -> Points:
        config, grid = self.config, self.grids[key]
        whole = Points(grid.expand(self.n_pairs, *grid.shape), None)
        if config.similarity == "lncc":
            if config.lncc_patches is None:
                return whole                       # whole images (neighbourhoods)
            centres = None if self.mask_voxels[key] is None else self._in_mask(key, config.lncc_patches)
            index = patch_indices(self.shapes[key], self.n_pairs, config.lncc_patches, config.lncc_patch_size,
                                  self.generator, centres)
            return Points(self._at_voxels(key, index), index)
        if self.points is None or self.points >= grid.shape[0]:
            return whole
        if self.mask_voxels[key] is not None:
            index = self._in_mask(key, self.points)
        else:
            index = torch.randint(grid.shape[0], (self.n_pairs, self.points), generator=self.generator,
                                  device=self.device)
        # In voxel order, consecutive points read nearby hash-table rows (the fused CPU kernels
        # run about 10 % faster than on scattered points); the order does not change the mean.
        # (numpy's sort of a few thousand indices is ~2x faster than torch's on the CPU.)
        if index.device.type == "cpu":
            index = torch.from_numpy(np.sort(index.numpy(), axis=1))
        return Points(self._at_voxels(key, index), index)
