"""Maps given by dense displacement grids, the output of convolutional registration networks.

Convention: a displacement grid ``u`` of shape ``(B, d, *shape)`` holds, at voxel ``i`` of a
grid covering the unit cube, a displacement in unit coordinates (component ``k`` along array
axis ``k``). It defines the map ``x -> x + u(x)`` at *any* point ``x`` by linear interpolation
(constant continuation outside the cube). A :class:`GridMap` is a chain of such maps,
``phi = phi_n o ... o phi_1`` (``phi_1`` is applied first), so composing two grid maps is
exact: no resampling of one grid onto the other.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..geometry.coords import sample_batch


class GridMap:
    """A batched map ``(B, *S, d) -> (B, *S, d)``: displacement grids applied in order.

    Args:
        displacements: ``(B, d, *shape_i)`` grids; ``displacements[0]`` is applied first. Each
            may have its own resolution (a coarse network's output composes with a fine one's).
    """

    def __init__(self, displacements: Sequence[torch.Tensor]):
        if len(displacements) == 0:
            raise ValueError("displacements: expected at least one displacement grid")
        self.displacements = list(displacements)
        self.dim = self.displacements[0].shape[1]
        for k, grid in enumerate(self.displacements):
            if grid.ndim != self.dim + 2 or grid.shape[1] != self.dim:
                raise ValueError(f"displacements[{k}]: expected shape (B, {self.dim}, *spatial) with "
                                 f"{self.dim} spatial axes, got {tuple(grid.shape)}")

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        for grid in self.displacements:
            points = points + sample_batch(grid, points).movedim(1, -1)
        return points

    def compose(self, inner: "GridMap") -> "GridMap":
        """``self o inner``: ``inner`` is applied first."""
        return GridMap(inner.displacements + self.displacements)

    def split(self, size: int) -> list["GridMap"]:
        """Cut the batch into maps of ``size`` pairs each (``torch.split`` along the batch)."""
        pieces = [grid.split(size) for grid in self.displacements]
        return [GridMap(list(grids)) for grids in zip(*pieces)]

    def swap_halves(self) -> "GridMap":
        """For a batch ``[phi_AB; phi_BA]`` (two halves), the batch ``[phi_BA; phi_AB]``."""
        half = self.displacements[0].shape[0] // 2
        return GridMap([torch.cat([grid[half:], grid[:half]]) for grid in self.displacements])


class GridMapPair(nn.Module):
    """The forward and inverse maps of one registered pair as grid chains (unbatched).

    ``phi_AB`` and ``phi_BA`` take ``(N, d)`` unit coordinates, like the neural-field maps of
    :class:`neuralfield_reg.transforms.fields.MapPair`, so :class:`~neuralfield_reg.RegistrationResult`
    serves both. The grids are buffers named ``AB_0, AB_1, ...`` and ``BA_0, ...``.
    """

    def __init__(self, displacements_AB: Sequence[torch.Tensor], displacements_BA: Sequence[torch.Tensor]):
        super().__init__()
        self.n_AB, self.n_BA = len(displacements_AB), len(displacements_BA)
        for name, grids in (("AB", displacements_AB), ("BA", displacements_BA)):
            for k, grid in enumerate(grids):
                self.register_buffer(f"{name}_{k}", grid.detach().clone())
        for grids in (displacements_AB, displacements_BA):
            GridMap([grid[None] for grid in grids])          # checks the shapes
        self.dim = int(displacements_AB[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.AB_0.device

    def grids(self, direction: str) -> list[torch.Tensor]:
        count = self.n_AB if direction == "AB" else self.n_BA
        return [getattr(self, f"{direction}_{k}") for k in range(count)]

    def shapes(self, direction: str) -> list[list[int]]:
        return [list(grid.shape[1:]) for grid in self.grids(direction)]

    def phi_AB(self, points: torch.Tensor) -> torch.Tensor:
        return GridMap([g[None] for g in self.grids("AB")])(points[None])[0]

    def phi_BA(self, points: torch.Tensor) -> torch.Tensor:
        return GridMap([g[None] for g in self.grids("BA")])(points[None])[0]

    def forward(self, points_AB: torch.Tensor, points_BA: torch.Tensor, level_weights=None):
        return self.phi_AB(points_AB), self.phi_BA(points_BA)

    @classmethod
    def empty(cls, dim: int, shapes_AB: Sequence[Sequence[int]], shapes_BA: Sequence[Sequence[int]]):
        """Zero grids of the given shapes (to load a saved state into)."""
        return cls([torch.zeros(dim, *s) for s in shapes_AB], [torch.zeros(dim, *s) for s in shapes_BA])
