"""Accuracy and time of fit_pair on hollow triangles/circles (the ICON benchmark family).

    python benchmarks/shapes_2d.py                      # 20 pairs at 128^2, default FitConfig
    python benchmarks/shapes_2d.py --pairs 5 --set iterations=300 --set gradient_icon_weight=0.2
    python benchmarks/shapes_2d.py --preset 2d-scan          # another preset (--config FILE.json on top)

Prints one row per pair and a summary: Dice before/after (filled-shape labels), folding
fraction (share of pixels with det J <= 0), inverse-consistency error (pixels), seconds.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

import neuralfield_reg as nfr
from neuralfield_reg._cuda_ext import NativeBuildError, load as load_kernels
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.metrics import folding_fraction, mean_dice


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=2024, help="seed of the pair generator")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a FitConfig field (repeatable)")
    parser.add_argument("--config", type=str, default=None, help="JSON file of FitConfig fields (as nfreg --config)")
    parser.add_argument("--preset", default="2d", help="FitConfig.preset the overrides apply to (default 2d)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = nfr.FitConfig.preset(args.preset)
    if args.config:
        config = nfr.FitConfig.from_dict(json.loads(Path(args.config).read_text()), base=config)
    config = dataclasses.replace(config, **parse_overrides(args.set))
    pairs = shape_pairs(args.pairs, args.size, hollow=True, seed=args.seed)
    print(f"{args.pairs} hollow pairs at {args.size}^2, seed {args.seed}, torch threads "
          f"{torch.get_num_threads()}; overrides: {parse_overrides(args.set) or 'none'}")
    header = f"{'pair':>4} {'dice before':>11} {'dice after':>10} {'folds %':>8} {'ICE px':>7} {'seconds':>8}"
    print(header)
    try:
        load_kernels()              # built now, untimed (the first fit would build them otherwise)
    except NativeBuildError:
        pass                        # fit_pair says so and uses the pure-PyTorch backend
    rows = []
    for index, pair in enumerate(pairs):
        start = time.perf_counter()
        result = nfr.fit_pair(pair.moving, pair.fixed, config, seed=index, progress=False)
        seconds = time.perf_counter() - start
        warped = result.warp(pair.moving_labels, mode="nearest")
        row = (mean_dice(pair.moving_labels, pair.fixed_labels), mean_dice(warped, pair.fixed_labels),
               100.0 * folding_fraction(result.jacobian_determinant()), result.inverse_consistency_error(),
               seconds)
        rows.append(row)
        print(f"{index:>4} {row[0]:>11.3f} {row[1]:>10.3f} {row[2]:>8.3f} {row[3]:>7.3f} {row[4]:>8.1f}", flush=True)
    values = np.array(rows)
    print("-" * len(header))
    print(f"{'mean':>4} {values[:, 0].mean():>11.3f} {values[:, 1].mean():>10.3f} {values[:, 2].mean():>8.3f} "
          f"{values[:, 3].mean():>7.3f} {values[:, 4].mean():>8.1f}")
    print(f"{'min':>4} {values[:, 0].min():>11.3f} {values[:, 1].min():>10.3f} {values[:, 2].min():>8.3f} "
          f"{values[:, 3].min():>7.3f} {values[:, 4].min():>8.1f}")
    print(f"{'max':>4} {values[:, 0].max():>11.3f} {values[:, 1].max():>10.3f} {values[:, 2].max():>8.3f} "
          f"{values[:, 3].max():>7.3f} {values[:, 4].max():>8.1f}")


if __name__ == "__main__":
    main()
