"""Train convolutional GradICON and ICON on hollow triangles/circles with the same network and
the same wall-time budget, and plot held-out Dice and folding fraction against training time.

    python demos/gradicon_triangles.py --minutes 10 --out out/gradicon_triangles

Each run is ``LOSS:LAMBDA`` (``--runs gradicon:1 icon:2048 icon:1``). Validation time is not
counted as training time. Writes ``curves.png`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from neuralfield_reg import gradicon, metrics  # noqa: E402
from neuralfield_reg.data import ShapePairDataset  # noqa: E402


def evaluate(network, pairs: ShapePairDataset) -> dict[str, float]:
    """Mean Dice of the warped moving label map, folding fraction and ICE over ``pairs``."""
    dice, folds = [], []
    for i in range(len(pairs)):
        result = gradicon.register(network, pairs.moving[i], pairs.fixed[i])
        dice.append(metrics.mean_dice(result.warp(pairs.moving_labels[i], mode="nearest"), pairs.fixed_labels[i]))
        folds.append(metrics.folding_fraction(result.jacobian_determinant()))
    return {"dice": float(np.mean(dice)), "dice_min": float(np.min(dice)), "folds": float(np.mean(folds))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["gradicon:1", "icon:2048", "icon:1"],
                        help="LOSS:LAMBDA per run (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per run")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--test-pairs", type=int, default=100)
    parser.add_argument("--similarity", default="ssd", choices=["ssd", "ncc", "lncc"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("out/gradicon_triangles"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    train_pairs = ShapePairDataset(args.train_pairs, args.size, seed=args.seed)
    test_pairs = ShapePairDataset(args.test_pairs, args.size, seed=args.seed + 10_000)
    start = {"dice": float(np.mean([metrics.mean_dice(test_pairs.moving_labels[i], test_pairs.fixed_labels[i])
                                    for i in range(len(test_pairs))]))}
    print(f"held-out pairs: {len(test_pairs)}, Dice before registration {start['dice']:.3f}")
    runs = {}
    for spec in args.runs:
        loss, lam = spec.split(":")
        torch.manual_seed(args.seed)
        network = gradicon.default_model(2, (args.size, args.size)).to(args.device)
        curve = [{"seconds": 0.0, "step": 0, **evaluate(network, test_pairs)}]

        def validate(step, network, history, curve=curve, spec=spec):
            curve.append({"seconds": history["seconds"][-1], "step": step, **evaluate(network, test_pairs)})
            print(f"  {spec} step {step:5d}  {curve[-1]['seconds']:6.0f} s  Dice {curve[-1]['dice']:.3f}  "
                  f"folds {100 * curve[-1]['folds']:.2f} %", flush=True)

        started = time.perf_counter()
        history = gradicon.train(network, train_pairs, loss=loss, lam=float(lam), similarity=args.similarity,
                                 batch_size=args.batch_size, lr=args.lr, time_budget_s=60 * args.minutes,
                                 seed=args.seed, callback=validate, callback_every=args.eval_every,
                                 progress=not args.quiet)
        runs[spec] = {"curve": curve, "steps": history["step"][-1],
                      "seconds_per_step": history["seconds"][-1] / history["step"][-1],
                      "wall_s": time.perf_counter() - started}
        final = curve[-1]
        print(f"{spec}: {runs[spec]['steps']} steps ({runs[spec]['seconds_per_step']:.3f} s/step), "
              f"Dice {final['dice']:.3f} (min {final['dice_min']:.3f}), folds {100 * final['folds']:.2f} %")

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for spec, run in runs.items():
        minutes = [p["seconds"] / 60 for p in run["curve"]]
        axes[0].plot(minutes, [p["dice"] for p in run["curve"]], label=spec)
        axes[1].plot(minutes, [100 * p["folds"] for p in run["curve"]], label=spec)
    axes[0].axhline(start["dice"], color="gray", linestyle=":", label="no registration")
    axes[0].set(xlabel="training minutes (CPU)", ylabel="held-out mean Dice", title="Dice")
    axes[1].set(xlabel="training minutes (CPU)", ylabel="folded pixels (%)", title="folding (det J <= 0)")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out / "curves.png", dpi=120)
    summary = {"device": str(args.device), "arguments": {k: str(v) for k, v in vars(args).items()},
               "start": start, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'curves.png'} and {args.out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
