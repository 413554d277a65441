"""Per-pair neural fields against convolutional GradICON and ICON on the same held-out pairs.

    python demos/benchmark_vs_icon.py                        # 2D hollow shapes, defaults below
    python demos/benchmark_vs_icon.py --pairs 4 --train-minutes 1 --out out/quick

Methods (``--methods``):
  nf_gradicon   fit_pair with the autograd gradient-ICON penalty (the library's default)
  nf_icon       the same field with plain ICON instead (``--nf-icon-weight``)
  nf_none       the same field with no inverse-consistency term
  conv_gradicon, conv_icon
                the companion network trained for ``--train-minutes`` each on a training split
                (at ``--train-size``; the maps are functions of unit coordinates, so they apply
                to the held-out pairs at ``--size``), then registering each pair, and again with
                ``--finetune-steps`` steps of per-pair fine-tuning (``_ft`` rows)

Writes ``table.md``, ``table.csv`` and ``pairs.png`` (fixed, moving and every method's warped
moving image with its deformation grid, for the first pairs) to ``--out`` and prints the table.
Per pair: Dice of the filled-shape labels, folding fraction, mean |det J - 1|, inverse-
consistency error (pixels), seconds. Training time is shown separately and amortised over the
held-out pairs. Peak memory is the process's resident peak after the method (CPU) or the peak
allocated GPU memory of the method (CUDA).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import resource
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import neuralfield_reg as nfr  # noqa: E402
from neuralfield_reg import gradicon, metrics  # noqa: E402
from neuralfield_reg.data import ShapePairDataset, shape_pairs  # noqa: E402
from neuralfield_reg.viz import plot_deformation_grid  # noqa: E402

METHODS = ("nf_gradicon", "nf_icon", "nf_none", "conv_gradicon", "conv_icon")


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def score(result, pair) -> dict[str, float]:
    determinant = result.jacobian_determinant()
    return {"dice": metrics.mean_dice(result.warp(pair.moving_labels, mode="nearest"), pair.fixed_labels),
            "folds": metrics.folding_fraction(determinant),
            "abs_det_minus_1": float(np.abs(determinant - 1.0).mean()),
            "ice": result.inverse_consistency_error()}


def neural_fields(pairs, config, batch: int, device: str) -> tuple[list, float]:
    """fit_pairs in batches; returns the results and the seconds per pair."""
    results, start = [], time.perf_counter()
    for first in range(0, len(pairs), batch):
        chunk = pairs[first:first + batch]
        results += nfr.fit_pairs([p.moving for p in chunk], [p.fixed for p in chunk], config, device=device,
                                 seed=first, progress=False)
    return results, (time.perf_counter() - start) / len(pairs)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pairs", type=int, default=50, help="held-out pairs")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=2024, help="held-out pair generator seed")
    parser.add_argument("--nf-iterations", type=int, default=None, help="override FitConfig.iterations")
    parser.add_argument("--nf-icon-weight", type=float, default=100.0)
    parser.add_argument("--nf-batch", type=int, default=16, help="pairs per fit_pairs call")
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--train-minutes", type=float, default=5.0, help="training budget per network")
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--figure-pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/benchmark_vs_icon"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = shape_pairs(args.pairs, args.size, hollow=True, seed=args.seed)
    base = nfr.FitConfig() if args.nf_iterations is None else nfr.FitConfig(iterations=args.nf_iterations)
    nf_configs = {"nf_gradicon": base,
                  "nf_icon": dataclasses.replace(base, gradient_icon_weight=0.0, icon_weight=args.nf_icon_weight),
                  "nf_none": dataclasses.replace(base, gradient_icon_weight=0.0, icon_weight=0.0)}
    rows, examples = [], {}

    def add_row(name, results, seconds, train_seconds=0.0):
        scores = [score(r, p) for r, p in zip(results, pairs)]
        dice = [s["dice"] for s in scores]
        row = {"method": name, "dice_mean": float(np.mean(dice)), "dice_sd": float(np.std(dice)),
               "dice_min": float(np.min(dice)),
               **{key: float(np.mean([s[key] for s in scores])) for key in ("folds", "abs_det_minus_1", "ice")},
               "seconds_per_pair": seconds, "training_seconds": train_seconds,
               "amortised_seconds_per_pair": seconds + train_seconds / len(pairs),
               "peak_gib": peak_memory_gib(args.device), "device": args.device,
               "backend": results[0].backend}
        rows.append(row)
        examples[name] = results[:args.figure_pairs]
        print(f"{name:>17}: Dice {row['dice_mean']:.3f} +- {row['dice_sd']:.3f}, folds {100 * row['folds']:.3f} %, "
              f"ICE {row['ice']:.3f} px, {seconds:.2f} s/pair", flush=True)

    for name in [m for m in args.methods if m.startswith("nf_")]:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        results, seconds = neural_fields(pairs, nf_configs[name], args.nf_batch, args.device)
        add_row(name, results, seconds)

    conv = [m for m in args.methods if m.startswith("conv_")]
    if conv:
        train = ShapePairDataset(args.train_pairs, args.train_size, seed=args.seed + 1)
    for name in conv:
        loss = name.split("_", 1)[1]
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        network = gradicon.default_model(2, (args.train_size, args.train_size)).to(args.device)
        history = gradicon.train(network, train, loss=loss, lam=1.0, similarity="ssd",
                                 time_budget_s=60 * args.train_minutes, progress=False)
        train_seconds = history["seconds"][-1] if history["seconds"] else 0.0
        for finetune in (0, args.finetune_steps):
            start = time.perf_counter()
            results = [gradicon.register(network, p.moving, p.fixed, finetune_steps=finetune, loss=loss,
                                         similarity="ssd", lam=1.0) for p in pairs]
            add_row(name + ("_ft" if finetune else ""), results, (time.perf_counter() - start) / len(pairs),
                    train_seconds)

    fields = list(rows[0])
    with open(args.out / "table.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | Dice (mean ± sd) | min | folds % | mean abs(det J - 1) | ICE px | s / pair | training s "
             "| amortised s / pair | peak GiB |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['dice_mean']:.3f} ± {r['dice_sd']:.3f} | {r['dice_min']:.3f} | "
                     f"{100 * r['folds']:.3f} | {r['abs_det_minus_1']:.3f} | {r['ice']:.3f} | "
                     f"{r['seconds_per_pair']:.2f} | {r['training_seconds']:.0f} | "
                     f"{r['amortised_seconds_per_pair']:.2f} | {r['peak_gib']:.2f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    shown = min(args.figure_pairs, len(pairs))
    if shown:
        figure, axes = plt.subplots(shown, 2 + len(examples), figsize=(2.2 * (2 + len(examples)), 2.3 * shown),
                                    squeeze=False)
        for i in range(shown):
            axes[i, 0].imshow(pairs[i].fixed, cmap="gray")
            axes[i, 1].imshow(pairs[i].moving, cmap="gray")
            for j, (name, results) in enumerate(examples.items()):
                ax = axes[i, 2 + j]
                ax.imshow(results[i].warp(pairs[i].moving), cmap="gray")
                grid = np.indices(results[i].fixed_shape).astype(np.float32) + results[i].displacement()
                plot_deformation_grid(ax, grid, step=max(1.0, args.size / 16))
                if i == 0:
                    ax.set_title(name, fontsize=8)
            if i == 0:
                axes[0, 0].set_title("fixed", fontsize=8)
                axes[0, 1].set_title("moving", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        figure.tight_layout()
        figure.savefig(args.out / "pairs.png", dpi=60)
        plt.close(figure)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'table.csv'}, {args.out / 'pairs.png'}")
    return rows


if __name__ == "__main__":
    main()
