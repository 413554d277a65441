"""Images in and out: ``.npy`` arrays and NIfTI (``.nii``, ``.nii.gz``; the optional ``nifti`` extra).

An image comes back as ``(array, affine)``: the voxel array in the file's axis order and the
4x4 voxel-to-world matrix (for ``.npy``, the identity: 1 mm voxels). :func:`spacing_of` reads
the voxel sizes from an affine. Saving writes a temporary file in the target folder and renames
it into place, so an existing file is never left half-written. Every error names the path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 1:
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
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist")
    array = np.asarray(array)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {affine.shape}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        if suffix == ".npy":
            with open(temporary, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
        else:
            nibabel = _nibabel(path)
            nibabel.save(nibabel.Nifti1Image(array, affine), temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
