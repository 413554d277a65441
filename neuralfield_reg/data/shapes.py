"""Synthetic 2D triangles and circles, solid or hollow: the ICON benchmark family.

Each image holds one shape: an equilateral triangle or a circle with centre ~ U[0.4, 0.7]^2,
radius (circumradius for triangles) ~ U[0.2, 0.4] and a random rotation, drawn as
``tanh(-40 * d)`` of a signed distance-like function ``d`` (negative inside; for the triangle
the radial distance to its boundary). Solid images are ``(1 + tanh) / 2``, hollow ones
``1 - tanh^2`` (a bright outline); both lie in [0, 1]. The label map is the filled shape.
Coordinates follow the library convention (unit cube, axis 0 first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

SHARPNESS = 40.0


@dataclass(frozen=True)
class Shape:
    kind: str            # "triangle" or "circle"
    center: tuple[float, float]
    radius: float
    angle: float         # radians

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Shape":
        return cls(kind="triangle" if rng.random() < 0.5 else "circle",
                   center=tuple(rng.uniform(0.4, 0.7, size=2)),
                   radius=float(rng.uniform(0.2, 0.4)),
                   angle=float(rng.uniform(0.0, 2.0 * np.pi)))

    def signed_distance(self, size: int) -> np.ndarray:
        x, y = np.meshgrid(np.linspace(0.0, 1.0, size), np.linspace(0.0, 1.0, size), indexing="ij")
        dx, dy = x - self.center[0], y - self.center[1]
        distance = np.sqrt(dx * dx + dy * dy)
        if self.kind == "circle":
            return distance - self.radius
        # Boundary radius of an equilateral triangle (circumradius R, inradius R/2) at polar angle a.
        sector = np.mod(np.arctan2(dx, dy) + self.angle, 2.0 * np.pi / 3.0) - np.pi / 3.0
        return distance - self.radius * np.cos(np.pi / 3.0) / np.cos(sector)

    def render(self, size: int, hollow: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(size, size)`` float32 in [0, 1] and its filled-shape label map (uint8)."""
        distance = self.signed_distance(size)
        profile = np.tanh(-SHARPNESS * distance)
        image = 1.0 - profile ** 2 if hollow else 0.5 * (1.0 + profile)
        return image.astype(np.float32), (distance < 0).astype(np.uint8)


@dataclass(frozen=True)
class ShapePair:
    moving: np.ndarray
    fixed: np.ndarray
    moving_labels: np.ndarray
    fixed_labels: np.ndarray


def shape_pair(rng: np.random.Generator, size: int = 128, hollow: bool = True) -> ShapePair:
    """One pair of independent random shapes."""
    moving, moving_labels = Shape.random(rng).render(size, hollow)
    fixed, fixed_labels = Shape.random(rng).render(size, hollow)
    return ShapePair(moving, fixed, moving_labels, fixed_labels)


def shape_pairs(n: int, size: int = 128, hollow: bool = True, seed: int = 0) -> list[ShapePair]:
    """``n`` reproducible random pairs (same ``seed`` -> same pairs)."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n!r}")
    rng = np.random.default_rng(seed)
    return [shape_pair(rng, size, hollow) for _ in range(n)]


class ShapePairDataset(Dataset):
    """``n`` random pairs rendered once, as a torch ``Dataset`` of ``(moving, fixed)`` tensors.

    Items are ``(size, size)`` float32 images in [0, 1] (from :meth:`from_pairs`: any common
    shape); :attr:`moving_labels` and :attr:`fixed_labels` (``(n, *shape)`` uint8) hold the label
    maps for scoring.
    """

    def __init__(self, n: int, size: int = 64, hollow: bool = True, seed: int = 0, *, pairs=None):
        if pairs is None:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"n: expected at least one pair, got {n!r}")
            pairs = shape_pairs(n, size, hollow, seed)
        self.moving = torch.from_numpy(np.stack([p.moving for p in pairs]))
        self.fixed = torch.from_numpy(np.stack([p.fixed for p in pairs]))
        self.moving_labels = np.stack([p.moving_labels for p in pairs])
        self.fixed_labels = np.stack([p.fixed_labels for p in pairs])

    @classmethod
    def from_pairs(cls, pairs: list[ShapePair]) -> "ShapePairDataset":
        """A dataset of given pairs (2D or 3D, all on one grid), e.g. ``data.shapes3d.body_pairs``."""
        if len(pairs) == 0:
            raise ValueError("pairs: expected at least one pair")
        return cls(len(pairs), pairs=pairs)

    def __len__(self) -> int:
        return self.moving.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moving[index], self.fixed[index]
