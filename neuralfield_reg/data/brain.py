"""A real labelled 3D pair: Colin27 (one subject, moving) and the MNI152 template (fixed), both
with the AAL parcellation (116 labels), on one world-aligned RAS grid.

The 2 mm copy ships with the package (``brain/colin27_mni152_2mm.npz``, ~1 MB), so loading works
offline with numpy alone. It was made by :func:`prepare_brain_pair` from:

- Colin27 ``ch2bet.nii.gz`` and ``aal.nii.gz`` from Debian's ``mricron-data`` package
  (``apt-get download mricron-data``; BSD-3-clause in Debian's copyright file);
- MNI152 ``mni.nii.gz`` and ``mnia.nii.gz`` from the antspyx 0.6.3 source tarball
  (``pip download --no-deps --no-binary :all: antspyx==0.6.3``, ``data/``; Apache-2.0 package).

The AAL atlas and the MNI152/Colin27 templates are free for research use. Colin27 is already in
MNI space, so the two agree in world coordinates; its file is stored RAS and the MNI152 file LAS.
The AAL-on-MNI152 map may itself have been made by warping Colin27's AAL, so Dice on this pair can
be optimistic; it is still a real anatomical pair with a large room for improvement.

The common grid is the MNI152 1 mm grid reoriented to RAS (182x218x182); both 1 mm volumes fall on
it by an integer voxel shift (checked). The 2 mm grid averages 2x2x2 blocks of intensities and
takes the most frequent label of each block.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import spacing_of

_DATA_DIR = Path(__file__).with_name("brain")
_PACKAGED = {2: _DATA_DIR / "colin27_mni152_2mm.npz"}


class BrainPair(NamedTuple):
    """Arrays are ``(X, Y, Z)`` in RAS order; ``affine`` maps voxel indices to RAS mm."""
    moving: np.ndarray           # Colin27 T1, float32 in [0, 1]
    fixed: np.ndarray            # MNI152 T1, float32 in [0, 1]
    moving_labels: np.ndarray    # AAL on Colin27, uint8, 0 = background, 1..116
    fixed_labels: np.ndarray     # AAL on MNI152
    affine: np.ndarray           # (4, 4), shared by all four arrays
    spacing: tuple[float, float, float]
    label_names: dict[int, str]


def brain_mask(image: np.ndarray, dilation: int = 2) -> np.ndarray:
    """The non-zero voxels of a skull-stripped image, dilated by ``dilation`` voxels (a cube)."""
    mask = torch.from_numpy(np.ascontiguousarray(image > 0)).float()[None, None]
    size = 2 * dilation + 1
    return (F.max_pool3d(mask, size, stride=1, padding=dilation)[0, 0] > 0).numpy()


def load_brain_pair(resolution_mm: int = 2, path: str | Path | None = None) -> BrainPair:
    """The Colin27 -> MNI152 pair with AAL labels (see the module docstring for provenance).

    Args:
        resolution_mm: 2 loads the packaged copy; other resolutions need ``path``, a file
            written by :func:`prepare_brain_pair`.
        path: an ``.npz`` written by :func:`prepare_brain_pair`.
    """
    if path is None:
        if resolution_mm not in _PACKAGED:
            raise ValueError(f"resolution_mm: only {sorted(_PACKAGED)} mm ships with the package, got "
                             f"{resolution_mm!r}; make other resolutions with prepare_brain_pair() and pass path=")
        path = _PACKAGED[resolution_mm]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no brain pair file at {path}")
    with np.load(path) as data:
        names = {int(k): str(v) for k, v in zip(data["label_ids"], data["label_names"])}
        affine = data["affine"].astype(np.float64)
        return BrainPair(moving=data["moving"].astype(np.float32) / 255.0,
                         fixed=data["fixed"].astype(np.float32) / 255.0,
                         moving_labels=data["moving_labels"], fixed_labels=data["fixed_labels"],
                         affine=affine, spacing=spacing_of(affine, 3),
                         label_names=names)


# ---------------------------------------------------------------------------------------------
# Preparation from the original packages (needs nibabel; run once to make the packaged file).

def _on_grid(image, grid_affine: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Values of a NIfTI image on a grid that shares its voxel lattice up to axis flips and an
    integer shift (zero outside the image)."""
    source_index = np.linalg.inv(image.affine) @ grid_affine
    linear = source_index[:3, :3]
    if not np.allclose(np.abs(linear), np.eye(3)) or not np.allclose(source_index[:3, 3],
                                                                      np.round(source_index[:3, 3])):
        raise ValueError("the image does not lie on the common grid by flips and integer shifts")
    data = np.asarray(image.dataobj)
    out = np.zeros(grid_shape, dtype=data.dtype)
    index = np.indices(grid_shape).reshape(3, -1)
    mapped = np.round(linear @ index + source_index[:3, 3:]).astype(np.int64)
    inside = np.all((mapped >= 0) & (mapped < np.array(data.shape)[:, None]), axis=0)
    out.reshape(-1)[inside] = data[tuple(mapped[:, inside])]
    return out


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    shape = tuple(s // factor for s in volume.shape)
    cropped = volume[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor].astype(np.float64)
    return cropped.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def _block_mode(labels: np.ndarray, factor: int) -> np.ndarray:
    """Most frequent label per block (ties: the smallest label)."""
    shape = tuple(s // factor for s in labels.shape)
    cropped = labels[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor]
    blocks = cropped.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    best, best_count = np.zeros(shape, dtype=labels.dtype), np.zeros(shape, dtype=np.int64)
    for value in np.unique(cropped):
        count = (blocks == value).sum(axis=(1, 3, 5))
        better = count > best_count
        best[better], best_count[better] = value, count[better]
    return best


def prepare_brain_pair(mricron_templates: str | Path, antspyx_data: str | Path, out_path: str | Path,
                       resolution_mm: int = 2) -> Path:
    """Write the pair at ``resolution_mm`` (1, 2, 3, ...) as an ``.npz`` for :func:`load_brain_pair`.

    Args:
        mricron_templates: the folder with ``ch2bet.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt``
            (``usr/share/mricron/templates`` of the extracted ``mricron-data`` .deb).
        antspyx_data: the ``data`` folder of the extracted antspyx 0.6.3 source tarball.
    """
    import nibabel as nib

    from ..io.files import atomic_write

    mricron_templates, antspyx_data = Path(mricron_templates), Path(antspyx_data)
    mni = nib.load(antspyx_data / "mni.nii.gz")
    grid_shape = tuple(int(s) for s in mni.shape[:3])
    # MNI's grid reoriented to RAS: flip every axis whose direction is negative.
    flips = np.sign(np.diag(mni.affine)[:3])
    grid_affine = mni.affine.copy()
    for axis in range(3):
        if flips[axis] < 0:
            grid_affine[:3, 3] += grid_affine[:3, axis] * (grid_shape[axis] - 1)
            grid_affine[:3, axis] *= -1
    volumes = {
        "moving": _on_grid(nib.load(mricron_templates / "ch2bet.nii.gz"), grid_affine, grid_shape),
        "fixed": _on_grid(mni, grid_affine, grid_shape),
        "moving_labels": _on_grid(nib.load(mricron_templates / "aal.nii.gz"), grid_affine, grid_shape),
        "fixed_labels": _on_grid(nib.load(antspyx_data / "mnia.nii.gz"), grid_affine, grid_shape),
    }
    factor = int(resolution_mm)
    affine = grid_affine.copy()
    if factor > 1:
        for key in ("moving", "fixed"):
            volumes[key] = _block_mean(volumes[key], factor)
        for key in ("moving_labels", "fixed_labels"):
            volumes[key] = _block_mode(np.round(volumes[key]).astype(np.int64), factor)
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / 2)   # block centres
        affine[:3, :3] *= factor
    for key in ("moving", "fixed"):
        volume = volumes[key].astype(np.float64)
        volumes[key] = np.round(255 * (volume - volume.min()) / (volume.max() - volume.min())).astype(np.uint8)
    for key in ("moving_labels", "fixed_labels"):
        volumes[key] = np.round(volumes[key]).astype(np.uint8)
    ids, names = [], []
    for line in (mricron_templates / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            ids.append(int(parts[0]))
            names.append(parts[1])
    out_path = Path(out_path)
    atomic_write(out_path, lambda temporary: np.savez_compressed(
        temporary, affine=affine, label_ids=np.array(ids), label_names=np.array(names), **volumes), suffix=".npz")
    return out_path


def write_brain_pair_nifti(out_dir: str | Path, pair: BrainPair | None = None) -> dict[str, Path]:
    """Write a brain pair as NIfTI files the way the scans are distributed: Colin27 (and its
    AAL map) stored RAS on its own field of view (the common grid less 2 voxels on each side),
    MNI152 (and its AAL map) stored LAS (the x axis flipped), each with the header that puts it
    at the same place in the world. Registering them must start from the world alignment, not
    from the arrays: read by array index, the hemispheres are swapped.

    Args:
        pair: default the packaged 2 mm pair (:func:`load_brain_pair`).
    Returns:
        ``{"moving", "moving_labels", "fixed", "fixed_labels"}`` -> paths (``.nii.gz``).
    """
    from ..geometry import Grid, Image
    from ..io.images import write_image

    pair = load_brain_pair() if pair is None else pair
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crop = 2
    colin = pair.affine.copy()
    colin[:3, 3] += colin[:3, :3] @ np.full(3, float(crop))
    inner = (slice(crop, -crop),) * 3
    mni = pair.affine.copy()
    mni[:3, 3] += mni[:3, 0] * (pair.fixed.shape[0] - 1)
    mni[:3, 0] *= -1
    files = {"moving": ("colin27_t1.nii.gz", pair.moving[inner], colin),
             "moving_labels": ("colin27_aal.nii.gz", pair.moving_labels[inner], colin),
             "fixed": ("mni152_t1.nii.gz", pair.fixed[::-1], mni),
             "fixed_labels": ("mni152_aal.nii.gz", pair.fixed_labels[::-1], mni)}
    paths = {}
    for key, (name, array, affine) in files.items():
        array = np.ascontiguousarray(array)
        write_image(out_dir / name, Image(array, Grid(array.shape, affine, name=name)))
        paths[key] = out_dir / name
    return paths
