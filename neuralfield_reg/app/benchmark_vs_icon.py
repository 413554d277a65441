"""Per-pair neural fields against convolutional GradICON and ICON on the same held-out pairs
(``nfreg benchmark``, ``demos/benchmark_vs_icon.py``).

Datasets (``--dataset``):
  shapes2d   hollow triangles/circles at 128^2 (50 held-out pairs; networks trained at 64^2)
  bodies3d   deformed ellipsoids with two inner spheres at 64^3, labels 1-3 (8 held-out pairs;
             networks trained at 32^3)
  brain      the real Colin27 -> MNI152 pair at 2 mm with 116 AAL labels (one pair; the neural
             fields use BRAIN_CONFIG (below) and brain masks; there is no offline
             training set of real pairs for the networks, so only the nf_* methods run)

Methods (``--methods``):
  nf_gradicon   fit_pairs with the autograd gradient-ICON penalty (the library's default)
  nf_icon       the same field with plain ICON instead (``--nf-icon-weight``)
  nf_none       the same field with no inverse-consistency term
  conv_gradicon, conv_icon
                the companion network trained for ``--train-minutes`` each on a training split
                (at ``--train-size``; the maps are functions of unit coordinates, so they apply
                to the held-out pairs at ``--size``), then registering each pair, and again with
                ``--finetune-steps`` steps of per-pair fine-tuning (``_ft`` rows)

The ablations (nf_icon, nf_none) and the fine-tuned rows run on the first ``--subset-pairs``
pairs (the table's ``pairs`` column says how many); ``pairs.csv`` has every pair's numbers so
any method can be compared on the same subset.

Writes ``table.md``, ``table.csv``, ``pairs.csv`` and ``pairs.png`` (fixed, moving and every
method's warped moving image with its deformation grid, middle slices in 3D) to ``--out``.
Per pair: Dice (mean over labels, and per label), folding fraction, mean |det J - 1|,
inverse-consistency error (voxels), seconds. Training time is shown separately and amortised
over the held-out pairs. Peak memory: the process's resident peak so far (CPU; it never goes
down, so later rows carry earlier peaks) or the method's peak allocated GPU memory (CUDA).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .. import gradicon, metrics
from ..config import FitConfig
from ..data import ShapePairDataset, shape_pairs
from ..data.brain import brain_mask, load_brain_pair
from ..encoders import HashGridConfig
from ..data.shapes import ShapePair
from ..data.shapes3d import body_pairs
from ..registration.fit import fit_pairs

# The neural fields' settings on the brain pair in docs/benchmarks.md (c), with brain masks: from
# before the 3D preset, kept so that table can be rerun as it was made. No affine stage (the pair
# is world-aligned), blur 3 voxels at first, gradient-ICON weight 0.1, learning rate 0.03, the
# finest hash-grid level at 109 (the 2 mm grid's size).
BRAIN_CONFIG = FitConfig(iterations=400, learning_rate=0.03, gradient_icon_weight=0.1,
                         blur_sigmas=(3.0, 1.5, 0.75, 0.0), affine=None,
                         encoding=HashGridConfig.from_resolutions(4, 109, 8, log2_hashmap_size=19))

METHODS = ("nf_gradicon", "nf_icon", "nf_none", "conv_gradicon", "conv_icon")
# Per dataset: dimension, size, held-out pairs, subset, training pairs, training size, NF batch.
DATASETS = {"shapes2d": dict(dim=2, size=128, pairs=50, subset_pairs=16, train_pairs=2000, train_size=64,
                             nf_batch=16),
            "bodies3d": dict(dim=3, size=64, pairs=8, subset_pairs=8, train_pairs=200, train_size=32,
                             nf_batch=4),
            "brain": dict(dim=3, size=91, pairs=1, subset_pairs=1, train_pairs=1, train_size=32, nf_batch=1)}


def make_pairs(dataset: str, n: int, size: int, seed: int) -> list:
    if dataset == "shapes2d":
        return shape_pairs(n, size, hollow=True, seed=seed)
    if dataset == "brain":
        brain = load_brain_pair(2)
        return [ShapePair(brain.moving, brain.fixed, brain.moving_labels, brain.fixed_labels)]
    return body_pairs(n, size, seed=seed)


def peak_memory_gib(device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident set (Linux), in GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20          # KiB -> GiB


def score(result, pair) -> dict[str, float]:
    determinant = result.jacobian_determinant()
    per_label = metrics.dice(result.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels)
    return {"dice": float(np.mean(list(per_label.values()))),
            **{f"dice_{label}": value for label, value in per_label.items()},
            "folds": metrics.folding_fraction(determinant),
            "abs_det_minus_1": float(np.abs(determinant - 1.0).mean()),
            "ice": result.inverse_consistency_error()}


def neural_fields(pairs, config, batch: int, device: str, masks: bool = False) -> tuple[list, float]:
    """fit_pairs in batches (with the images' dilated foregrounds as masks when ``masks``);
    returns the results and the seconds per pair."""
    results, start = [], time.perf_counter()
    for first in range(0, len(pairs), batch):
        chunk = pairs[first:first + batch]
        mask_lists = {f"{kind}_masks": [brain_mask(getattr(p, kind)) for p in chunk] if masks else None
                      for kind in ("moving", "fixed")}
        results += fit_pairs([p.moving for p in chunk], [p.fixed for p in chunk], config, device=device,
                             seed=first, progress=False, **mask_lists)
    return results, (time.perf_counter() - start) / len(pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes2d")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pairs", type=int, help="held-out pairs (default: 50 in 2D, 8 in 3D)")
    parser.add_argument("--subset-pairs", type=int,
                        help="pairs for the ablations and the fine-tuned rows (default: 16 in 2D, 8 in 3D)")
    parser.add_argument("--size", type=int, help="held-out image size (default: 128 in 2D, 64 in 3D)")
    parser.add_argument("--seed", type=int, default=2024, help="held-out pair generator seed")
    parser.add_argument("--nf-iterations", type=int, default=None, help="override FitConfig.iterations")
    parser.add_argument("--nf-gradicon-weight", type=float, default=None,
                        help="override FitConfig.gradient_icon_weight of nf_gradicon")
    parser.add_argument("--nf-icon-weight", type=float, default=100.0)
    parser.add_argument("--nf-batch", type=int, help="pairs per fit_pairs call (default: 16 in 2D, 4 in 3D)")
    parser.add_argument("--train-pairs", type=int, help="training pairs (default: 2000 in 2D, 200 in 3D)")
    parser.add_argument("--train-size", type=int, help="training image size (default: 64 in 2D, 32 in 3D)")
    parser.add_argument("--train-minutes", type=float, default=3.0, help="training budget per network")
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--figure-pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: out/benchmark_DATASET)")


def run(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark described by parsed :func:`add_arguments` options; returns the rows."""
    settings = DATASETS[args.dataset]
    for key in ("pairs", "subset_pairs", "size", "nf_batch", "train_pairs", "train_size"):
        if getattr(args, key) is None:
            setattr(args, key, settings[key])
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(args, key)}")
    dim = settings["dim"]
    if args.dataset == "brain":
        conv = [m for m in args.methods if m.startswith("conv_")]
        if conv:
            print(f"dataset brain: skipping {', '.join(conv)} (no offline training set of real pairs)")
        args.methods = [m for m in args.methods if m.startswith("nf_")]
        if not args.methods:
            raise ValueError("--methods: the brain dataset runs only the nf_* methods")
    out = Path(args.out) if args.out is not None else Path(f"out/benchmark_{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.dataset, args.pairs, args.size, args.seed)
    subset = pairs[:min(args.subset_pairs, len(pairs))]
    base = BRAIN_CONFIG if args.dataset == "brain" else FitConfig()
    if args.nf_iterations is not None:
        base = dataclasses.replace(base, iterations=args.nf_iterations)
    nf_configs = {"nf_gradicon": base if args.nf_gradicon_weight is None
                  else dataclasses.replace(base, gradient_icon_weight=args.nf_gradicon_weight),
                  "nf_icon": dataclasses.replace(base, gradient_icon_weight=0.0, icon_weight=args.nf_icon_weight),
                  "nf_none": dataclasses.replace(base, gradient_icon_weight=0.0, icon_weight=0.0)}
    rows, per_pair, examples = [], [], {}

    def add_row(name, results, evaluated, seconds, train_seconds=0.0):
        scores = [score(r, p) for r, p in zip(results, evaluated)]
        per_pair.extend({"method": name, "pair": i, **s} for i, s in enumerate(scores))
        dice = [s["dice"] for s in scores]
        labels = sorted({key for s in scores for key in s if key.startswith("dice_")})
        row = {"method": name, "pairs": len(evaluated), "dice_mean": float(np.mean(dice)),
               "dice_sd": float(np.std(dice)), "dice_min": float(np.min(dice)),
               **{key: float(np.nanmean([s.get(key, np.nan) for s in scores])) for key in labels},
               **{key: float(np.mean([s[key] for s in scores])) for key in ("folds", "abs_det_minus_1", "ice")},
               "seconds_per_pair": seconds, "training_seconds": train_seconds,
               "amortised_seconds_per_pair": seconds + train_seconds / len(pairs),
               "peak_gib": peak_memory_gib(args.device), "device": args.device, "backend": results[0].backend}
        rows.append(row)
        examples[name] = results[:args.figure_pairs]
        print(f"{name:>17}: Dice {row['dice_mean']:.3f} +- {row['dice_sd']:.3f} ({len(evaluated)} pairs), "
              f"folds {100 * row['folds']:.3f} %, ICE {row['ice']:.3f} voxels, {seconds:.2f} s/pair", flush=True)

    for name in [m for m in args.methods if m.startswith("nf_")]:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        evaluated = pairs if name == "nf_gradicon" else subset
        results, seconds = neural_fields(evaluated, nf_configs[name], args.nf_batch, args.device,
                                         masks=args.dataset == "brain")
        add_row(name, results, evaluated, seconds)

    conv = [m for m in args.methods if m.startswith("conv_")]
    if conv:
        train = ShapePairDataset.from_pairs(make_pairs(args.dataset, args.train_pairs, args.train_size,
                                                       args.seed + 1))
    for name in conv:
        loss = name.split("_", 1)[1]
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        network = gradicon.default_model(dim, (args.train_size,) * dim).to(args.device)
        history = gradicon.train(network, train, loss=loss, lam=1.0, similarity="ssd",
                                 batch_size=32 if dim == 2 else 4, time_budget_s=60 * args.train_minutes,
                                 progress=False)
        train_seconds = history["seconds"][-1] if history["seconds"] else 0.0
        for finetune, evaluated in ((0, pairs), (args.finetune_steps, subset))[:2 if args.finetune_steps else 1]:
            start = time.perf_counter()
            results = [gradicon.register(network, p.moving, p.fixed, finetune_steps=finetune, loss=loss,
                                         similarity="ssd", lam=1.0) for p in evaluated]
            add_row(name + ("_ft" if finetune else ""), results, evaluated,
                    (time.perf_counter() - start) / len(evaluated), train_seconds)

    before = [metrics.mean_dice(p.moving_labels, p.fixed_labels) for p in pairs]
    _write_tables(rows, per_pair, out, f"Before registration: Dice {np.mean(before):.3f} ± {np.std(before):.3f} "
                                       f"over the {len(pairs)} pairs.")
    if args.figure_pairs > 0:
        _figure(pairs[:min(args.figure_pairs, len(subset))], examples, out / "pairs.png")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'pairs.csv'}, {out / 'pairs.png'}")
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_tables(rows: list[dict], per_pair: list[dict], out: Path, footer: str) -> None:
    _write_csv(out / "table.csv", rows)
    _write_csv(out / "pairs.csv", per_pair)
    labels = sorted({key for row in rows for key in row if key.startswith("dice_") and key[5:].isdigit()},
                    key=lambda key: int(key[5:]))
    per_label = 1 < len(labels) <= 8            # many labels (AAL: 116): per label only in the CSVs
    lines = ["| method | pairs | Dice (mean ± sd) | min | " + ("Dice per label | " if per_label else "")
             + "folds % | mean abs(det J - 1) | ICE voxels | s / pair | training s | amortised s / pair | peak GiB |",
             "|" + "---|" * (11 + per_label)]
    for r in rows:
        label_cell = (" / ".join(f"{r.get(key, float('nan')):.3f}" for key in labels) + " | ") if per_label else ""
        lines.append(f"| {r['method']} | {r['pairs']} | {r['dice_mean']:.3f} ± {r['dice_sd']:.3f} | "
                     f"{r['dice_min']:.3f} | {label_cell}{100 * r['folds']:.3f} | {r['abs_det_minus_1']:.3f} | "
                     f"{r['ice']:.3f} | {r['seconds_per_pair']:.2f} | {r['training_seconds']:.0f} | "
                     f"{r['amortised_seconds_per_pair']:.2f} | {r['peak_gib']:.2f} |")
    lines += ["", footer]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _figure(pairs, examples: dict, path: Path) -> None:
    """Fixed, moving and each method's warped moving image with its grid (middle slice in 3D)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import plot_deformation_grid

    def middle(volume):
        return volume if volume.ndim == 2 else volume[volume.shape[0] // 2]

    shown = len(pairs)
    columns = 2 + len(examples)
    figure, axes = plt.subplots(shown, columns, figsize=(2.2 * columns, 2.3 * shown), squeeze=False)
    for i, pair in enumerate(pairs):
        axes[i, 0].imshow(middle(pair.fixed), cmap="gray")
        axes[i, 1].imshow(middle(pair.moving), cmap="gray")
        for j, (name, results) in enumerate(examples.items()):
            ax = axes[i, 2 + j]
            result = results[i]
            ax.imshow(middle(result.warp(pair.moving)), cmap="gray")
            grid = np.indices(result.fixed_shape).astype(np.float32) + result.displacement()
            if grid.shape[0] == 3:                     # the in-plane components of the middle slice
                grid = grid[1:, grid.shape[1] // 2]
            plot_deformation_grid(ax, grid, step=max(1.0, grid.shape[-1] / 16))
            if i == 0:
                ax.set_title(name, fontsize=8)
    axes[0, 0].set_title("fixed", fontsize=8)
    axes[0, 1].set_title("moving", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=60)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="benchmark_vs_icon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
