"""World-space registration of real scans as users have them: `nfreg fit` with no options on
brain pairs stored in their distributed orientations, fields of view and spacings.

Cases (moving Colin27 + AAL, fixed MNI152 + AAL, 116 labels):

* ``packaged``: the packaged 2 mm pair written as distributed (Colin27 RAS on its own field of
  view, MNI152 LAS; :func:`neuralfield_reg.data.brain.write_brain_pair_nifti`);
* ``oblique``: the same, with the Colin27 files resampled onto a grid rotated by 12 degrees and
  8 degrees with 2.2 x 2.0 x 2.5 mm voxels (a real re-slice: its voxels change, its world does not);
* ``linear-2mm``: the original 1 mm files (``--sources``: the ``mricron-data`` templates folder
  and the antspyx 0.6.3 ``data`` folder, see ``neuralfield_reg/data/brain/README.md``) resampled
  to 2 mm by linear interpolation (labels nearest) in each file's own orientation and field of view;
* ``original-1mm`` (``--one-mm``): the original files themselves.

Each case runs the command line a user would type, in a subprocess (reading and writing
included), and prints the start (Dice of the labels resampled by the headers alone), the Dice
after, folds and wall time.

    python benchmarks/world_space.py [--sources MRICRON_TEMPLATES ANTSPYX_DATA] [--one-mm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neuralfield_reg.data.brain import write_brain_pair_nifti
from neuralfield_reg.geometry import Grid, orientation_code, resample_to, rotation_matrix
from neuralfield_reg.io.images import read_image, write_image


def resliced(paths: dict, folder: Path) -> dict:
    """The moving files resampled onto an oblique, anisotropic grid around the same world box."""
    moving = read_image(paths["moving"])
    direction = rotation_matrix((12.0, 0.0, 8.0)) @ moving.grid.direction
    spacing = np.array([2.2, 2.0, 2.5])
    shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(moving.grid.extent, spacing))
    corner = moving.grid.center - direction @ (spacing * (np.array(shape) - 1) / 2)
    grid = Grid.from_spacing(shape, spacing, origin=corner, direction=direction)
    out = dict(paths)
    for key, mode in (("moving", "linear"), ("moving_labels", "nearest")):
        image = resample_to(read_image(paths[key]), grid, mode=mode, padding="zeros")
        out[key] = folder / f"oblique_{Path(paths[key]).name}"
        write_image(out[key], image)
    return out


def two_mm(sources: tuple[Path, Path], folder: Path) -> dict:
    """The original files on 2 mm grids in their own orientation and field of view."""
    templates, antspyx = sources
    files = {"moving": templates / "ch2bet.nii.gz", "moving_labels": templates / "aal.nii.gz",
             "fixed": antspyx / "mni.nii.gz", "fixed_labels": antspyx / "mnia.nii.gz"}
    out = {}
    for key, path in files.items():
        image = read_image(path)
        grid = image.grid
        shape = tuple((n + 1) // 2 for n in grid.shape)
        coarse = Grid.from_spacing(shape, 2.0 * np.asarray(grid.spacing), origin=grid.origin, direction=grid.direction)
        mode = "nearest" if key.endswith("labels") else "linear"
        data = image.data if mode == "nearest" else image.data.astype(np.float32)
        resampled = resample_to(image.with_data(np.round(data).astype(np.uint8) if mode == "nearest" else data),
                                coarse, mode=mode, padding="zeros")
        out[key] = folder / f"linear2mm_{path.name}"
        write_image(out[key], resampled)
    return out


def originals(sources: tuple[Path, Path], folder: Path) -> dict:
    templates, antspyx = sources
    out = {}
    for key, path in (("moving", templates / "ch2bet.nii.gz"), ("moving_labels", templates / "aal.nii.gz"),
                      ("fixed", antspyx / "mni.nii.gz"), ("fixed_labels", antspyx / "mnia.nii.gz")):
        image = read_image(path)
        data = np.round(image.data).astype(np.uint8) if key.endswith("labels") else image.data
        out[key] = folder / f"original_{path.name}"
        write_image(out[key], image.with_data(data))
    return out


def run(name: str, paths: dict, folder: Path) -> dict:
    out = folder / f"out_{name}"
    command = [sys.executable, "-m", "neuralfield_reg.app.cli", "fit", str(paths["moving"]), str(paths["fixed"]),
               "-o", str(out), "--labels", str(paths["moving_labels"]), "--fixed-labels", str(paths["fixed_labels"]),
               "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    grids = [read_image(paths[key]).grid for key in ("moving", "fixed")]
    return {"case": name, "grids": " -> ".join(f"{orientation_code(g)} {'x'.join(map(str, g.shape))}" for g in grids),
            "start": summary["dice_before"], "dice": summary["dice"], "folds": summary["folding_fraction"],
            "fit_s": summary["seconds"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs=2, type=Path, metavar=("MRICRON_TEMPLATES", "ANTSPYX_DATA"))
    parser.add_argument("--one-mm", action="store_true", help="also the original 1 mm files (slower)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        packaged = write_brain_pair_nifti(folder / "packaged")
        cases = [("packaged", packaged), ("oblique", resliced(packaged, folder))]
        if args.sources:
            cases.append(("linear-2mm", two_mm(tuple(args.sources), folder)))
            if args.one_mm:
                cases.append(("original-1mm", originals(tuple(args.sources), folder)))
        for name, paths in cases:
            rows.append(run(name, paths, folder))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| case | moving -> fixed grids | start Dice | Dice | folds % | fit s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['grids']} | {row['start']:.3f} | **{row['dice']:.3f}** | "
              f"{100 * row['folds']:.3f} | {row['fit_s']:.1f} | {row['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
