"""Real labelled 3D brain pairs as NIfTI files, for the benchmarks (not part of the package).

Every builder returns ``{"moving", "fixed", "moving_labels", "fixed_labels"}`` -> paths.

* :func:`packaged`: the packaged 2 mm Colin27 -> MNI152 pair written as distributed (Colin27 RAS
  on its own field of view, MNI152 LAS).
* :func:`linear_2mm` / :func:`original_1mm`: the original files from the Debian ``mricron-data``
  templates folder and the antspyx 0.6.3 ``data`` folder (see ``neuralfield_reg/data/brain/README.md``),
  at 2 mm by linear interpolation (labels nearest) in each file's own frame, or as they are.
* :func:`mixed_resolution`: the 1 mm Colin27 against the 2 mm MNI152.
* :func:`skull_2mm`: Colin27 with its skull against the skull-stripped MNI152 (:func:`reversed_pair`: the
  other way round);
  :func:`inverted_2mm`: the linear 2 mm pair with the fixed image's contrast inverted;
  :func:`shifted_origin_2mm`: the linear 2 mm pair with the moving header's origin 660 mm off;
  :func:`partial_coverage_2mm`: the moving Colin27 cut to its upper 60 %;
  :func:`cropped_2mm`: both images cropped to their brains;
  :func:`noisy_skull_2mm`: Colin27 with its skull and Rician noise of 6 % everywhere, as a raw scan.
* :func:`deformed`: an inter-subject-like pair with exact labels: MNI152 (moving) against Colin27
  moved by a random affine and a smooth random deformation, its intensities changed by a bias
  field and a gamma (fixed), so that the start is far from aligned and the two brains differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neuralfield_reg.geometry.coords import identity_grid, sample
from neuralfield_reg.data.brain import write_brain_pair_nifti
from neuralfield_reg.geometry.filters import gaussian_blur
from neuralfield_reg.geometry import Grid, Image, resample_to, rotation_matrix
from neuralfield_reg.io.images import read_image, write_image


def packaged(folder: Path) -> dict:
    return write_brain_pair_nifti(Path(folder) / "packaged")


def _source_files(sources, colin: str = "ch2bet.nii.gz") -> dict:
    """The original files; ``colin``: ``ch2bet.nii.gz`` (skull-stripped) or ``ch2.nii.gz`` (with
    its skull, on the same grid, so the same AAL map applies)."""
    templates, antspyx = (Path(s) for s in sources)
    return {"moving": templates / colin, "moving_labels": templates / "aal.nii.gz",
            "fixed": antspyx / "mni.nii.gz", "fixed_labels": antspyx / "mnia.nii.gz"}


def _as_labels(image: Image) -> Image:
    return image.with_data(np.round(np.asarray(image.data)).astype(np.uint8))


def linear_2mm(sources, folder: Path, *, colin: str = "ch2bet.nii.gz", name: str = "linear_2mm") -> dict:
    folder = Path(folder) / name
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, path in _source_files(sources, colin).items():
        image = read_image(path)
        grid = image.grid
        coarse = Grid.from_spacing(tuple((n + 1) // 2 for n in grid.shape), 2.0 * np.asarray(grid.spacing),
                                   origin=grid.origin, direction=grid.direction)
        labels = key.endswith("labels")
        source = _as_labels(image) if labels else image.with_data(image.data.astype(np.float32))
        out[key] = folder / path.name
        write_image(out[key], resample_to(source, coarse, mode="nearest" if labels else "linear", padding="zeros"))
    return out


def mixed_resolution(original: dict, linear: dict) -> dict:
    """The 1 mm Colin27 of :func:`original_1mm` (moving) against the 2 mm MNI152 of
    :func:`linear_2mm` (fixed): a subject scan at its own resolution against a 2 mm template."""
    return {"moving": original["moving"], "moving_labels": original["moving_labels"],
            "fixed": linear["fixed"], "fixed_labels": linear["fixed_labels"]}


def skull_2mm(sources, folder: Path) -> dict:
    """Colin27 with its skull against the skull-stripped MNI152, at 2 mm as :func:`linear_2mm`: a
    head on one side and only a brain on the other, as when one scan of a pair is stripped (the
    other way round: :func:`reversed_pair`)."""
    return linear_2mm(sources, folder, colin="ch2.nii.gz", name="skull_2mm")


def reversed_pair(pair: dict) -> dict:
    """The same files with moving and fixed swapped."""
    return {"moving": pair["fixed"], "moving_labels": pair["fixed_labels"], "fixed": pair["moving"],
            "fixed_labels": pair["moving_labels"]}


def inverted_2mm(linear: dict, folder: Path) -> dict:
    """The :func:`linear_2mm` pair ``linear`` with the fixed MNI152's contrast inverted inside its
    head (bright becomes dark, the background stays 0), as between a T1- and a T2-weighted scan."""
    folder = Path(folder) / "inverted_2mm"
    folder.mkdir(parents=True, exist_ok=True)
    fixed = read_image(linear["fixed"])
    data = np.asarray(fixed.data, dtype=np.float32)
    head = data > 0.05 * data.max()
    out = dict(linear, fixed=folder / "mni_inverted.nii.gz")
    write_image(out["fixed"], fixed.with_data(np.where(head, 1.1 * data.max() - data, 0.0).astype(np.float32)))
    return out


def shifted_origin_2mm(linear: dict, folder: Path, offset=(500.0, -250.0, 350.0)) -> dict:
    """The :func:`linear_2mm` pair ``linear`` with the moving image's (and its labels') origin
    moved by ``offset`` mm: the same voxels, a header that puts nothing of the moving image where
    the fixed image is (a scanner or converter origin that is not the other file's)."""
    folder = Path(folder) / "shifted_origin_2mm"
    folder.mkdir(parents=True, exist_ok=True)
    out = dict(linear)
    for key in ("moving", "moving_labels"):
        image = read_image(linear[key])
        affine = np.array(image.grid.affine, dtype=np.float64)
        affine[:3, 3] += np.asarray(offset, dtype=np.float64)
        out[key] = folder / Path(linear[key]).name
        write_image(out[key], Image(np.asarray(image.data), Grid(image.shape, affine)))
    return out


def partial_coverage_2mm(linear: dict, folder: Path, keep: float = 0.6) -> dict:
    """The :func:`linear_2mm` pair ``linear`` with the moving Colin27 (and its labels) cut to the
    upper ``keep`` of its slices, headers kept true: a scan that covers part of the fixed one
    (a limited field of view). Dice stays over all of the fixed image's labels, so the labels the
    cut removed score 0 for every method."""
    folder = Path(folder) / "partial_coverage_2mm"
    folder.mkdir(parents=True, exist_ok=True)
    out = dict(linear)
    for key in ("moving", "moving_labels"):
        image = read_image(linear[key])
        first = int(round(image.shape[2] * (1.0 - keep)))
        affine = np.array(image.grid.affine, dtype=np.float64)
        affine[:3, 3] += affine[:3, 2] * first
        out[key] = folder / Path(linear[key]).name
        data = np.asarray(image.data)[:, :, first:]
        write_image(out[key], Image(np.ascontiguousarray(data), Grid(data.shape, affine)))
    return out


def noisy_skull_2mm(skull: dict, folder: Path, level: float = 0.06, seed: int = 0) -> dict:
    """The :func:`skull_2mm` pair ``skull`` with MR noise on the moving Colin27 head: Rician, of
    standard deviation ``level`` times its 99.5th percentile, everywhere (the air around the head of
    a raw scan is noise, not zero)."""
    folder = Path(folder) / "noisy_skull_2mm"
    folder.mkdir(parents=True, exist_ok=True)
    image = read_image(skull["moving"])
    data = np.asarray(image.data, dtype=np.float64)
    sigma = level * np.percentile(data, 99.5)
    generator = np.random.default_rng(seed)
    real, imaginary = (generator.normal(0.0, sigma, data.shape) for _ in range(2))
    out = dict(skull, moving=folder / "ch2_noisy.nii.gz")
    write_image(out["moving"], image.with_data(np.sqrt((data + real) ** 2 + imaginary ** 2).astype(np.float32)))
    return out


def cropped_2mm(linear: dict, folder: Path, margin: int = 2) -> dict:
    """The :func:`linear_2mm` pair ``linear`` with each image (and its labels) cropped to its
    brain's bounding box plus ``margin`` voxels, headers kept true: the small field of view of
    skull-stripped, cropped datasets (about 0.57 M voxels against 0.9 M). Greedy's and ANTs'
    time follows the image's voxels, the fields' mostly the brain's."""
    folder = Path(folder) / "cropped_2mm"
    folder.mkdir(parents=True, exist_ok=True)
    out = dict(linear)
    for image_key in ("moving", "fixed"):
        image = read_image(linear[image_key])
        inside = np.argwhere(np.asarray(image.data) > 0)
        low = np.maximum(inside.min(0) - margin, 0)
        high = np.minimum(inside.max(0) + 1 + margin, image.shape)
        affine = np.array(image.grid.affine, dtype=np.float64)
        affine[:3, 3] += affine[:3, :3] @ low
        box = tuple(slice(a, b) for a, b in zip(low, high))
        for key in (image_key, f"{image_key}_labels"):
            data = np.ascontiguousarray(np.asarray(read_image(linear[key]).data)[box])
            out[key] = folder / Path(linear[key]).name
            write_image(out[key], Image(data, Grid(data.shape, affine)))
    return out


def original_1mm(sources, folder: Path) -> dict:
    folder = Path(folder) / "original_1mm"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, path in _source_files(sources).items():
        image = read_image(path)
        out[key] = folder / path.name
        write_image(out[key], _as_labels(image) if key.endswith("labels") else image)
    return out


def deformed(folder: Path, seed: int, *, magnitude_mm: float = 4.0) -> dict:
    """MNI152 (moving) against a randomly moved, deformed and re-contrasted Colin27 (fixed), from
    the packaged 2 mm files; ``seed`` picks the motion."""
    base = packaged(folder)
    folder = Path(folder) / f"deformed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colin, colin_labels = read_image(base["moving"]), read_image(base["moving_labels"])
    grid = colin.grid
    # Colin27's anatomy moved in the world by a random rotation, scaling and shift (the header
    # stays Colin27's, so the headers' alignment is off by the motion, as for a subject scan not
    # in MNI space), then deformed by a smooth random displacement
    motion = np.eye(4)
    motion[:3, :3] = rotation_matrix(rng.uniform(-10, 10, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    motion[:3, 3] = rng.uniform(-10, 10, 3)
    # a smooth random displacement (mm), sampled on a coarse lattice
    noise = torch.from_numpy(rng.standard_normal((3, *grid.shape))).float()
    smooth = torch.stack([gaussian_blur(component, 6.0) for component in noise])
    smooth = smooth * (magnitude_mm / float(smooth.abs().amax()))
    unit = identity_grid(grid.shape, dtype=torch.float64)                      # fixed voxels, unit
    world = torch.from_numpy(grid.unit_to_world(unit.numpy()))
    moved = world @ torch.from_numpy(motion[:3, :3]).T + torch.from_numpy(motion[:3, 3])
    moved = moved + smooth.movedim(0, -1).double()
    source_unit = torch.from_numpy(grid.world_to_unit(moved.numpy())).float()

    def warp(image: Image, mode: str) -> np.ndarray:
        data = torch.from_numpy(np.ascontiguousarray(image.data))
        if mode == "linear":
            data = data.float()
        return sample(data, source_unit, mode=mode, padding="zeros").numpy()

    intensity = warp(colin, "linear")
    bias = gaussian_blur(torch.from_numpy(rng.standard_normal(grid.shape)).float(), 12.0).numpy()
    bias = 1.0 + 0.15 * bias / np.abs(bias).max()
    intensity = np.clip(intensity / max(intensity.max(), 1e-6), 0, 1) ** rng.uniform(0.8, 1.25) * bias
    fixed_grid = grid
    out = {"moving": base["fixed"], "moving_labels": base["fixed_labels"],
           "fixed": folder / "fixed.nii.gz", "fixed_labels": folder / "fixed_labels.nii.gz"}
    write_image(out["fixed"], Image(intensity.astype(np.float32), fixed_grid))
    write_image(out["fixed_labels"], Image(warp(colin_labels, "nearest").astype(np.uint8), fixed_grid))
    return out
