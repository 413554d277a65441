"""The library against Greedy and ANTs on the same real 3D brain pairs, in one run.

    pip install -e ".[peers]"            # antspyx, picsl-greedy (their own numpy pin: a separate venv helps)
    python benchmarks/real_peers.py [--sources MRICRON_TEMPLATES ANTSPYX_DATA] [--deformed 3] [--one-mm] [--harder]
                                    [--methods start greedy ants nfreg] [--nfreg-config FILE.json ...]

Pairs (``benchmarks/_brain_pairs.py``): the packaged 2 mm Colin27 -> MNI152 pair as distributed;
with ``--sources`` the original files at 2 mm (linear), with ``--one-mm`` at 1 mm, and with
``--harder`` the 1 mm Colin27 against the 2 mm MNI152, Colin27 with its skull against the stripped
MNI152 (both ways), the 2 mm pair with the fixed image's contrast inverted, the 2 mm pair with
the moving header's origin 660 mm off, the 2 mm pair with the moving Colin27 cut to its upper
60 % (a scan covering part of the other), the 2 mm pair cropped to the brains (76x95x79 and
76x94x79 voxels: a small field of view), and Colin27 with its skull and Rician noise of 6 % of
its range everywhere (the air of a raw scan) against the stripped MNI152, both ways; with ``--deformed N``, N inter-subject-like pairs
(MNI152 -> a moved, deformed, re-contrasted Colin27).
Methods, each on every pair, pair by pair (so the machine's slow phases hit all methods alike):

* ``start``: the moving labels resampled by the headers alone;
* ``greedy``: picsl-greedy, ``-a -dof 12 -ia-image-centers -m NCC 4x4x4 -n 100x50x10`` then
  ``-m NCC 2x2x2 -n 100x50x10 -s 2.0vox 0.5vox`` (the settings researchers use);
* ``ants``: antspyx ``registration(type_of_transform="SyN")`` (its affine stage included);
* ``ants-full`` (not run unless asked for): the same with ``reg_iterations=(40, 20, 10)``: SyN's
  default skips the images' own resolution (40 and 20 iterations at 1/4 and 1/2, 0 at full);
  this adds 10 there;
* ``nfreg``: ``nfreg fit moving fixed --labels ... --fixed-labels ...`` with no option (or each
  ``--nfreg-config`` file), wall time including reading and writing (the compiled kernels are
  built first, untimed, by ``nfreg kernels``).

Dice is the mean over the fixed image's labels on the fixed grid; folds = share of voxels whose
warp's Jacobian determinant is <= 0; seconds are wall seconds on this machine (2 threads each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _brain_pairs  # noqa: E402

from neuralfield_reg import metrics  # noqa: E402
from neuralfield_reg.geometry import resample_to  # noqa: E402
from neuralfield_reg.io.images import read_image  # noqa: E402

THREADS = 2


def dice(warped_labels: np.ndarray, fixed_labels: np.ndarray) -> tuple[float, float]:
    labels = [int(v) for v in np.unique(fixed_labels) if v != 0]
    scores = metrics.dice(warped_labels, fixed_labels, labels)
    values = [scores.get(label, 0.0) for label in labels]
    return float(np.mean(values)), float(np.min(values))


def folds_of_itk_field(path: Path) -> float:
    """Share of voxels where ``x -> x + u(x)`` of an ITK displacement NIfTI folds (det J <= 0),
    2D (``(X, Y, 1, 1, 2)``) or 3D."""
    import nibabel
    image = nibabel.load(str(path))
    d = image.shape[-1]
    u = np.asarray(image.dataobj, dtype=np.float64).reshape(*image.shape[:d], d)
    spacing = np.linalg.norm(image.affine[:d, :d], axis=0)
    direction = image.affine[:d, :d] / spacing
    flip = np.diag([-1.0, -1.0, 1.0][:d])
    # the field's components are LPS; its voxel axes run along the (RAS) direction columns
    gradient = np.stack([np.stack(np.gradient(u[..., c], *spacing), -1) for c in range(d)], -2)   # d u_c / d i_k
    jacobian = np.eye(d) + gradient @ (flip @ direction).T
    return float((np.linalg.det(jacobian) <= 0).mean())


def run_start(pair: dict, folder: Path) -> dict:
    started = time.perf_counter()
    fixed_labels = read_image(pair["fixed_labels"])
    warped = resample_to(read_image(pair["moving_labels"]), fixed_labels.grid, mode="label", padding="zeros")
    return {"labels": warped.data, "seconds": time.perf_counter() - started, "folds": 0.0}


class _Silenced:
    """Greedy and ANTs print their iterations from C++: send the process's stdout to /dev/null."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)


def run_greedy(pair: dict, folder: Path) -> dict:
    from picsl_greedy import Greedy2D, Greedy3D
    dim = read_image(pair["fixed"]).dim
    with _Silenced():
        return _greedy(Greedy3D() if dim == 3 else Greedy2D(), pair, folder, dim)


def _greedy(g, pair: dict, folder: Path, dim: int = 3) -> dict:
    """3D: affine (12 degrees of freedom) then deformable; 2D: rigid (6) then deformable."""
    affine, warp, out = folder / "greedy_affine.mat", folder / "greedy_warp.nii.gz", folder / "greedy_labels.nii.gz"
    dof, coarse, fine = (12, "4x4x4", "2x2x2") if dim == 3 else (6, "4x4", "2x2")
    started = time.perf_counter()
    g.execute(f"-threads {THREADS} -d {dim} -i {pair['fixed']} {pair['moving']} -a -dof {dof} -ia-image-centers "
              f"-m NCC {coarse} -n 100x50x10 -o {affine}")
    g.execute(f"-threads {THREADS} -d {dim} -i {pair['fixed']} {pair['moving']} -it {affine} -m NCC {fine} "
              f"-n 100x50x10 -s 2.0vox 0.5vox -o {warp}")
    g.execute(f"-threads {THREADS} -d {dim} -rf {pair['fixed']} -ri LABEL 0.2vox -rm {pair['moving_labels']} "
              f"{out} -r {warp} {affine}")
    seconds = time.perf_counter() - started
    return {"labels": read_image(out).data, "seconds": seconds, "folds": folds_of_itk_field(warp)}


def run_ants(pair: dict, folder: Path) -> dict:
    with _Silenced():
        return _ants(pair, folder)


def run_ants_full(pair: dict, folder: Path) -> dict:
    with _Silenced():
        return _ants(pair, folder, reg_iterations=(40, 20, 10))


def _ants(pair: dict, folder: Path, **options) -> dict:
    import ants
    started = time.perf_counter()
    fixed, moving = ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))
    registration = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(folder / "ants_"),
                                     **options)
    labels = ants.apply_transforms(fixed, ants.image_read(str(pair["moving_labels"])),
                                   transformlist=registration["fwdtransforms"], interpolator="genericLabel")
    seconds = time.perf_counter() - started
    labels.to_filename(str(folder / "ants_labels.nii.gz"))
    warp = next(p for p in registration["fwdtransforms"] if p.endswith(".nii.gz"))
    return {"labels": read_image(folder / "ants_labels.nii.gz").data, "seconds": seconds,
            "folds": folds_of_itk_field(Path(warp))}


def run_nfreg(pair: dict, folder: Path, config: Path | None = None) -> dict:
    out = folder / f"nfreg_{config.stem if config else 'default'}"
    command = [sys.executable, "-m", "neuralfield_reg.app.cli", "fit", str(pair["moving"]), str(pair["fixed"]),
               "-o", str(out), "--labels", str(pair["moving_labels"]), "--fixed-labels", str(pair["fixed_labels"]),
               "--quiet"] + (["--config", str(config)] if config else [])
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"labels": read_image(out / "warped_labels.nii.gz").data, "seconds": seconds,
            "folds": summary["folding_fraction"]}


def build_kernels() -> None:
    """``nfreg kernels`` once, untimed: the first timed fit must not pay the kernels' build."""
    subprocess.run([sys.executable, "-m", "neuralfield_reg.app.cli", "kernels"], check=True, stdout=subprocess.DEVNULL)


RUNNERS = {"start": run_start, "greedy": run_greedy, "ants": run_ants, "ants-full": run_ants_full, "nfreg": run_nfreg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs=2, type=Path, metavar=("MRICRON_TEMPLATES", "ANTSPYX_DATA"))
    parser.add_argument("--one-mm", action="store_true")
    parser.add_argument("--harder", action="store_true",
                        help="with --sources: the 1 mm Colin27 against the 2 mm MNI152, Colin27 with its skull "
                             "against the stripped MNI152 (both ways), "
                             "a contrast-inverted fixed MNI152, a moving header with its origin 660 mm off, "
                             "a moving Colin27 cut to its upper 60 %% (partial coverage), "
                             "both images cropped to their brains, "
                             "and Colin27 with its skull and Rician noise against the stripped MNI152 (both ways)")
    parser.add_argument("--deformed", type=int, default=0, help="how many deformed inter-subject-like pairs")
    parser.add_argument("--methods", nargs="+", default=["start", "greedy", "ants", "nfreg"], choices=RUNNERS)
    parser.add_argument("--nfreg-config", nargs="*", type=Path, default=[],
                        help="FitConfig JSON files: one nfreg row each, besides the default")
    parser.add_argument("--pairs", nargs="*", help="run only these pairs (by name)")
    parser.add_argument("--keep", type=Path, help="keep the pairs and outputs in this folder")
    args = parser.parse_args()
    temporary = None if args.keep else tempfile.TemporaryDirectory()
    root = args.keep or Path(temporary.name)
    root.mkdir(parents=True, exist_ok=True)
    pairs = {"packaged-2mm": _brain_pairs.packaged(root)}
    if args.sources:
        pairs["linear-2mm"] = _brain_pairs.linear_2mm(args.sources, root)
        if args.one_mm:
            pairs["original-1mm"] = _brain_pairs.original_1mm(args.sources, root)
        if args.harder:
            pairs["1mm-to-2mm"] = _brain_pairs.mixed_resolution(_brain_pairs.original_1mm(args.sources, root),
                                                                pairs["linear-2mm"])
            pairs["skull-to-stripped-2mm"] = _brain_pairs.skull_2mm(args.sources, root)
            pairs["stripped-to-skull-2mm"] = _brain_pairs.reversed_pair(pairs["skull-to-stripped-2mm"])
            pairs["inverted-contrast-2mm"] = _brain_pairs.inverted_2mm(pairs["linear-2mm"], root)
            pairs["shifted-origin-2mm"] = _brain_pairs.shifted_origin_2mm(pairs["linear-2mm"], root)
            pairs["partial-coverage-2mm"] = _brain_pairs.partial_coverage_2mm(pairs["linear-2mm"], root)
            pairs["cropped-2mm"] = _brain_pairs.cropped_2mm(pairs["linear-2mm"], root)
            pairs["noisy-skull-to-stripped-2mm"] = _brain_pairs.noisy_skull_2mm(pairs["skull-to-stripped-2mm"], root)
            pairs["stripped-to-noisy-skull-2mm"] = _brain_pairs.reversed_pair(pairs["noisy-skull-to-stripped-2mm"])
    for seed in range(args.deformed):
        pairs[f"deformed-{seed}"] = _brain_pairs.deformed(root, seed)
    if args.pairs:
        pairs = {name: pair for name, pair in pairs.items() if name in args.pairs}
    methods = [(name, RUNNERS[name], None) for name in args.methods]
    methods += [(f"nfreg:{path.stem}", run_nfreg, path) for path in args.nfreg_config]
    if any(runner is run_nfreg for _, runner, _ in methods):
        build_kernels()
    rows = []
    for pair_name, pair in pairs.items():
        fixed_labels = read_image(pair["fixed_labels"]).data
        for method, runner, config in methods:
            folder = root / pair_name / method.replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
            outcome = runner(pair, folder, config) if config else runner(pair, folder)
            mean, worst = dice(outcome["labels"], fixed_labels)
            rows.append({"pair": pair_name, "method": method, "dice": mean, "dice_min": worst,
                         "folds": outcome["folds"], "seconds": outcome["seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| pair | method | Dice | lowest label | folds % | seconds | time / Greedy | time / ANTs |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratios = []
        for anchor in ("greedy", "ants"):     # the same pair's time of that tool, in this run
            seconds = next((r["seconds"] for r in rows if r["pair"] == row["pair"] and r["method"] == anchor), None)
            ratios.append(f"{row['seconds'] / seconds:.2f}" if seconds and row["method"] != "start" else "")
        print(f"| {row['pair']} | {row['method']} | {row['dice']:.3f} | {row['dice_min']:.3f} | "
              f"{100 * row['folds']:.3f} | {row['seconds']:.1f} | {ratios[0]} | {ratios[1]} |")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
