"""Fit time and peak memory of fit_pair on synthetic 3D volumes (CPU by default).

    python benchmarks/volume_3d.py                           # 64^3 (500 its), 160x384x384 (100 its)
    python benchmarks/volume_3d.py --cases 64x64x64:500 --device cuda --backends native torch

A case is ``DxHxW:ITERATIONS``: two ellipsoidal shells with different centres and radii. Each
case runs in its own subprocess, so its peak memory (resident set on the CPU, allocated on
CUDA) is its own. Prints the fit time, seconds per iteration (affine stage included), the time
of the dense Jacobian determinant over every voxel, the folding fraction and the peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import numpy as np
import torch

import neuralfield_reg as nfr
from _timing import peak_memory_gib, run_isolated  # benchmarks/_timing.py, next to this script
from neuralfield_reg.metrics import folding_fraction


def shells(shape):
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in shape], indexing="ij"))

    def shell(centre, radii):
        r = np.sqrt(sum(((grid[k] - centre[k]) / radii[k]) ** 2 for k in range(3)))
        return np.exp(-((r - 1.0) / 0.05) ** 2).astype(np.float32)
    return shell((0.5, 0.48, 0.52), (0.30, 0.35, 0.28)), shell((0.52, 0.5, 0.5), (0.26, 0.30, 0.33))


def one_case(shape, iterations: int, device: str, backend: str) -> dict:
    moving, fixed = shells(shape)
    config = dataclasses.replace(nfr.FitConfig(), iterations=iterations, backend=backend)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # outside the timed fit: the CUDA context and loading the compiled kernels
    torch.zeros(1, device=device)
    nfr.encoders.make_encoding(3, backend=backend, device=device)
    start = time.perf_counter()
    result = nfr.fit_pair(moving, fixed, config, device=device, progress=False)
    sync()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    determinant = result.jacobian_determinant()
    sync()
    dense_s = time.perf_counter() - start
    peak = peak_memory_gib(torch.device(device))
    return {"fit_s": fit_s, "per_iteration_s": fit_s / iterations, "dense_det_s": dense_s,
            "folds": folding_fraction(determinant), "peak_gib": peak, "backend": result.backend}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["64x64x64:500", "160x384x384:100"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=nfr.encoders.BACKENDS)
    parser.add_argument("--one", help=argparse.SUPPRESS)       # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        grid, iterations = args.one.split(":")
        print(json.dumps(one_case(tuple(int(n) for n in grid.split("x")), int(iterations), args.device,
                                  args.backends[0])))
        return
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, default FitConfig")
    print(f"{'case':>17} {'backend':>8} {'fit s':>8} {'s / it':>8} {'dense det J s':>14} {'folds %':>8} "
          f"{'peak GiB':>9}")
    for case, backend in itertools.product(args.cases, args.backends):
        row = run_isolated(__file__, ["--one", case, "--device", args.device, "--backends", backend])
        if isinstance(row, str):
            print(f"{case:>17} {backend:>8} failed: {row}")
            continue
        print(f"{case:>17} {row['backend']:>8} {row['fit_s']:>8.1f} {row['per_iteration_s']:>8.3f} "
              f"{row['dense_det_s']:>14.1f} {100 * row['folds']:>8.4f} {row['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
