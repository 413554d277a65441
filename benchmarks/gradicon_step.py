"""Seconds per training step and peak memory of the convolutional GradICON companion.

    python benchmarks/gradicon_step.py                      # CPU: 64^2 and 128^2 batch 32, 3D 64^3
    python benchmarks/gradicon_step.py --device cuda --cases 2d:128:32 3d:128:4

A case is ``DIM:SIZE:BATCH`` on the default 3-level model (:func:`gradicon.default_model`) with the
GradICON loss. Each case runs in its own subprocess so that its peak memory (resident set on
the CPU, allocated memory on CUDA) is its own. Also prints the network's parameter count.
"""

from __future__ import annotations

import argparse
import json

import torch

from _timing import peak_memory_gib, run_isolated, step_times  # benchmarks/_timing.py, next to this script
from neuralfield_reg import gradicon


def one_case(dim: int, size: int, batch: int, device: str, similarity: str, steps: int) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    shape = (size,) * dim
    model = gradicon.default_model(dim, shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    moving = torch.rand(batch, 1, *shape, device=device)
    fixed = torch.rand(batch, 1, *shape, device=device)
    generator = torch.Generator().manual_seed(0)

    def step():
        terms = gradicon.registration_loss(model, moving, fixed, similarity=similarity, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = step_times(step, device, steps)
    peak = peak_memory_gib(device)
    return {"median_s": sorted(times)[len(times) // 2], "min_s": min(times), "peak_gib": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["2d:64:32", "2d:128:32", "3d:64:2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--similarity", default="ssd", choices=["ssd", "ncc", "lncc"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)       # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        dim, size, batch = (int(v.rstrip("d")) for v in args.one.split(":"))
        print(json.dumps(one_case(dim, size, batch, args.device, args.similarity, args.steps)))
        return
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, loss gradicon, "
          f"similarity {args.similarity}, median of {args.steps} steps")
    print(f"{'case':>12} {'params':>9} {'s/step':>8} {'min s':>8} {'peak GiB':>9}")
    for case in args.cases:
        row = run_isolated(__file__, ["--one", case, "--device", args.device, "--similarity", args.similarity,
                                      "--steps", str(args.steps)])
        if isinstance(row, str):
            print(f"{case:>12} failed: {row}")
            continue
        print(f"{case:>12} {row['parameters']:>9,d} {row['median_s']:>8.3f} {row['min_s']:>8.3f} "
              f"{row['peak_gib']:>9.2f}")


if __name__ == "__main__":
    main()
