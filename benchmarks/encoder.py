"""Speed of the hash-grid backends: encoder forward, forward+backward, and the fit's training step.

    python benchmarks/encoder.py                         # CPU, 2D, every available backend
    python benchmarks/encoder.py --device cuda --dim 3 --points 1048576
    python benchmarks/encoder.py --fit                   # also fit 4 hollow 128^2 pairs per backend

All backends run in the same process, one after the other, and the table gives each one's ratio to
the torch backend measured in this run (these machines are noisy: compare within a run).
The training step is the one fit_pair runs: similarity on ``points`` random voxels per direction
and the autograd gradient-ICON on ``points / 8`` random points, backward, Adam.
"""

from __future__ import annotations

import argparse

import torch

from _timing import step_times  # benchmarks/_timing.py, next to this script
from neuralfield_reg.config import default_encoding
from neuralfield_reg.coords import sample
from neuralfield_reg.encoders import BackendUnavailableError, resolve_backend
from neuralfield_reg.fields import MapPair
from neuralfield_reg.losses import inverse_consistency_terms


def timed(function, device, repeats: int) -> float:
    """Median seconds of ``function()`` after two warm-up calls."""
    times = step_times(function, device, repeats)
    return sorted(times)[len(times) // 2]


def measure(backend: str, device: torch.device, dim: int, points: int, repeats: int) -> dict:
    torch.manual_seed(0)
    shape = (128, 128) if dim == 2 else (64, 64, 64)
    maps = MapPair(dim, encoding=default_encoding(shape), hidden_widths=(32, 32), backend=backend).to(device)
    with torch.no_grad():
        for parameter in maps.parameters():
            parameter.normal_(0, 0.01)
    encoding = maps.fields.encoding
    image = torch.rand(shape, device=device)
    x = torch.rand(points, dim, device=device)
    optimizer = torch.optim.Adam(maps.parameters(), lr=1e-3)

    def forward():
        with torch.no_grad():
            encoding(x, 0)

    def forward_backward():
        xg = x.clone().requires_grad_(True)
        gradients = torch.autograd.grad(encoding(xg, 0).square().sum(), [xg, encoding.params])
        return gradients

    def training_step():
        optimizer.zero_grad(set_to_none=True)
        mapped_B, mapped_A = maps(torch.rand(points, dim, device=device), torch.rand(points, dim, device=device))
        loss = sample(image, mapped_B).square().mean() + sample(image, mapped_A).square().mean()
        consistency = inverse_consistency_terms(maps, torch.rand(max(1, points // 8), dim, device=device))
        (loss + 0.5 * consistency["gradient_icon"]).backward()
        optimizer.step()

    return {"forward": points / timed(forward, device, repeats),
            "forward_backward": points / timed(forward_backward, device, repeats),
            "step_ms": 1000 * timed(training_step, device, repeats)}


def fit_benchmark(backend: str, device: torch.device, pairs: int) -> tuple[float, float]:
    import neuralfield_reg as nfr
    from neuralfield_reg.data import shape_pairs
    from neuralfield_reg.metrics import mean_dice

    seconds, dice = [], []
    for index, pair in enumerate(shape_pairs(pairs, 128, seed=2024)):
        config = nfr.FitConfig(backend=backend)
        result = nfr.fit_pair(pair.moving, pair.fixed, config, device=device, seed=index, progress=False)
        seconds.append(result.elapsed_s)
        dice.append(mean_dice(result.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels))
    return sum(seconds) / len(seconds), sum(dice) / len(dice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=2, choices=(2, 3))
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fit", type=int, default=0, metavar="PAIRS",
                        help="also fit this many hollow 128^2 pairs with each backend (seconds and Dice)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.dim}D, {args.points} points; torch {torch.__version__}")
    rows = {}
    for backend in ("torch", "native", "tcnn"):
        try:
            resolve_backend(backend, device)
        except BackendUnavailableError as error:
            print(f"  {backend}: skipped ({error})")
            continue
        rows[backend] = measure(backend, device, args.dim, args.points, args.repeats)
        if args.fit:
            rows[backend]["fit_s"], rows[backend]["dice"] = fit_benchmark(backend, device, args.fit)
    base = rows["torch"]
    header = f"{'backend':8} {'fwd Mpts/s':>11} {'x':>6} {'fwd+bwd Mpts/s':>15} {'x':>6} {'train step ms':>14} {'x':>6}"
    if args.fit:
        header += f" {'fit s/pair':>11} {'x':>6} {'Dice':>6}"
    print(header)
    for backend, row in rows.items():
        line = (f"{backend:8} {row['forward'] / 1e6:>11.2f} {row['forward'] / base['forward']:>6.2f} "
                f"{row['forward_backward'] / 1e6:>15.2f} {row['forward_backward'] / base['forward_backward']:>6.2f} "
                f"{row['step_ms']:>14.2f} {base['step_ms'] / row['step_ms']:>6.2f}")
        if args.fit:
            line += f" {row['fit_s']:>11.2f} {base['fit_s'] / row['fit_s']:>6.2f} {row['dice']:>6.3f}"
        print(line)


if __name__ == "__main__":
    main()
