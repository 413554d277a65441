"""A 1 mm moving scan against a 2 mm fixed one: ``fit_pair`` with ``moving_at_fixed_resolution``
on (the default: the moving image smoothed and resampled to 2 mm for the fit) and off (fitted on
the 1 mm image as given), alternating, on the same pairs and seeds.

    python benchmarks/mixed_resolution.py --sources MRICRON_TEMPLATES ANTSPYX_DATA [--seeds 0 1]

Pairs (``_brain_pairs.py``): the 1 mm Colin27 against the 2 mm MNI152, the 1 mm MNI152 against the
2 mm Colin27, and the 1 mm MNI152 against three deformed 2 mm Colin27 (the ``deformed`` pairs of
``real_peers.py``). Dice: the moving 1 mm labels warped onto the fixed 2 mm grid, mean over the
fixed labels. Seconds: the fit alone (no reading or writing).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _brain_pairs  # noqa: E402

import neuralfield_reg as nfr  # noqa: E402
from neuralfield_reg import metrics  # noqa: E402
from neuralfield_reg.io.images import read_image  # noqa: E402


def pairs(sources, root: Path) -> dict[str, dict]:
    original = _brain_pairs.original_1mm(sources, root)
    linear = _brain_pairs.linear_2mm(sources, root)
    out = {"colin-1mm-to-mni-2mm": _brain_pairs.mixed_resolution(original, linear),
           "mni-1mm-to-colin-2mm": {"moving": original["fixed"], "moving_labels": original["fixed_labels"],
                                    "fixed": linear["moving"], "fixed_labels": linear["moving_labels"]}}
    for seed in range(3):
        deformed = _brain_pairs.deformed(root, seed)
        out[f"mni-1mm-to-deformed-{seed}"] = dict(deformed, moving=original["fixed"],
                                                  moving_labels=original["fixed_labels"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs=2, type=Path, required=True, metavar=("MRICRON_TEMPLATES", "ANTSPYX_DATA"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()
    base = nfr.FitConfig.preset("3d")
    settings = {"at fixed resolution": base, "as given": dataclasses.replace(base, moving_at_fixed_resolution=False)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, pair in pairs(args.sources, Path(folder)).items():
            images = {key: read_image(path) for key, path in pair.items()}
            for seed in args.seeds:
                for setting, config in settings.items():
                    started = time.perf_counter()
                    result = nfr.fit_pair(images["moving"], images["fixed"], config, seed=seed, progress=False)
                    seconds = time.perf_counter() - started
                    warped = result.warp(images["moving_labels"], mode="label")
                    dice = metrics.mean_dice(np.asarray(warped.data), np.asarray(images["fixed_labels"].data))
                    rows.append((name, seed, setting, dice, seconds, result.metadata["moving_fit_shape"]))
                    print(f"{name} seed {seed} {setting}: Dice {dice:.4f}, {seconds:.2f} s, "
                          f"moving fitted on {rows[-1][-1]}", flush=True)
    print("\n| moving image | mean Dice | mean fit seconds |\n|---|---|---|")
    for setting in settings:
        chosen = [row for row in rows if row[2] == setting]
        print(f"| {setting} | {np.mean([row[3] for row in chosen]):.4f} | {np.mean([row[4] for row in chosen]):.2f} |")


if __name__ == "__main__":
    main()
