"""fit_pair on a GPU with and without CUDA graphs, side by side in one run.

    python benchmarks/gpu_fit.py                              # 2D 128^2, 2 mm brains, 160x384x384
    python benchmarks/gpu_fit.py --cases 2d brain --rounds 3
    python benchmarks/gpu_fit.py --device cpu --iterations 20 --cases 2d   # a smoke run without a GPU

Cases: ``2d``, a hollow triangle/circle pair at 128^2 (the 2D preset; Dice of the filled shapes);
``brain``, the packaged Colin27 -> MNI152 pair at 2 mm (the 3D preset, world-space start; mean AAL
Dice); ``big``, two ellipsoidal shells at 160x384x384 (the 3D preset). One untimed fit first (CUDA
start-up, kernel loading), then ``--rounds`` rounds that alternate ``cuda_graphs=True`` and
``False``. Prints, per case and setting, the median wall time of ``fit_pair`` (affine stage
included, GPU synchronised), that time per field-stage iteration, Dice and the folding fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

import neuralfield_reg as nfr
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.data.brain import load_brain_pair
from neuralfield_reg.geometry import Grid, Image
from neuralfield_reg.metrics import dice, folding_fraction, mean_dice
from volume_3d import shells  # benchmarks/volume_3d.py, next to this script


def make_case(name: str):
    """(moving, fixed, config, score): ``score(result)`` is the case's Dice."""
    if name == "2d":
        pair = shape_pairs(1, 128, hollow=True, seed=2024)[0]
        return (pair.moving, pair.fixed, nfr.FitConfig.preset("2d"),
                lambda r: mean_dice(r.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels))
    if name == "brain":
        pair = load_brain_pair(2)
        grid = Grid(pair.moving.shape, pair.affine, name="brain pair")

        def score(result):
            after = dice(result.warp(pair.moving_labels, mode="label"), pair.fixed_labels)
            return float(np.mean([after[k] for k in pair.label_names]))
        return Image(pair.moving, grid), Image(pair.fixed, grid), nfr.FitConfig.preset("3d"), score
    if name == "big":
        moving, fixed = shells((160, 384, 384))
        return moving, fixed, nfr.FitConfig.preset("3d"), lambda r: float("nan")
    raise ValueError(f"cases: unknown case {name!r}; expected 2d, brain or big")


def timed_fit(moving, fixed, config, device: str):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    result = nfr.fit_pair(moving, fixed, config, device=device, progress=False)
    sync()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["2d", "brain", "big"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None, help="override the presets' iterations")
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        moving, fixed, config, score = make_case(name)
        if args.iterations is not None:
            config = dataclasses.replace(config, iterations=args.iterations)
        timed_fit(moving, fixed, config, args.device)                   # start-up, not timed
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            for graphs in (True, False):
                result, seconds = timed_fit(moving, fixed, dataclasses.replace(config, cuda_graphs=graphs),
                                            args.device)
                runs[graphs].append((seconds, result))
        for graphs in (True, False):
            seconds = statistics.median(s for s, _ in runs[graphs])
            result = runs[graphs][-1][1]
            step_ms = 1000 * seconds / config.iterations
            folds = folding_fraction(result.jacobian_determinant())
            rows.append((name, "on" if graphs else "off", seconds, step_ms, score(result), folds))
            print(f"{name:6s} graphs {rows[-1][1]:3s}  {seconds:7.2f} s  {step_ms:6.2f} ms/it  "
                  f"Dice {rows[-1][4]:.3f}  folds {folds:.2e}", flush=True)
    print(f"\n{'case':6s} {'graphs':>6s} {'fit s':>8s} {'ms/it':>8s} {'Dice':>6s} {'folds':>9s}   "
          f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"median of {args.rounds})")
    for name, graphs, seconds, step_ms, dice_value, folds in rows:
        print(f"{name:6s} {graphs:>6s} {seconds:8.2f} {step_ms:8.2f} {dice_value:6.3f} {folds:9.2e}")
    for name in args.cases:
        on, off = [r[2] for r in rows if r[0] == name]
        print(f"{name}: graphs take {on / off:.2f} of the eager time")


if __name__ == "__main__":
    main()
