"""Affine maps between two grids in three forms, and the registration's starting point.

* **world**: ``(d+1, d+1)`` homogeneous ``G`` taking fixed-image world points (RAS+ mm) to moving-
  image world points, ``p_moving = G p_fixed`` (the direction ITK and ANTs transforms go);
* **unit**: ``(matrix, offset)`` of ``phi_AB`` on the unit cubes, ``x_moving = matrix x_fixed + offset``;
* **local**: ``(linear, translation)`` between each image's *centred physical frame*
  ``P = diag(extent) (x - 1/2)``: millimetres along the array axes from the grid's centre, the
  frame the affine stage optimises in (``P_moving = linear P_fixed + translation``).

A grid's world point is ``p = D P + c`` with ``D`` its direction cosines and ``c`` its centre, so
``linear = D_A^-1 G D_B`` and flips or permutations of the array axes between the two images
(RAS against LAS storage, say) become part of ``linear``. The affine stage refines ``linear``
continuously from such a start and bounds its singular values away from 0, so its determinant
keeps the start's sign: a proper world transform never turns into a reflection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geometry import Grid

INIT_NAMES = ("world", "centers", "moments")


def frame(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(D, c)`` with world ``p = D @ P + c`` for centred physical coordinates ``P`` (mm)."""
    return grid.direction, grid.center


def world_to_local(world: np.ndarray, moving: Grid, fixed: Grid) -> tuple[np.ndarray, np.ndarray]:
    """World ``G`` (fixed -> moving, homogeneous) to local ``(linear, translation)``."""
    d = fixed.dim
    G, g = world[:d, :d], world[:d, d]
    D_A, c_A = frame(moving)
    D_B, c_B = frame(fixed)
    inverse = np.linalg.inv(D_A)
    return inverse @ G @ D_B, inverse @ (G @ c_B + g - c_A)


def local_to_world(linear: np.ndarray, translation: np.ndarray, moving: Grid, fixed: Grid) -> np.ndarray:
    """Local ``(linear, translation)`` to the homogeneous world ``G`` (fixed -> moving)."""
    d = fixed.dim
    D_A, c_A = frame(moving)
    D_B, c_B = frame(fixed)
    G = D_A @ linear @ np.linalg.inv(D_B)
    out = np.eye(d + 1)
    out[:d, :d] = G
    out[:d, d] = D_A @ translation + c_A - G @ c_B
    return out


def unit_to_world(matrix: np.ndarray, offset: np.ndarray, moving: Grid, fixed: Grid) -> np.ndarray:
    """Unit ``(matrix, offset)`` of ``phi_AB`` to the homogeneous world ``G`` (fixed -> moving)."""
    d = fixed.dim
    unit = np.eye(d + 1)
    unit[:d, :d], unit[:d, d] = matrix, offset
    return moving.unit_to_world_matrix() @ unit @ fixed.world_to_unit_matrix()


def world_to_unit(world: np.ndarray, moving: Grid, fixed: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous world ``G`` (fixed -> moving) to the unit ``(matrix, offset)`` of ``phi_AB``."""
    d = fixed.dim
    unit = moving.world_to_unit_matrix() @ world @ fixed.unit_to_world_matrix()
    return unit[:d, :d], unit[:d, d]


def orientation(moving: Grid, fixed: Grid) -> np.ndarray:
    """``(d, d)`` local linear part of the world identity, ``D_A^-1 D_B``: how the moving
    image's array axes sit relative to the fixed image's (identity when both are stored alike)."""
    return np.linalg.inv(moving.direction) @ fixed.direction


def initial_world(init, moving: Grid, fixed: Grid) -> np.ndarray:
    """The homogeneous world transform (fixed -> moving) an initialisation names.

    Args:
        init: ``"world"`` (the identity in mm: trust both headers), ``"centers"`` (the identity
            with the two grids' centres aligned, as ANTs' and Greedy's image-centre start), a
            ``(d+1, d+1)`` (or, in 2D, 4x4) world matrix fixed -> moving, or the path of an ITK
            affine transform file (``.mat``, ``.txt``, ``.tfm``; LPS, fixed -> moving, as ANTs
            writes them). ``"moments"`` is image-based and handled by the affine stage.
    """
    d = fixed.dim
    if isinstance(init, str) and init in ("world", "centers"):
        out = np.eye(d + 1)
        if init == "centers":
            out[:d, d] = moving.center - fixed.center
        return out
    if isinstance(init, (str, Path)):
        from .itk import read_affine_itk
        try:
            matrix = read_affine_itk(init, d)
        except (OSError, ValueError) as error:
            raise type(error)(f"init: {error}") from error
        return _checked_world("init", matrix, d)
    return _checked_world("init", init, d)


def _checked_world(name: str, value, d: int) -> np.ndarray:
    try:
        matrix = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected one of {INIT_NAMES}, a ({d + 1}, {d + 1}) world matrix or the path "
                        f"of an ITK affine file, got {type(value).__name__}") from error
    if d == 2 and matrix.shape == (4, 4):
        matrix = matrix[np.ix_([0, 1, 3], [0, 1, 3])]
    if matrix.shape != (d + 1, d + 1):
        raise ValueError(f"{name}: expected one of {INIT_NAMES}, a ({d + 1}, {d + 1}) world matrix or the path "
                         f"of an ITK affine file, got {value!r}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name}: the world matrix contains NaN or Inf")
    if not np.allclose(matrix[d], np.eye(d + 1)[d]):
        raise ValueError(f"{name}: the last row of a homogeneous world matrix must be {np.eye(d + 1)[d]}, "
                         f"got {matrix[d]}")
    determinant = np.linalg.det(matrix[:d, :d])
    if not determinant > 1e-9:
        kind = "a reflection" if determinant < -1e-9 else "singular"
        raise ValueError(f"{name}: the world matrix is {kind} (determinant {determinant:.3g}); "
                         "a registration starts from a proper transform")
    return matrix
