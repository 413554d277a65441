"""Profile fit_pair's training step with torch.profiler (where the time goes, per op).

    python benchmarks/profile_step.py                          # CPU, 2D, backend auto
    python benchmarks/profile_step.py --device cuda --dim 3 --backend native

Measured on an H100 (2D and 3D, native backend): about 1.3 ms of GPU work per step against
15 ms of wall time, i.e. the step is bound by kernel launches and autograd overhead.
"""

from __future__ import annotations

import argparse
import time

import torch

from neuralfield_reg.config import default_encoding
from neuralfield_reg.geometry.coords import sample
from neuralfield_reg.transforms.fields import MapPair
from neuralfield_reg.losses import inverse_consistency_terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2, choices=(2, 3))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--points", type=int, default=4096, help="similarity points per direction")
    parser.add_argument("--rows", type=int, default=15, help="rows of the profile tables")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = (128, 128) if args.dim == 2 else (64, 64, 64)
    maps = MapPair(args.dim, encoding=default_encoding(shape), hidden_widths=(32, 32), backend=args.backend).to(device)
    optimizer = torch.optim.Adam(maps.parameters(), lr=1e-3)
    image = torch.rand(shape, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        a, b = maps(torch.rand(args.points, args.dim, device=device), torch.rand(args.points, args.dim, device=device))
        loss = sample(image, a).square().mean() + sample(image, b).square().mean()
        loss = loss + 0.5 * inverse_consistency_terms(maps, torch.rand(512, args.dim, device=device))["gradient_icon"]
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(5):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(10):
            step()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profile.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=45))
    start = time.perf_counter()
    for _ in range(20):
        step()
    print(f"backend {maps.backend}: {1000 * (time.perf_counter() - start) / 20:.1f} ms per step (wall)")


if __name__ == "__main__":
    main()
