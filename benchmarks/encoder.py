"""Speed of the hash-grid backends: encoder forward, forward+backward, and the fit's training step.

    python benchmarks/encoder.py                         # CPU, 2D, every available backend
    python benchmarks/encoder.py --device cuda --dim 3 --points 1048576
    python benchmarks/encoder.py --fit 4                 # also fit 4 hollow 128^2 pairs per row

Rows: ``torch`` (the reference), ``native`` (the compiled encoder inside the per-operation autograd
graph, with the double backward for the penalty), ``native-fused`` (the fused CPU kernels of
``neuralfield_reg/encoders/fused.py``: the SSD similarity of both maps, and the gradient-ICON penalty, each
with its gradient in one kernel, called as ``fused_loss_gradients``: the gradients summed in one set
of buffers and assigned to the parameters without an autograd graph; the fit's default with the
native backend on the CPU) and ``tcnn``.
The encoder columns time the encoding alone, which native-fused does not have (``-``).

The training step is the one fit_pair runs: both maps of a pair on ``points`` random voxels per
direction with SSD against an image (native-fused: in the fused similarity kernel, which also
leaves out points mapped outside the image), the gradient-ICON penalty on ``points / 8`` random
points, backward, Adam. The rows' steps are timed in turn, round-robin in bursts of 5 consecutive
steps (as a fit runs them; each burst's untimed first step warms the caches after the other rows),
and each row's median is compared with the torch row's (these machines are noisy: only compare
within a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from _timing import step_times  # benchmarks/_timing.py, next to this script
from neuralfield_reg.config import default_encoding
from neuralfield_reg.geometry.coords import identity_grid, sample_batch
from neuralfield_reg.encoders import BackendUnavailableError, resolve_backend
from neuralfield_reg.transforms.fields import MapPairs
from neuralfield_reg._optim import make_adam
from neuralfield_reg.encoders.fused import PenaltyInputs, SimilarityInputs, fused_loss_gradients
from neuralfield_reg.losses import inverse_consistency_terms

ROWS = {"torch": ("torch", False), "native": ("native", False), "native-fused": ("native", True),
        "tcnn": ("tcnn", False)}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@dataclasses.dataclass
class Row:
    encoder_forward: object            # callables, or None where the row has no encoder of its own
    encoder_forward_backward: object
    training_step: object


def make_row(backend: str, fused: bool, device: torch.device, dim: int, points: int) -> Row:
    torch.manual_seed(0)
    shape = (128, 128) if dim == 2 else (64, 64, 64)
    maps = MapPairs(dim, 1, encoding=default_encoding(shape), hidden_widths=(32, 32), backend=backend).to(device)
    maps.fields.use_fused = fused
    with torch.no_grad():
        for parameter in maps.parameters():
            parameter.normal_(0, 0.01)
    encoding = maps.fields.encoding
    image = torch.rand(1, 1, *shape, device=device)
    x = torch.rand(points, dim, device=device)
    optimizer = make_adam(list(maps.parameters()), 1e-3)

    def forward():
        with torch.no_grad():
            encoding(x, 0)

    def forward_backward():
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(encoding(xg, 0).square().sum(), [xg, encoding.params])

    grid = identity_grid(shape, device=device).reshape(-1, dim)
    zeros = torch.zeros(1, points, device=device)

    def voxels():              # random voxels in voxel order, drawn as fit_pair draws them
        index = torch.randint(grid.shape[0], (1, points), device=device)
        index = (torch.from_numpy(np.sort(index.numpy(), axis=1)) if device.type == "cpu"
                 else index.sort(dim=1).values)
        return grid.index_select(0, index.reshape(-1)).reshape(1, points, dim)

    def training_step():
        optimizer.zero_grad(set_to_none=True)
        points_B, points_A = voxels(), voxels()
        penalty_points = torch.rand(1, max(1, points // 8), dim, device=device)
        if fused:                          # as fit_pair: both kernels' loss and gradients, no autograd graph
            inputs = SimilarityInputs(image[:, 0], image[:, 0], points_B, zeros, points_A, zeros)
            gradients = fused_loss_gradients(maps, inputs, PenaltyInputs(penalty_points, 0.5))[-1]
            for parameter, gradient in zip(maps.fields.parameters(), gradients, strict=True):
                parameter.grad = gradient
        else:
            mapped_B, mapped_A = maps(points_B, points_A)
            similarity = sample_batch(image, mapped_B).square().mean() + sample_batch(image, mapped_A).square().mean()
            (similarity + 0.5 * inverse_consistency_terms(maps, penalty_points)["gradient_icon"]).sum().backward()
        optimizer.step()

    if fused:
        return Row(None, None, training_step)
    return Row(forward, forward_backward, training_step)


def fit_benchmark(backend: str, fused: bool, device: torch.device, pairs: int) -> tuple[float, float]:
    import neuralfield_reg as nfr
    from neuralfield_reg.data import shape_pairs
    from neuralfield_reg.metrics import mean_dice

    seconds, dice = [], []
    for index, pair in enumerate(shape_pairs(pairs, 128, seed=2024)):
        config = nfr.FitConfig(backend=backend, fused_kernels=fused)
        start = time.perf_counter()
        result = nfr.fit_pair(pair.moving, pair.fixed, config, device=device, seed=index, progress=False)
        seconds.append(time.perf_counter() - start)
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
    rows: dict[str, Row] = {}
    for label, (backend, fused) in ROWS.items():
        try:
            resolve_backend(backend, device)
        except BackendUnavailableError as error:
            print(f"  {label}: skipped ({error})")
            continue
        if fused and device.type != "cpu":
            print(f"  {label}: skipped (the fused kernels are CPU kernels)")
            continue
        rows[label] = make_row(backend, fused, device, args.dim, args.points)
    results: dict[str, dict[str, float]] = {label: {} for label in rows}
    for label, row in rows.items():
        if row.encoder_forward is not None:
            results[label]["forward"] = args.points / median(step_times(row.encoder_forward, device, args.repeats))
            results[label]["forward_backward"] = args.points / median(
                step_times(row.encoder_forward_backward, device, args.repeats))
    steps: dict[str, list[float]] = {label: [] for label in rows}
    for row in rows.values():                   # warm-up
        step_times(row.training_step, device, 0, warmup=2)
    # Round-robin, so that every row sees the same machine state, in bursts of steps run back to
    # back as a fit runs them: the first step of a burst (after another row's steps, with caches and
    # the allocator in that row's state) is not timed.
    for _ in range(args.repeats):
        for label, row in rows.items():
            steps[label] += step_times(row.training_step, device, 5, warmup=1)
    for label in rows:
        results[label]["step_ms"] = 1000 * median(steps[label])
        if args.fit:
            backend, fused = ROWS[label]
            results[label]["fit_s"], results[label]["dice"] = fit_benchmark(backend, fused, device, args.fit)

    base = results["torch"]

    def rate(label: str, key: str) -> str:
        if key not in results[label]:
            return f"{'-':>11} {'-':>6}"
        return f"{results[label][key] / 1e6:>11.2f} {results[label][key] / base[key]:>6.2f}"

    header = f"{'row':13} {'fwd Mpts/s':>11} {'x':>6} {'f+b Mpts/s':>11} {'x':>6} {'step ms':>8} {'x':>6}"
    if args.fit:
        header += f" {'fit s/pair':>11} {'x':>6} {'Dice':>6}"
    print(header)
    for label, row in results.items():
        line = (f"{label:13} {rate(label, 'forward')} {rate(label, 'forward_backward')} "
                f"{row['step_ms']:>8.2f} {base['step_ms'] / row['step_ms']:>6.2f}")
        if args.fit:
            line += f" {row['fit_s']:>11.2f} {base['fit_s'] / row['fit_s']:>6.2f} {row['dice']:>6.3f}"
        print(line)

if __name__ == "__main__":
    main()
