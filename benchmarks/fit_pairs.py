"""Pairs per second of batched fitting (fit_pairs) against one pair at a time, same quality.

    python benchmarks/fit_pairs.py                         # CPU, 128^2, B = 1, 4, 16
    python benchmarks/fit_pairs.py --device cuda --batches 1 4 16 64

For each batch size B the first B hollow triangle/circle pairs (generator seed 2024) are fitted
in one fit_pairs call with the default FitConfig; the table gives seconds, pairs per second and
the ratio to B = 1 from the same run, with the mean Dice and ICE of the batch (quality should
not depend on B).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import neuralfield_reg as nfr
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.metrics import mean_dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=None, help="override FitConfig.iterations")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = nfr.FitConfig(backend=args.backend)
    if args.iterations:
        config = dataclasses.replace(config, iterations=args.iterations)
    pairs = shape_pairs(max(args.batches), args.size, hollow=True, seed=2024)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.size}^2 hollow pairs, "
          f"{config.iterations} iterations, backend {args.backend}")
    # Warm-up (CUDA context, kernel builds and caches) so that B = 1 is not charged for it.
    nfr.fit_pairs([pairs[0].moving], [pairs[0].fixed], dataclasses.replace(config, iterations=2),
                  device=args.device, progress=False)
    print(f"{'B':>4} {'seconds':>8} {'pairs/s':>8} {'vs B=1':>7} {'Dice':>6} {'ICE px':>7}")
    baseline = None
    for batch in args.batches:
        chosen = pairs[:batch]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = nfr.fit_pairs([p.moving for p in chosen], [p.fixed for p in chosen], config,
                                device=args.device, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rate = batch / seconds
        baseline = baseline or rate
        dice = np.mean([mean_dice(r.warp(p.moving_labels, mode="nearest"), p.fixed_labels)
                        for r, p in zip(results, chosen)])
        ice = np.mean([r.inverse_consistency_error() for r in results])
        print(f"{batch:>4} {seconds:>8.1f} {rate:>8.3f} {rate / baseline:>6.2f}x {dice:>6.3f} {ice:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
