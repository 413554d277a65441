"""Images in and out: ``.npy`` arrays, NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer's MGH (``.mgz``,
``.mgh``), the last two with the optional ``nifti`` extra (nibabel).

:func:`read_image` gives an :class:`~neuralfield_reg.geometry.Image`: the voxel array in the
file's axis order on its :class:`~neuralfield_reg.geometry.Grid`, whose 4x4 voxel-to-world
matrix (RAS+ mm) is the header's as nibabel resolves sform/qform (MGH: its vox2ras; ``.npy``:
the identity, 1 mm voxels at the origin). :func:`write_image` writes an Image back with that matrix.
:func:`as_image` turns what users pass (Images, paths, nibabel images, bare arrays) into Images.
Saving writes a temporary file in the target folder and renames it into place, so an existing
file is never left half-written. Every error names the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from ..geometry import Grid, Image
from ..validation import check_image_shape

SUFFIXES = (".npy", ".nii", ".nii.gz", ".mgz", ".mgh")
MGH_SUFFIXES = (".mgz", ".mgh")          # FreeSurfer's format: a voxel-to-RAS matrix, as NIfTI's


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:                  # none ends another (".nii.gz" does not end in ".nii")
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


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """Big-endian files are valid; torch only takes arrays in the machine's byte order."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
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
    if array.ndim == 3 and 1 in array.shape:
        raise ValueError(f"path: {str(path)!r} holds a slice of shape {array.shape} (one voxel along axis "
                         f"{array.shape.index(1)}); a 2D image must be an axial slice, its single voxel along the "
                         "last axis and its plane the world's x-y plane (as ITK reads 2D images): register the "
                         "volumes, or save the slice as a 2D image whose header maps its two axes to x and y")
    return _native_byte_order(array), affine


def read_image(path) -> Image:
    """Read a 2D or 3D image with its geometry.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unknown extension, unreadable file, not 2D/3D (a trailing axis of length
            1, as NIfTI often stores 2D slices, is dropped), or a header whose voxel-to-world
            matrix is singular, zero or not finite (the message names the file).
    """
    path = Path(path)
    array, affine = _read(path)
    return Image(array, Grid(array.shape, affine, name=f"path {str(path)!r}"))


def load_image(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D or 3D image: ``(array, 4x4 affine)`` (:func:`read_image` as plain values)."""
    image = read_image(path)
    return image.data, np.array(image.affine)


def write_image(path, image) -> None:
    """Write an :class:`~neuralfield_reg.geometry.Image` (NIfTI: with its grid's matrix), atomically."""
    if not isinstance(image, Image):
        raise TypeError(f"image: expected an Image, got {type(image).__name__}")
    save_image(path, image.numpy(), image.affine)


def as_image(name: str, value, *, spacing=None) -> tuple[Image, bool]:
    """``(Image, geometry_known)`` of an input: an Image, a path (read; a ``.npy`` file has no
    header, so its identity geometry is not known), a nibabel image, or a bare numpy array /
    tensor (identity geometry, voxel sizes ``spacing``; not known)."""
    if isinstance(value, Image):
        return value, True
    if isinstance(value, (str, Path)):
        try:
            image = read_image(value)
        except (OSError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from error
        return image, _suffix(Path(value)) != ".npy"
    if hasattr(value, "affine") and hasattr(value, "dataobj"):           # a nibabel image
        array = np.asarray(value.dataobj)
        while array.ndim > 2 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image(_native_byte_order(array), Grid(array.shape, value.affine, name=name), name=name), True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        check_image_shape(name, value)
        return Image(value, Grid.from_spacing(tuple(value.shape), spacing, name=name), name=name), False
    raise TypeError(f"{name}: expected an Image, a file path, a nibabel image, a numpy array or a torch "
                    f"tensor, got {type(value).__name__}")


def spacing_of(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel sizes along the first ``ndim`` array axes: the norms of the affine's columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(np.linalg.norm(affine[:3, k])) for k in range(ndim))


def _fits_int32(array: np.ndarray) -> bool:
    info = np.iinfo(np.int32)
    return array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max)


def _nifti_dtype(array: np.ndarray) -> np.ndarray:
    """The array in a type NIfTI stores as it is and other tools read: booleans as uint8,
    float16 as float32, 64-bit integers as int32 where every value fits (a label map made with
    numpy is int64), kept 64-bit otherwise; NIfTI has no other types (RGB or structured arrays)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        return array.astype(np.int32) if _fits_int32(array) else array
    if array.dtype.kind not in "iufc":
        raise TypeError(f"array: NIfTI stores numbers; got dtype {array.dtype}")
    return array


def _mgh_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """The array in one of the four types MGH stores (uint8, int16, int32, float32), values kept;
    what does not fit is refused naming the file."""
    array = _nifti_dtype(array)
    if array.dtype in (np.uint8, np.int16, np.int32, np.float32):
        return array
    if array.dtype.kind in "iu":
        if _fits_int32(array):
            return array.astype(np.int32)
    elif array.dtype.kind == "f":
        if array.size == 0 or float(np.abs(array).max()) <= float(np.finfo(np.float32).max):
            return array.astype(np.float32)
    raise TypeError(f"path: {str(path)!r}: MGH files hold uint8, int16, int32 or float32 values; {array.dtype} "
                    "values that do not fit them need another format (.nii.gz)")


def save_image(path, array, affine=None) -> None:
    """Write ``array`` to ``path`` (``.npy``, or NIfTI / MGH with ``affine``, default identity), atomically."""
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
    elif suffix in MGH_SUFFIXES:
        nibabel = _nibabel(path)
        array = _mgh_dtype(array, path)

        def write(temporary):
            nibabel.save(nibabel.MGHImage(array, affine), temporary)
    else:
        nibabel = _nibabel(path)
        array = _nifti_dtype(array)

        def write(temporary):
            nibabel.save(nibabel.Nifti1Image(array, affine, dtype=array.dtype), temporary)
    atomic_write(path, write, suffix=suffix)
