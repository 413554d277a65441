"""Register every pair listed in a CSV file, in one process or sharded over torchrun's processes.

The CSV has a header with the columns ``moving`` and ``fixed`` and optionally ``moving_labels``,
``fixed_labels``, ``moving_mask`` and ``fixed_mask`` (similarity masks); paths to ``.npy`` or
NIfTI files, relative to the CSV's folder unless absolute. Pair ``i`` (the ``i``-th data row) is
written to ``OUT/pairs/i/``:

* ``result.pt`` (the :class:`RegistrationResult`), ``warped``, ``warped_labels`` and
  ``jacobian_determinant`` images in the fixed image's format and with its affine; the
  displacement as ``displacement_voxels.npy`` (``RegistrationResult.displacement``) for ``.npy``
  inputs, or as an ITK/ANTs field ``displacement_itk.nii.gz`` for 3D NIfTI inputs
  (:func:`~neuralfield_reg.io.save_displacement_itk`);
* ``summary.json``, written last: the pair's Dice (when both label maps are given), folding
  fraction, inverse-consistency error, seconds, rank, and ``status`` ("ok" or "failed" with the
  error). A pair whose summary says "ok" is skipped by a rerun, so a run killed midway resumes
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
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch.distributed as dist

from . import metrics
from ._files import atomic_write_text
from .config import FitConfig
from .distributed import init_from_environment
from .fit import fit_pair
from .io import load_image, save_displacement_itk, save_image, spacing_of
from .result import RegistrationResult

COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_mask", "fixed_mask")
SUMMARY_FIELDS = ("pair", "status", "moving", "fixed", "dice_before", "dice", "folding_fraction",
                  "inverse_consistency_error", "seconds", "rank", "error")


def read_pairs(pairs_csv) -> list[dict[str, str]]:
    """The rows of a pairs CSV, paths resolved against the CSV's folder."""
    path = Path(pairs_csv)
    if not path.is_file():
        raise FileNotFoundError(f"pairs_csv: no file at {str(path)!r}")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        missing = [c for c in ("moving", "fixed") if c not in columns]
        if missing:
            raise ValueError(f"pairs_csv: {str(path)!r} lacks the column(s) {missing}; its header is {columns}")
        rows = []
        for row in reader:
            rows.append({key: str(path.parent / value) if value and not Path(value).is_absolute() else value
                         for key, value in row.items() if key in COLUMNS})
    if not rows:
        raise ValueError(f"pairs_csv: {str(path)!r} lists no pairs")
    return rows


def _output_suffix(fixed_path: str) -> str:
    return ".nii.gz" if fixed_path.lower().endswith((".nii", ".nii.gz")) else ".npy"


class Registered(NamedTuple):
    """What :func:`register_row` did: the summary's numbers, the result and the images it read."""

    numbers: dict
    result: RegistrationResult
    moving: np.ndarray
    fixed: np.ndarray


def register_row(row: dict[str, str], pair_dir: Path, config: FitConfig, device, progress: bool) -> Registered:
    """Fit one pair of the CSV and write its outputs."""
    moving, moving_affine = load_image(row["moving"])
    fixed, fixed_affine = load_image(row["fixed"])
    spacing = (spacing_of(moving_affine, moving.ndim), spacing_of(fixed_affine, fixed.ndim))
    masks = {f"{kind}_mask": load_image(row[f"{kind}_mask"])[0] if row.get(f"{kind}_mask") else None
             for kind in ("moving", "fixed")}
    start = time.perf_counter()
    result = fit_pair(moving, fixed, config, spacing=spacing, device=device, progress=progress, **masks)
    seconds = time.perf_counter() - start
    suffix = _output_suffix(row["fixed"])
    result.save(pair_dir / "result.pt")
    save_image(pair_dir / f"warped{suffix}", result.warp(moving.astype(np.float32)), fixed_affine)
    determinant = result.jacobian_determinant()
    save_image(pair_dir / f"jacobian_determinant{suffix}", determinant, fixed_affine)
    if suffix == ".npy":
        save_image(pair_dir / "displacement_voxels.npy", result.displacement())
    if suffix != ".npy" and result.dim == 3:
        save_displacement_itk(pair_dir / "displacement_itk.nii.gz", result, moving_affine, fixed_affine)
    numbers = {"seconds": seconds, "folding_fraction": metrics.folding_fraction(determinant),
               "inverse_consistency_error": result.inverse_consistency_error()}
    if row.get("moving_labels"):
        moving_labels, _ = load_image(row["moving_labels"])
        warped_labels = result.warp(moving_labels, mode="nearest")
        save_image(pair_dir / f"warped_labels{suffix}", warped_labels, fixed_affine)
        if row.get("fixed_labels"):
            fixed_labels, _ = load_image(row["fixed_labels"])
            if fixed_labels.shape != fixed.shape:
                raise ValueError(f"fixed_labels: {row['fixed_labels']!r} has shape {fixed_labels.shape}, the fixed "
                                 f"image {fixed.shape}")
            numbers["dice_before"] = (metrics.mean_dice(moving_labels, fixed_labels)
                                      if moving_labels.shape == fixed_labels.shape else float("nan"))
            numbers["dice"] = metrics.mean_dice(warped_labels, fixed_labels)
    return Registered(numbers, result, moving, fixed)


def run_cohort(pairs_csv, out_dir, config: FitConfig = FitConfig(), *, device=None,
               progress: bool = True) -> list[dict] | None:
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
        pair_dir = out_dir / "pairs" / f"{index:05d}"
        pair_dir.mkdir(parents=True, exist_ok=True)
        summary_path = pair_dir / "summary.json"
        if summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "ok":
            continue                                     # done by an earlier run
        summary = {"pair": index, "moving": rows[index]["moving"], "fixed": rows[index]["fixed"], "rank": rank}
        try:
            summary.update(register_row(rows[index], pair_dir, config, device, progress).numbers)
            summary["status"] = "ok"
        except Exception as error:                       # recorded; the other pairs go on
            summary.update(status="failed", error=f"{type(error).__name__}: {error}")
            if progress:
                traceback.print_exc()
        atomic_write_text(summary_path, json.dumps(summary, indent=1))
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
