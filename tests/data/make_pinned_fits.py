"""Writes pinned_fits.json: the histories of short seeded fits, which tests/test_pinned.py
compares every later version of the fit loop with (run from the repository root:
``python tests/data/make_pinned_fits.py``; only when a change of results is intended)."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from neuralfield_reg import FitConfig, fit_pair, fit_pairs


def disc(n: int, centre, radius: float, dim: int = 2) -> np.ndarray:
    """A disc (ball) with bumps of radius 0.4 and 0.25 of its own on axis 1 (and, in 3D, 2), plus
    a ramp along axis 0: a shape no rotation maps onto itself, so that the affine stage's search
    has one winner (on a plain disc its candidates tie, and rounding picks one)."""
    axis = np.linspace(0, 1, n)
    grid = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), -1)
    centre = np.asarray(centre[:dim], dtype=float)
    inside = np.linalg.norm(grid - centre, axis=-1) < radius
    for k, size in ((1, 0.4), (2, 0.25))[:dim - 1]:
        bump = centre.copy()
        bump[k] += radius
        inside |= np.linalg.norm(grid - bump, axis=-1) < size * radius
    return inside.astype(np.float32) + 0.05 * np.sin(7 * grid[..., 0]).astype(np.float32)


def cases() -> dict:
    moving, fixed = disc(24, (0.45, 0.5), 0.25), disc(24, (0.55, 0.5), 0.3)
    moving3, fixed3 = disc(12, (0.45, 0.5, 0.5), 0.3, 3), disc(12, (0.55, 0.5, 0.5), 0.3, 3)
    # the MLP given explicitly: the cases pin the fit engine, not FitConfig()'s defaults
    base = FitConfig(iterations=12, similarity_points=128, gradient_icon_points=32, hidden_widths=(32, 32))
    change = dataclasses.replace
    return {
        "ssd_native": (moving, fixed, base, {}),
        "ssd_torch": (moving, fixed, change(base, backend="torch"), {}),
        "ssd_masks": (moving, fixed, base, {"moving_mask": moving > 0.5, "fixed_mask": fixed > 0.5}),
        "ncc_all_voxels": (moving, fixed, change(base, similarity="ncc", similarity_points=None), {}),
        "lncc_patches": (moving, fixed, change(base, similarity="lncc", lncc_patches=3, lncc_patch_size=10,
                                               lncc_window=5, foreground="auto"), {}),
        "icon": (moving, fixed, change(base, icon_weight=1.0), {}),
        # the 3D preset of the time the pins were written (the preset itself may change)
        "preset_3d": (moving3, fixed3, FitConfig(iterations=8, similarity="ncc", blur_sigmas=(4.0, 2.0, 1.0, 0.0),
                                                 blur_in_mm=True, finest_cell_voxels=3.5, gradient_icon_weight=2.0,
                                                 foreground="auto", similarity_points=256,
                                                 gradient_icon_points=32, hidden_widths=(32, 32)), {}),
        "rollback": (moving, fixed, change(base, learning_rate=3e3, on_divergence="rollback",
                                           rollback_factor=1e-3), {}),
    }


def run() -> dict:
    out = {}
    for name, (moving, fixed, config, masks) in cases().items():
        result = fit_pair(moving, fixed, config, progress=False, **masks)
        out[name] = {"history": result.history, "rollbacks": result.metadata["rollbacks"]}
    moving, fixed, config, _ = cases()["ssd_native"]
    out["pairs"] = [{"history": r.history} for r in fit_pairs([moving, fixed], [fixed, moving], config,
                                                              progress=False)]
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("pinned_fits.json"))
    path.write_text(json.dumps(run(), indent=1) + "\n")
    print(f"wrote {path}")
