"""Grid: the shape of an image and where its voxels lie in the world.

Three coordinate spaces, named in every docstring that touches coordinates:

* **voxel**: fractional array indices ``(..., d)``, component ``k`` along array axis ``k``;
* **unit**: the library's maps live on the unit cube, ``unit = voxel / (N - 1)`` per axis (voxel
  centres at ``i / (N_k - 1)``, the ICON convention);
* **world**: millimetres in the scanner's frame, RAS+ as in NIfTI (x grows towards the
  patient's right, y towards anterior, z towards superior). ITK and ANTs speak LPS+ (x and y
  negated); :mod:`neuralfield_reg.transforms.itk` converts when it reads and writes.

A grid stores the NIfTI-style 4x4 voxel-to-world matrix for 2D and 3D images alike (a 2D image
is voxel ``(i, j, 0)`` of it), so a header read from a file is written back unchanged. The world
of a 2D grid is the first two world axes, as ITK reads 2D images; its slice must therefore lie
in the world's x-y plane.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _matrix_4x4(name: str, affine, dim: int) -> np.ndarray:
    """A 4x4 voxel-to-world matrix from a 4x4 or, for 2D, a 3x3 one; checked."""
    try:
        matrix = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a 4x4 voxel-to-world matrix, got {type(affine).__name__}") from error
    if dim == 2 and matrix.shape == (3, 3):
        embedded = np.eye(4)
        embedded[np.ix_([0, 1, 3], [0, 1, 3])] = matrix
        matrix = embedded
    if matrix.shape != (4, 4):
        expected = "4x4 (or 3x3 for a 2D image)" if dim == 2 else "4x4"
        raise ValueError(f"{name}: expected a {expected} voxel-to-world matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name}: the voxel-to-world matrix contains NaN or Inf:\n{matrix}")
    columns = matrix[:3, :dim]
    norms = np.linalg.norm(columns, axis=0)
    if not (norms > 0).all():
        raise ValueError(f"{name}: the voxel-to-world matrix gives a zero voxel size along axis "
                         f"{int(np.argmin(norms))} (a zero column):\n{matrix}")
    singular = np.linalg.svd(columns / norms, compute_uv=False)
    if singular.min() < 1e-6 or (dim == 3 and abs(np.linalg.det(matrix[:3, :3])) < 1e-12 * norms.prod()):
        raise ValueError(f"{name}: the voxel-to-world matrix is singular (its axes are not independent):\n{matrix}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name}: the last row of the voxel-to-world matrix must be (0, 0, 0, 1), got {matrix[3]}")
    if dim == 2:
        if np.abs(matrix[2, :2]).max() > 1e-6 * norms.max():
            raise ValueError(f"{name}: a 2D image must lie in the world's x-y plane (an axial slice, as ITK "
                             f"reads 2D images); this slice's axes have z components {matrix[2, :2]}")
        if abs(np.linalg.det(matrix[:2, :2])) < 1e-6 * norms.prod():
            raise ValueError(f"{name}: the 2D voxel-to-world matrix is singular in the x-y plane:\n{matrix}")
    return matrix


def _apply(matrix: np.ndarray, points):
    """Homogeneous ``(d+1, d+1)`` matrix applied to ``(..., d)`` points (numpy or torch)."""
    d = matrix.shape[0] - 1
    if isinstance(points, torch.Tensor):
        m = torch.as_tensor(matrix, dtype=points.dtype if points.is_floating_point() else torch.float64,
                            device=points.device)
        return points.to(m.dtype) @ m[:d, :d].T + m[:d, d]
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:d, :d].T + matrix[:d, d]


class Grid:
    """An image grid: ``shape`` (2 or 3 axes, each at least 2 voxels) and a 4x4 voxel-to-world
    matrix ``affine`` (RAS+ millimetres, NIfTI's convention; see the module docstring).

    Args:
        shape: voxels per axis.
        affine: 4x4 (or, in 2D, 3x3) voxel-to-world matrix; default ``diag(1, ..., 1)``, i.e.
            1 mm voxels with voxel 0 at the world origin. Use :meth:`from_spacing` for spacing,
            origin and direction cosines.
        name: what error messages call this grid (an argument or a file name).
    Raises:
        ValueError: an axis under 2 voxels, or an affine that is not finite, singular (zero or
            linearly dependent axes), or (2D) out of the x-y plane.
    """

    __slots__ = ("shape", "affine")

    def __init__(self, shape: Sequence[int], affine=None, *, name: str = "grid"):
        try:
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}: expected a shape of 2 or 3 integers, got {shape!r}") from error
        if len(shape) not in (2, 3):
            raise ValueError(f"{name}: expected a 2D or 3D grid, got shape {shape}")
        if min(shape) < 2:
            raise ValueError(f"{name}: every axis needs at least 2 voxels, got shape {shape}")
        self.shape = shape
        self.affine = _matrix_4x4(name, np.eye(4) if affine is None else affine, len(shape))
        self.affine.flags.writeable = False

    @classmethod
    def from_spacing(cls, shape: Sequence[int], spacing=None, *, origin=None, direction=None,
                     name: str = "grid") -> "Grid":
        """A grid from voxel sizes (mm), the world position of voxel 0 (mm) and direction cosines
        (``(d, d)``, column ``k`` the world direction of array axis ``k``); defaults 1, 0, identity."""
        dim = len(tuple(shape))
        spacing = np.ones(dim) if spacing is None else np.broadcast_to(np.asarray(spacing, np.float64), (dim,))
        direction = np.eye(dim) if direction is None else np.asarray(direction, dtype=np.float64)
        origin = np.zeros(dim) if origin is None else np.asarray(origin, dtype=np.float64)
        if direction.shape != (dim, dim) or origin.shape != (dim,):
            raise ValueError(f"{name}: expected a ({dim}, {dim}) direction and {dim} origin values, got "
                             f"{direction.shape} and {origin.shape}")
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise ValueError(f"{name}: every spacing must be positive and finite, got {tuple(spacing)}")
        matrix = np.eye(dim + 1)
        matrix[:dim, :dim] = direction * spacing
        matrix[:dim, dim] = origin
        return cls(shape, matrix, name=name)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def world_matrix(self) -> np.ndarray:
        """``(d+1, d+1)`` voxel -> world (the 4x4 itself in 3D; its x-y part in 2D)."""
        if self.dim == 3:
            return np.array(self.affine)
        return np.array(self.affine[np.ix_([0, 1, 3], [0, 1, 3])])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel sizes (mm) along the array axes: the lengths of the matrix's columns."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :self.dim], axis=0))

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of voxel 0, ``(d,)``."""
        return self.world_matrix[:self.dim, self.dim]

    @property
    def direction(self) -> np.ndarray:
        """``(d, d)`` direction cosines: column ``k`` is the world direction of array axis ``k``."""
        return self.world_matrix[:self.dim, :self.dim] / np.asarray(self.spacing)

    @property
    def extent(self) -> tuple[float, ...]:
        """Physical size (mm) between the first and last voxel centres per axis: ``(N - 1) * spacing``."""
        return tuple((n - 1) * s for n, s in zip(self.shape, self.spacing))

    @property
    def center(self) -> np.ndarray:
        """World position (mm) of the grid's centre (the centre of the unit cube), ``(d,)``."""
        return self.unit_to_world(np.full(self.dim, 0.5))

    def unit_to_world_matrix(self) -> np.ndarray:
        """``(d+1, d+1)`` homogeneous matrix from unit coordinates to world (mm)."""
        return self.world_matrix @ np.diag([*(n - 1.0 for n in self.shape), 1.0])

    def world_to_unit_matrix(self) -> np.ndarray:
        """``(d+1, d+1)`` homogeneous matrix from world (mm) to unit coordinates."""
        return np.linalg.inv(self.unit_to_world_matrix())

    # -- points ---------------------------------------------------------------------------------
    def voxel_to_world(self, points):
        """Voxel ``(..., d)`` -> world mm ``(..., d)`` (numpy or torch, as given)."""
        return _apply(self.world_matrix, points)

    def world_to_voxel(self, points):
        """World mm ``(..., d)`` -> fractional voxel indices ``(..., d)``."""
        return _apply(np.linalg.inv(self.world_matrix), points)

    def unit_to_world(self, points):
        """Unit coordinates ``(..., d)`` -> world mm ``(..., d)``."""
        return _apply(self.unit_to_world_matrix(), points)

    def world_to_unit(self, points):
        """World mm ``(..., d)`` -> unit coordinates ``(..., d)``."""
        return _apply(self.world_to_unit_matrix(), points)

    def world_points(self, max_per_axis: int | None = None) -> np.ndarray:
        """World positions (mm) of the voxel centres, ``(*shape, d)``; with ``max_per_axis``, of
        an evenly spaced subset of at most that many voxels per axis (``(*subset, d)``)."""
        axes = [np.arange(n, dtype=np.float64) if max_per_axis is None or n <= max_per_axis
                else np.linspace(0.0, n - 1.0, max_per_axis) for n in self.shape]
        voxels = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        return self.voxel_to_world(voxels)

    def contains(self, world_points, margin: float = 0.0) -> np.ndarray:
        """Whether world points ``(..., d)`` lie inside the box of voxel centres (unit cube),
        widened by ``margin`` voxels on every side."""
        voxels = self.world_to_voxel(np.asarray(world_points, dtype=np.float64))
        upper = np.asarray(self.shape, dtype=np.float64) - 1.0
        return ((voxels >= -margin) & (voxels <= upper + margin)).all(-1)

    def overlap(self, other: "Grid") -> float:
        """Share of this grid's volume (sampled at up to 32 voxels per axis) that lies inside
        ``other``'s box, by world coordinates: 1 when ``other`` covers it, 0 when they are apart."""
        return float(other.contains(self.world_points(32), margin=0.5).mean())

    # -- comparison and files -------------------------------------------------------------------
    def same_as(self, other: "Grid", tolerance: float = 1e-3) -> bool:
        """Same shape and the same voxel-to-world matrix, up to ``tolerance`` voxels anywhere on
        the grid (a header rounded to float32 is still the same grid)."""
        if not isinstance(other, Grid) or other.shape != self.shape:
            return False
        corners = np.stack(np.meshgrid(*[[0.0, n - 1.0] for n in self.shape], indexing="ij"), -1).reshape(-1, self.dim)
        moved = other.world_to_voxel(self.voxel_to_world(corners))
        return bool(np.abs(moved - corners).max() <= tolerance)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_dict(cls, values: dict, *, name: str = "grid") -> "Grid":
        return cls(values["shape"], values["affine"], name=name)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:g}" for o in self.origin)
        return f"Grid(shape={self.shape}, spacing=({spacing}) mm, origin=({origin}) mm, {orientation_code(self)})"


def orientation_code(grid: Grid) -> str:
    """Where each array axis points, as NIfTI/ITK orientation letters of its nearest world axis
    (e.g. ``"RAS"`` when axes 0, 1, 2 run towards Right, Anterior, Superior; ``"LAS"`` for an x
    flip; 2D: two letters)."""
    letters = (("L", "R"), ("P", "A"), ("I", "S"))
    code = ""
    for k in range(grid.dim):
        column = grid.affine[:3, k]
        axis = int(np.argmax(np.abs(column)))
        code += letters[axis][int(column[axis] > 0)]
    return code


def rotation_matrix(angles_degrees: Sequence[float]) -> np.ndarray:
    """``(3, 3)`` rotation by angles (degrees) about x, then y, then z (world axes); 2D: one
    angle gives ``(2, 2)``."""
    angles = [math.radians(a) for a in angles_degrees]
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    return rotation
