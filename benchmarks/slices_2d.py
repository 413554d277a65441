"""The library against Greedy and ANTs on 2D slices of real brain scans, slice by slice in one run.

    python benchmarks/slices_2d.py --sources MRICRON_TEMPLATES ANTSPYX_DATA [--skull] \\
        [--methods start greedy ants nfreg] [--nfreg-config FILE.json ...]

Slices (2D NIfTI files, each with its own header) of Colin27 (moving, AAL labels) and MNI152
(fixed, AAL labels) at the same world positions: axial z = -20, 0, 20, 40 mm, sagittal x = -30,
30 mm and coronal y = 0, -40 mm, at 1 mm and (every second voxel) at 2 mm; with ``--skull``
also Colin27 with its skull against the stripped MNI152 at z = -10, 20, x = -30, y = -20 (1 mm).
A sagittal or coronal slice's two in-plane world axes are written as its x and y.

Methods (as in ``real_peers.py``): ``start`` (labels resampled by the headers), ``greedy``
(``-d 2``, rigid then NCC 2x2 deformable, 100x50x10), ``ants`` (antspyx SyN), ``nfreg``
(``nfreg fit`` with no option: the ``"2d-scan"`` preset; or each ``--nfreg-config``), wall
seconds on 2 threads, mean Dice over the fixed slice's labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_peers import RUNNERS, build_kernels, dice  # noqa: E402  (the same runners as the 3D benchmark; sets ITK's threads)

from neuralfield_reg.io.images import read_image  # noqa: E402

CLEAN = [("z", -20), ("z", 0), ("z", 20), ("z", 40), ("x", -30), ("x", 30), ("y", 0), ("y", -40)]
SKULL = [("z", -10), ("z", 20), ("x", -30), ("y", -20)]


def write_slice(source: Path, out: Path, axis: str, position: float, step: int) -> None:
    """The slice of ``source`` nearest world ``axis = position`` mm (every ``step``-th voxel in
    plane), as a 2D NIfTI whose header keeps the slice's in-plane world axes."""
    import nibabel
    image = nibabel.load(str(source))
    affine, data = image.affine, np.asarray(image.dataobj)
    a = "xyz".index(axis)
    point = np.zeros(4)
    point[a], point[3] = position, 1.0
    index = int(round(np.linalg.solve(affine, point)[a]))   # the images are axis-aligned
    cut = [slice(None, None, step)] * 3
    cut[a] = index
    keep = [i for i in range(3) if i != a]
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] @ np.diag([1 if i == a else step for i in range(3)])
    scaled[:3, 3] = affine[:3, :3] @ np.eye(3)[a] * index + affine[:3, 3]
    order = keep + [a, 3]
    labels = "aal" in source.name or "mnia" in source.name
    values = data[tuple(cut)].astype(np.uint8 if labels else np.float32)
    nibabel.save(nibabel.Nifti1Image(values, scaled[order][:, order]), str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs=2, type=Path, required=True, metavar=("MRICRON_TEMPLATES", "ANTSPYX_DATA"))
    parser.add_argument("--skull", action="store_true", help="add the skull -> stripped slices")
    parser.add_argument("--methods", nargs="+", default=["start", "greedy", "ants", "nfreg"],
                        choices=["start", "greedy", "ants", "nfreg"])
    parser.add_argument("--nfreg-config", nargs="*", type=Path, default=[], help="also nfreg fit with each config")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the slices and outputs (default: temporary)")
    args = parser.parse_args()
    templates, antspyx = args.sources
    stripped = {"moving": templates / "ch2bet.nii.gz", "moving_labels": templates / "aal.nii.gz",
                "fixed": antspyx / "mni.nii.gz", "fixed_labels": antspyx / "mnia.nii.gz"}
    cases = [(f"{a}={p:+d} {s} mm", stripped, a, p, s) for s in (1, 2) for a, p in CLEAN]
    if args.skull:
        cases += [(f"skull {a}={p:+d} 1 mm", dict(stripped, moving=templates / "ch2.nii.gz"), a, p, 1)
                  for a, p in SKULL]
    methods = [(m, None) for m in args.methods] + [("nfreg", c) for c in args.nfreg_config]
    names = [m if c is None else f"nfreg {c.stem}" for m, c in methods]
    root = Path(args.keep or tempfile.mkdtemp(prefix="slices_2d_"))
    if any(method == "nfreg" for method, _ in methods):
        build_kernels()                              # untimed, before the first timed fit
    print(f"{'slice':<20}" + "".join(f"{n:>22}" for n in names))
    table = {n: {} for n in names}
    for label, sources, axis, position, step in cases:
        folder = root / label.replace(" ", "_").replace("=", "")
        folder.mkdir(parents=True, exist_ok=True)
        pair = {}
        for key, source in sources.items():
            pair[key] = folder / f"{key}.nii.gz"
            write_slice(source, pair[key], axis, position, step)
        fixed_labels = read_image(pair["fixed_labels"]).data
        row = []
        for name, (method, config) in zip(names, methods):
            run = RUNNERS[method](pair, folder, config) if config else RUNNERS[method](pair, folder)
            seconds = run["seconds"]
            score = dice(np.asarray(run["labels"]).reshape(fixed_labels.shape), fixed_labels)[0]
            table[name][label] = (score, seconds)
            row.append(f"{score:.3f} {seconds:5.1f} s")
        print(f"{label:<20}" + "".join(f"{r:>22}" for r in row), flush=True)
    print("mean Dice:")
    groups = {"1 mm": lambda l: l.endswith("1 mm") and not l.startswith("skull"), "2 mm": lambda l: l.endswith("2 mm"),
              "skull": lambda l: l.startswith("skull")}
    for group, member in groups.items():
        values = {n: [v[0] for l, v in table[n].items() if member(l)] for n in names}
        if any(values.values()):
            print(f"{group:<20}" + "".join(f"{np.mean(v):>22.3f}" for v in values.values()))
    (root / "table.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
