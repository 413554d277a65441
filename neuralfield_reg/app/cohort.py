"""Register every pair listed in a CSV file, in one process or sharded over torchrun's processes.

The CSV has a header with the columns ``moving`` and ``fixed`` and optionally ``moving_labels``,
``fixed_labels``, ``moving_mask`` and ``fixed_mask`` (similarity masks); paths to ``.npy`` or
NIfTI files, relative to the CSV's folder unless absolute. Pair ``i`` (the ``i``-th data row) is
written to ``OUT/pairs/i/``:

* ``result.pt`` (the :class:`RegistrationResult`), ``warped``, ``warped_labels`` and
  ``jacobian_determinant`` images in the fixed image's format and on its grid (its header); for
  NIfTI inputs the ITK/ANTs files of :meth:`RegistrationResult.save_itk`
  (``displacement_itk.nii.gz`` on the fixed grid, ``inverse_displacement_itk.nii.gz`` on the
  moving grid, ``affine.mat``, ``affine.txt``), for ``.npy`` inputs ``displacement_voxels.npy``
  (``RegistrationResult.displacement``) and ``affine.txt``;
* ``summary.json``, written last: the pair's Dice before (the moving labels resampled onto the
  fixed grid by world coordinates: what the headers' alignment alone gives) and after (when both
  label maps are given), folding fraction, inverse-consistency error (over every second voxel
  along each axis), the start (``init``) and the share of the fixed image's box inside the
  moving image's (``world_overlap``), seconds, rank, and ``status`` ("ok" or "failed" with the
  error).

Every file of a row is read and checked before its fit: label maps and masks must lie on their
image's grid (shape and header). A pair whose summary says "ok" is skipped by a rerun, so a run killed midway resumes
  where it stopped; a failed pair is tried again.

Launched with ``torchrun --nproc_per_node=N``, rank ``r`` takes pairs ``r, r + N, ...`` (one GPU
per rank when there are GPUs, gloo on the CPU); after a barrier, rank 0 merges the per-pair
summaries into ``OUT/summary.csv``, every pair exactly once.
"""

from __future__ import annotations

import csv
import io as _stringio
import json
import time
import traceback
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch.distributed as dist

from .. import metrics
from ..io.files import atomic_write_text, background_writes, begin_outputs, end_outputs, same_file
from ..config import FitConfig
from .distributed import init_from_environment
from ..registration.fit import fit_pair
from ..geometry import Image, orientation_code, resample_to
from ..io.images import read_image, save_image, write_image
from ..registration.result import RegistrationResult
from ..transforms.itk import write_affine_itk
from ..validation import as_tensor, check_mask

COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_mask", "fixed_mask")
# Every file a pair folder can hold (all of them are replaced, or removed, by a new run).
OUTPUT_NAMES = tuple(f"{stem}{suffix}" for stem in ("warped", "warped_labels", "jacobian_determinant")
                     for suffix in (".npy", ".nii.gz")) + (
    "result.pt", "displacement_voxels.npy", "displacement_itk.nii.gz", "inverse_displacement_itk.nii.gz",
    "affine.mat", "affine.txt", "overview.png")
SUMMARY_FIELDS = ("pair", "status", "moving", "fixed", "dice_before", "dice", "folding_fraction",
                  "inverse_consistency_error", "init", "world_overlap", "seconds", "rank", "error")


def read_pairs(pairs_csv) -> list[dict[str, str]]:
    """The rows of a pairs CSV, paths resolved against the CSV's folder; every row needs a moving
    and a fixed path. Columns other than :data:`COLUMNS` are ignored with a warning (a typo such
    as ``labels`` would otherwise go unnoticed)."""
    path = Path(pairs_csv)
    if not path.is_file():
        raise FileNotFoundError(f"pairs_csv: no file at {str(path)!r}")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream, restval="")
        columns = reader.fieldnames or []
        missing = [c for c in ("moving", "fixed") if c not in columns]
        if missing:
            raise ValueError(f"pairs_csv: {str(path)!r} lacks the column(s) {missing}; its header is {columns}")
        ignored = [c for c in columns if c not in COLUMNS]
        if ignored:
            warnings.warn(f"pairs_csv: {str(path)!r} has column(s) {ignored} that nfreg does not read; the columns "
                          f"it reads are {list(COLUMNS)}", stacklevel=2)
        rows = []
        for number, row in enumerate(reader, start=1):
            cells = {key: (row.get(key) or "").strip() for key in COLUMNS}
            for key in ("moving", "fixed"):
                if not cells[key]:
                    raise ValueError(f"pairs_csv: row {number} of {str(path)!r} (line {reader.line_num}) has no "
                                     f"{key} path")
            rows.append({key: str(path.parent / value) if value and not Path(value).is_absolute() else value
                         for key, value in cells.items()})
    if not rows:
        raise ValueError(f"pairs_csv: {str(path)!r} lists no pairs")
    return rows


def _output_suffix(fixed_path: str) -> str:
    """Outputs of images with headers (NIfTI, MGH) are NIfTI files, as the ITK fields must be."""
    return ".npy" if fixed_path.lower().endswith(".npy") else ".nii.gz"


class Registered(NamedTuple):
    """What :func:`register_row` did: the summary's numbers, the result, the images it read and
    the moving image warped onto the fixed grid."""

    numbers: dict
    result: RegistrationResult
    moving: Image
    fixed: Image
    warped: Image


LABEL_TOLERANCE = 1e-3


def _checked_labels(name: str, image: Image) -> Image:
    """Label maps hold whole numbers: non-integer values would be scored by truncation. Float
    values within ``LABEL_TOLERANCE`` of a whole number (a label map stored as floats by another
    tool, 2.9999998) are rounded to it; anything further off is refused."""
    data = np.asarray(image.data)
    if data.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected integer labels, got dtype {data.dtype}")
    if data.dtype.kind != "f":
        return image
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: a label map must hold whole numbers, got {int((~np.isfinite(data)).sum())} "
                         "NaN or infinite values")
    rounded = np.round(data)
    off = np.abs(data - rounded) > LABEL_TOLERANCE
    if off.any():
        raise ValueError(f"{name}: a label map must hold whole numbers, got values such as "
                         f"{data[off][:3].tolist()}")
    return image.with_data(rounded.astype(data.dtype, copy=False))


def read_row(row: dict[str, str], names: dict[str, str] | None = None) -> dict[str, Image | None]:
    """Read every file of a row before anything is fitted, and check that label maps and masks
    lie on their image's grid. ``names``: what errors call each column (default the column)."""
    names = {column: column for column in COLUMNS} | (names or {})
    images = {}
    for column in COLUMNS:
        path = row.get(column)
        if not path:
            images[column] = None
            continue
        try:
            images[column] = read_image(path)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{names[column]}: {error}") from error
    for column, owner in (("moving_labels", "moving"), ("fixed_labels", "fixed"), ("moving_mask", "moving"),
                          ("fixed_mask", "fixed")):
        image = images[column]
        if image is None:
            continue
        if not image.grid.same_as(images[owner].grid):
            raise ValueError(f"{names[column]}: {row[column]!r} lies on {image.grid}, not on the {owner} image's "
                             f"{images[owner].grid}")
        if column.endswith("labels"):
            images[column] = _checked_labels(names[column], image)
        else:
            check_mask(names[column], as_tensor(names[column], np.asarray(image.data))[0])
    return images


def register_row(row: dict[str, str], pair_dir: Path, config: FitConfig | dict | None, device, progress: bool, *,
                 init=None, names: dict[str, str] | None = None) -> Registered:
    """Fit one pair of the CSV and write its outputs (see the module docstring).

    ``config``: a FitConfig, or None / a dict of fields over the images' preset
    (``FitConfig.for_images``: NIfTI files are scans). Every input is read and checked first (:func:`read_row`), and no input may be one of the
    outputs; then the folder is marked incomplete and its earlier outputs removed
    (:func:`~neuralfield_reg.io.files.begin_outputs`): the caller writes ``summary.json`` and calls
    ``end_outputs`` when it is done. The fit starts from ``init``
    (:func:`~neuralfield_reg.fit_pair`; default the headers' world alignment). Label maps are
    warped with label interpolation (``mode="label"``, as ANTs' genericLabel); ``dice_before``
    is the Dice of the moving labels resampled onto the fixed grid by world coordinates alone.
    """
    images = read_row(row, names)
    moving, fixed = images["moving"], images["fixed"]
    names = {column: column for column in COLUMNS} | (names or {})
    for column in COLUMNS:
        for output in OUTPUT_NAMES:
            if row.get(column) and same_file(row[column], Path(pair_dir) / output):
                raise ValueError(f"{names[column]}: {row[column]!r} is where this run writes its {output}; it would be "
                                 "overwritten: copy it elsewhere or choose another output folder")
    begin_outputs(pair_dir, OUTPUT_NAMES)           # before the fit: an unwritable folder fails now
    # .npy files have no header: their arrays go in bare (identity geometry, image-based start)
    headers = _output_suffix(row["moving"]) != ".npy" and _output_suffix(row["fixed"]) != ".npy"
    inputs = {key: image if headers or image is None else image.data for key, image in images.items()}
    if not isinstance(config, FitConfig):       # None or overrides: on top of the images' preset
        config = FitConfig.from_dict(config or {}, base=FitConfig.for_images(moving.dim, scans=headers))
    start = time.perf_counter()
    result = fit_pair(inputs["moving"], inputs["fixed"], config, init=init, device=device, progress=progress,
                      moving_mask=inputs["moving_mask"], fixed_mask=inputs["fixed_mask"])
    seconds = time.perf_counter() - start
    labels = images["moving_labels"]
    warped_labels = None if labels is None else result.warp(labels, mode="label")
    warped = write_outputs(pair_dir, result, moving, warped_labels, _output_suffix(row["fixed"]))
    determinant = result.jacobian_determinant()
    numbers = {"seconds": seconds, "folding_fraction": metrics.folding_fraction(determinant),
               "inverse_consistency_error": result.inverse_consistency_error(every=2),
               "init": result.metadata.get("init"), "world_overlap": fixed.grid.overlap(moving.grid),
               "moving_orientation": orientation_code(moving.grid),
               "fixed_orientation": orientation_code(fixed.grid)}
    if labels is not None and images["fixed_labels"] is not None:
        fixed_labels = images["fixed_labels"].data
        numbers["dice_before"] = metrics.mean_dice(resample_to(labels, fixed.grid, mode="label").data, fixed_labels)
        numbers["dice"] = metrics.mean_dice(warped_labels.data, fixed_labels)
    return Registered(numbers, result, moving, fixed, warped)


def _storable(data) -> np.ndarray:
    """Intensities to warp and write: float32, or float64 where a value is beyond float32's range."""
    data = np.asarray(data)
    if data.dtype == np.float64 and data.size and float(np.abs(data).max()) > float(np.finfo(np.float32).max):
        return data
    return data.astype(np.float32)


def write_outputs(pair_dir: Path, result: RegistrationResult, moving: Image, warped_labels: Image | None,
                  suffix: str) -> Image:
    """The result, the warped image (and the warped labels, when given), det J, the displacement
    fields and the affine; returns the warped image."""
    pair_dir = Path(pair_dir)
    fixed_grid = result.fixed_grid
    result.save(pair_dir / "result.pt")
    warped = result.warp(moving.with_data(_storable(moving.data)))
    write_image(pair_dir / f"warped{suffix}", warped)
    if warped_labels is not None:
        write_image(pair_dir / f"warped_labels{suffix}", warped_labels)
    write_image(pair_dir / f"jacobian_determinant{suffix}", Image(result.jacobian_determinant(), fixed_grid))
    if suffix == ".npy":
        save_image(pair_dir / "displacement_voxels.npy", result.displacement())
        write_affine_itk(pair_dir / "affine.txt", result.affine_AB)
    else:
        result.save_itk(pair_dir)
    return warped


def _done(summary_path: Path, row: dict, settings: dict) -> bool:
    """A pair is done when its summary says "ok" for the same inputs and settings (a changed CSV
    row or config is registered again)."""
    if not summary_path.exists():
        return False
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return False
    as_json = json.loads(json.dumps({"inputs": row, "settings": settings}))       # tuples read back as lists
    return (summary.get("status") == "ok" and summary.get("inputs") == as_json["inputs"]
            and summary.get("settings") == as_json["settings"])


def run_cohort(pairs_csv, out_dir, config: FitConfig | dict | None = None, *, device=None,
               progress: bool = True, init=None) -> list[dict] | None:
    """Register every pair of ``pairs_csv`` into ``out_dir`` (see the module docstring).

    Under torchrun the process group is joined here (:func:`init_from_environment`), each rank
    registers its share, and rank 0 writes the merged ``summary.csv``.

    Returns:
        On rank 0, the merged summary rows (dicts with :data:`SUMMARY_FIELDS`); None elsewhere.
    """
    rows = read_pairs(pairs_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, rank_device = init_from_environment()
    device = rank_device if device is None else device
    for index in range(rank, len(rows), world):
        pair_dir = out_dir / "pairs" / f"{index:05d}"      # made by register_row, with its INCOMPLETE marker
        summary_path = pair_dir / "summary.json"
        settings = {"config": config.to_dict() if isinstance(config, FitConfig) else config,
                    "init": None if init is None else str(init)}
        if _done(summary_path, rows[index], settings):
            continue                                     # done by an earlier run, with these inputs
        summary = {"pair": index, "moving": rows[index]["moving"], "fixed": rows[index]["fixed"], "rank": rank,
                   "inputs": rows[index], "settings": settings}
        try:
            with background_writes():                    # every output written before the summary
                summary.update(register_row(rows[index], pair_dir, config, device, progress, init=init).numbers)
            summary["status"] = "ok"
        except Exception as error:                       # recorded; the other pairs go on
            summary.update(status="failed", error=f"{type(error).__name__}: {error}")
            if progress:
                traceback.print_exc()
        if summary["status"] == "ok":
            end_outputs(pair_dir)
        pair_dir.mkdir(parents=True, exist_ok=True)      # a pair that failed before its outputs began
        atomic_write_text(summary_path, json.dumps(summary, indent=1))      # last: the pair is complete
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    merged = []
    for index in range(len(rows)):
        summary_path = out_dir / "pairs" / f"{index:05d}" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else \
            {"pair": index, "status": "missing", **{k: rows[index][k] for k in ("moving", "fixed")}}
        merged.append({field: summary.get(field, "") for field in SUMMARY_FIELDS})
    text = _stringio.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows(merged)
    atomic_write_text(out_dir / "summary.csv", text.getvalue())
    return merged
