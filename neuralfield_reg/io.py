"""Images in and out: ``.npy`` arrays and NIfTI (``.nii``, ``.nii.gz``; the optional ``nifti`` extra).

An image comes back as ``(array, affine)``: the voxel array in the file's axis order and the
4x4 voxel-to-world matrix (for ``.npy``, the identity: 1 mm voxels). :func:`spacing_of` reads
the voxel sizes from an affine. Saving writes a temporary file in the target folder and renames
it into place, so an existing file is never left half-written. Every error names the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._files import atomic_write

SUFFIXES = (".npy", ".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"path: {str(path)!r} has an unknown extension; expected one of {', '.join(SUFFIXES)}")


def _nibabel(path: Path):
    try:
        import nibabel
    except ImportError as error:
        raise ImportError(f"path: reading or writing {str(path)!r} needs nibabel: "
                          "pip install 'neuralfield_reg[nifti]'") from error
    return nibabel


def load_image(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D or 3D image: ``(array, 4x4 affine)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unknown extension, unreadable file, or not 2D/3D (a trailing axis of length
            1, as NIfTI often stores 2D slices, is dropped).
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no file at {str(path)!r}")
    try:
        if suffix == ".npy":
            array, affine = np.load(path, allow_pickle=False), np.eye(4)
        else:
            image = _nibabel(path).load(str(path))
            array, affine = np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    except ImportError:
        raise
    except Exception as error:
        raise ValueError(f"path: {str(path)!r} could not be read as {suffix} ({error})") from error
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"path: {str(path)!r} holds an array of shape {array.shape}; expected a 2D or 3D image")
    return array, affine


def spacing_of(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel sizes along the first ``ndim`` array axes: the norms of the affine's columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(np.linalg.norm(affine[:3, k])) for k in range(ndim))


def save_image(path, array, affine=None) -> None:
    """Write ``array`` to ``path`` (``.npy`` or NIfTI with ``affine``, default identity), atomically."""
    path = Path(path)
    suffix = _suffix(path)
    array = np.asarray(array)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {affine.shape}")
    if suffix == ".npy":
        def write(temporary):
            with open(temporary, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
    else:
        nibabel = _nibabel(path)

        def write(temporary):
            nibabel.save(nibabel.Nifti1Image(array, affine), temporary)
    atomic_write(path, write, suffix=suffix)


def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """World (RAS, mm) positions ``(3, *grid)`` of voxel coordinates ``(d, *grid)``; a 2D image
    lies in the plane of its first two axes (third voxel coordinate 0)."""
    padded = np.concatenate([voxels, np.zeros((3 - voxels.shape[0], *voxels.shape[1:]))]) \
        if voxels.shape[0] < 3 else voxels
    return np.einsum("ij,j...->i...", affine[:3, :3], padded) + affine[:3, 3].reshape(3, *([1] * (padded.ndim - 1)))


def world_displacement(result, moving_affine, fixed_affine) -> np.ndarray:
    """The forward map as a world displacement: ``(*fixed grid, 3)`` in mm (RAS, NIfTI's frame).

    At fixed voxel ``i``: the world position of ``phi_AB(x_i)`` in the moving image minus the
    world position of voxel ``i`` of the fixed image, so ``p_moving = p_fixed + u(p_fixed)``.
    """
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    fixed_voxels = np.indices(result.fixed_shape).astype(np.float64)
    moving_voxels = fixed_voxels + result.displacement("AB")
    return np.moveaxis(_world(moving_affine, moving_voxels) - _world(fixed_affine, fixed_voxels), 0, -1)


def save_displacement_itk(path, result, moving_affine, fixed_affine) -> None:
    """Write the forward map as an ITK/ANTs displacement field (NIfTI vector image).

    Convention (ITK's): on the fixed image's grid (its affine), each voxel holds the vector
    ``u`` in physical millimetres and LPS orientation such that ``p_moving = p_fixed + u``, the
    transform ``antsApplyTransforms -t field.nii.gz`` uses to bring the moving image onto the
    fixed grid. NIfTI world coordinates are RAS, so the first two components are negated. The
    array has ITK's shape ``(X, Y, Z, 1, 3)`` with intent "vector". 3D images only.
    """
    if result.dim != 3:
        raise ValueError(f"result: ITK displacement fields are written for 3D images, got a {result.dim}D result; "
                         "use result.displacement() for 2D")
    path = Path(path)
    if _suffix(path) == ".npy":
        raise ValueError(f"path: an ITK displacement field is a NIfTI file (.nii or .nii.gz), got {str(path)!r}")
    nibabel = _nibabel(path)
    vectors = world_displacement(result, moving_affine, fixed_affine) * np.array([-1.0, -1.0, 1.0])
    image = nibabel.Nifti1Image(vectors[:, :, :, None, :].astype(np.float32), np.asarray(fixed_affine, float))
    image.header.set_intent("vector")
    atomic_write(path, lambda temporary: nibabel.save(image, temporary), suffix=_suffix(path))
