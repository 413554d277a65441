"""Files that ITK, ANTs, SimpleITK and Slicer read: affine transforms and displacement fields.

Conventions (ITK's): physical points are LPS+ millimetres (NIfTI's RAS+ with x and y negated);
a transform maps points of the *fixed* image to points of the *moving* image, which is what
``antsApplyTransforms -r fixed -t T`` and ``sitk.Resample(moving, fixed, T)`` need to bring the
moving image onto the fixed grid.

* Affine: ``p_moving = A p_fixed + offset``, written as an ``AffineTransform_double_D_D`` in
  ITK's text format (``.txt``, ``.tfm``) or in the MATLAB v4 binary that ANTs writes (``.mat``);
  the centre (fixed parameters) is written as 0, so the translation parameters are the offset.
* Displacement field: a NIfTI vector image on the fixed grid (its header), voxel ``i`` holding
  ``u`` with ``p_moving = p_fixed + u(p_fixed)``; shape ``(X, Y, Z, 1, 3)`` in 3D and
  ``(X, Y, 1, 1, 2)`` in 2D, intent "vector".
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np

from ..geometry import Grid
from ..io.files import atomic_write

_AFFINE_NAMES = ("AffineTransform", "MatrixOffsetTransformBase")


def _flip(d: int) -> np.ndarray:
    """RAS <-> LPS: x and y negated (2D: both axes)."""
    return np.diag([-1.0, -1.0, 1.0][:d])


def world_to_lps(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous RAS world matrix (fixed -> moving) to ITK's ``(A, offset)`` in LPS."""
    d = world.shape[0] - 1
    flip = _flip(d)
    return flip @ world[:d, :d] @ flip, flip @ world[:d, d]


def lps_to_world(matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """ITK's ``(A, offset)`` in LPS to the homogeneous RAS world matrix (fixed -> moving)."""
    d = matrix.shape[0]
    flip = _flip(d)
    out = np.eye(d + 1)
    out[:d, :d] = flip @ matrix @ flip
    out[:d, d] = flip @ offset
    return out


def _parameters(world: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    d = world.shape[0] - 1
    matrix, offset = world_to_lps(np.asarray(world, dtype=np.float64))
    return f"AffineTransform_double_{d}_{d}", np.concatenate([matrix.reshape(-1), offset]), np.zeros(d)


def write_affine_itk(path, world: np.ndarray) -> None:
    """Write a homogeneous RAS world matrix (fixed -> moving, ``(d+1, d+1)``) as an ITK affine
    transform: ``.mat`` (MATLAB v4, as ANTs writes) or ``.txt``/``.tfm`` (ITK text), atomically."""
    path = Path(path)
    name, parameters, fixed = _parameters(world)
    if path.suffix.lower() == ".mat":
        payload = _matlab_variable(name, parameters) + _matlab_variable("fixed", fixed)
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(payload), suffix=".mat")
        return
    if path.suffix.lower() not in (".txt", ".tfm"):
        raise ValueError(f"path: an ITK affine file ends in .mat, .txt or .tfm, got {str(path)!r}")
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {name}\n"
            f"Parameters: {' '.join(repr(float(v)) for v in parameters)}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n")
    atomic_write(path, lambda temporary: Path(temporary).write_text(text), suffix=path.suffix)


def read_affine_itk(path, dim: int | None = None) -> np.ndarray:
    """Read an ITK affine transform file (``.mat``, ``.txt``, ``.tfm``) as the homogeneous RAS
    world matrix (fixed -> moving). ``dim``: the expected dimension (2 or 3), checked if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no transform file at {str(path)!r}")
    try:
        if path.suffix.lower() == ".mat":
            variables = _read_matlab(path.read_bytes())
            if len(variables) < 2:
                raise ValueError("expected two variables (parameters and fixed parameters)")
            (name, parameters), (_, fixed) = variables[0], variables[1]
        else:
            name, parameters, fixed = _read_text(path.read_text())
    except (ValueError, struct.error, UnicodeDecodeError) as error:
        raise ValueError(f"path: {str(path)!r} is not a readable ITK affine transform ({error})") from error
    d = len(fixed)
    if not any(name.startswith(kind) for kind in _AFFINE_NAMES) or d not in (2, 3) \
            or len(parameters) != d * d + d:
        raise ValueError(f"path: {str(path)!r} holds a {name!r} with {len(parameters)} parameters; expected an "
                         "AffineTransform or MatrixOffsetTransformBase of dimension 2 or 3")
    if dim is not None and d != dim:
        raise ValueError(f"path: {str(path)!r} is a {d}D transform; expected {dim}D")
    matrix = np.asarray(parameters[:d * d], dtype=np.float64).reshape(d, d)
    translation = np.asarray(parameters[d * d:], dtype=np.float64)
    center = np.asarray(fixed, dtype=np.float64)
    # ITK: T(p) = A (p - c) + c + t, so the offset is t + c - A c.
    return lps_to_world(matrix, translation + center - matrix @ center)


def _read_text(text: str) -> tuple[str, list[float], list[float]]:
    fields = {}
    for line in text.splitlines():
        match = re.match(r"\s*(Transform|Parameters|FixedParameters)\s*:\s*(.*)$", line)
        if match and match.group(1) not in fields:        # the first transform of the file
            fields[match.group(1)] = match.group(2).strip()
    if set(fields) != {"Transform", "Parameters", "FixedParameters"}:
        raise ValueError("no Transform, Parameters and FixedParameters lines")
    return (fields["Transform"], [float(v) for v in fields["Parameters"].split()],
            [float(v) for v in fields["FixedParameters"].split()])


def _matlab_variable(name: str, values: np.ndarray) -> bytes:
    """One MATLAB v4 variable: a little-endian double column vector."""
    encoded = name.encode("ascii") + b"\0"
    header = struct.pack("<5i", 0, len(values), 1, 0, len(encoded))
    return header + encoded + np.asarray(values, dtype="<f8").tobytes()


def _read_matlab(data: bytes) -> list[tuple[str, np.ndarray]]:
    """The variables of a MATLAB v4 file (real double or single matrices, either byte order)."""
    variables, position = [], 0
    while position + 20 <= len(data):
        kind = struct.unpack_from("<i", data, position)[0]
        endian = "<"
        if not 0 <= kind < 5000 or kind // 1000 not in (0, 1):
            endian = ">"
            kind = struct.unpack_from(">i", data, position)[0]
        kind, rows, columns, imaginary, name_length = struct.unpack_from(endian + "5i", data, position)
        machine, precision, text = kind // 1000, (kind // 10) % 10, kind % 10
        if machine not in (0, 1) or precision not in (0, 1) or text != 0 or imaginary or rows < 0 \
                or columns < 0 or name_length < 1:
            raise ValueError("not a MATLAB v4 matrix of real numbers")
        position += 20
        name = data[position:position + name_length].split(b"\0")[0].decode("ascii")
        position += name_length
        dtype = np.dtype(("<" if machine == 0 else ">") + ("f8" if precision == 0 else "f4"))
        size = rows * columns * dtype.itemsize
        if position + size > len(data):
            raise ValueError("truncated MATLAB v4 file")
        values = np.frombuffer(data, dtype=dtype, count=rows * columns, offset=position).astype(np.float64)
        variables.append((name, values.reshape(columns, rows).T.reshape(-1)))
        position += size
    return variables


def write_displacement_itk(path, world_displacement: np.ndarray, grid) -> None:
    """Write a displacement field (RAS mm, ``(*grid.shape, d)``, ``p_to = p + u``) as an ITK
    displacement NIfTI on ``grid`` (its 4x4 header), atomically. Needs nibabel."""
    from ..io.images import _nibabel, _suffix

    path = Path(path)
    if _suffix(path) == ".npy":
        raise ValueError(f"path: an ITK displacement field is a NIfTI file (.nii or .nii.gz), got {str(path)!r}")
    d = grid.dim
    if world_displacement.shape != (*grid.shape, d):
        raise ValueError(f"world_displacement: expected shape {(*grid.shape, d)}, got {world_displacement.shape}")
    nibabel = _nibabel(path)
    vectors = world_displacement.astype(np.float32)
    vectors[..., :2] *= -1.0            # RAS -> LPS in place (a product broadcast over the last axis
                                        # of d values was the slow part of writing a 1 mm field)
    if d == 2:
        vectors = vectors[:, :, None, None, :]
    else:
        vectors = vectors[:, :, :, None, :]
    image = nibabel.Nifti1Image(vectors, np.array(grid.affine))
    image.header.set_intent("vector")
    if _suffix(path) == ".nii":
        atomic_write(path, lambda temporary: nibabel.save(image, temporary), suffix=".nii")
        return

    def stored(temporary):
        # gzip without compression (stored blocks): the float32 vectors of a smooth field shrink
        # by under 10 % at level 1 for about a second of CPU per 2 mm brain; any gzip reader reads it
        with gzip.open(temporary, "wb", compresslevel=0) as stream:
            stream.write(image.to_bytes())
    atomic_write(path, stored, suffix=".nii.gz")


def world_displacement(result, moving_affine=None, fixed_affine=None) -> np.ndarray:
    """The forward map as a world displacement: ``(*fixed grid, d)`` in mm (RAS, NIfTI's frame),
    ``p_moving = p_fixed + u(p_fixed)``; by default on the result's own grids, or with the given
    4x4 voxel-to-world matrices of the two images."""
    if moving_affine is None and fixed_affine is None:
        return result.world_displacement("AB")
    moving = result.moving_grid if moving_affine is None else Grid(result.moving_shape, moving_affine, name="moving_affine")
    fixed = result.fixed_grid if fixed_affine is None else Grid(result.fixed_shape, fixed_affine, name="fixed_affine")
    fixed_voxels = np.indices(result.fixed_shape).astype(np.float64)
    moving_voxels = fixed_voxels + result.displacement("AB")
    return moving.voxel_to_world(np.moveaxis(moving_voxels, 0, -1)) - fixed.voxel_to_world(np.moveaxis(fixed_voxels, 0, -1))


def save_displacement_itk(path, result, moving_affine=None, fixed_affine=None) -> None:
    """Write the forward map as an ITK/ANTs displacement field (NIfTI vector image) on the fixed
    grid, ``p_moving = p_fixed + u`` in LPS mm (:func:`write_displacement_itk`);
    the grids are the result's own unless the images' 4x4 matrices are given."""
    fixed = result.fixed_grid if fixed_affine is None else Grid(result.fixed_shape, fixed_affine, name="fixed_affine")
    write_displacement_itk(path, world_displacement(result, moving_affine, fixed_affine), fixed)
