"""The ``nfreg`` command: register files, apply a saved result, register a cohort.

    nfreg fit MOVING FIXED -o OUTDIR [--labels MOVING_LABELS] [--fixed-labels FIXED_LABELS] [--init INIT]
              [--figure]                        (--figure: also overview.png)
    nfreg warp RESULT IMAGE -o OUT [--nearest] [--inverse] [--reference GRID]
    nfreg cohort PAIRS.csv -o OUTDIR            (under torchrun: sharded over the processes)
    nfreg demo [--out OUT] [--brain]            (the 2D triangle/circle demo; the real brain pair)
    nfreg kernels                               (build the compiled kernels now, not on the first fit)
    nfreg benchmark [--dataset shapes2d|bodies3d|brain]  (neural fields against conv GradICON/ICON)

Images are ``.npy``, NIfTI (``.nii``, ``.nii.gz``) or MGH (``.mgz``, ``.mgh``; these two need the
``nifti`` extra); outputs of images with headers are NIfTI. NIfTI and MGH files are
registered in world coordinates: the fit starts from their headers' alignment (``--init world``),
whatever the orientation, origin, field of view or spacing of each file. ``--config`` takes a JSON
file of FitConfig fields that override the images' preset (``FitConfig.for_images``: ``3d`` for
volumes, ``2d-scan`` for 2D NIfTI or MGH files, ``2d`` for 2D ``.npy`` arrays), e.g. ``{"iterations": 1000, "clip_percentiles": [1, 99]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from ..io.files import atomic_write_text, background_writes, end_outputs, same_file
from . import benchmark_vs_icon
from .cohort import register_row, run_cohort
from ..config import FitConfig
from .distributed import shutdown
from ..io.images import SUFFIXES, as_image, write_image
from ..registration.result import RegistrationResult


def _config(path: str | None) -> dict | None:
    """The ``--config`` file's fields (checked now), which override the preset that the images
    pick (``FitConfig.for_images``); None without the option."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: no file at {path!r}")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--config: {path!r} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path!r} should hold a JSON object of FitConfig fields")
    try:
        FitConfig.from_dict(values)                 # type and range errors before anything is read
    except (TypeError, ValueError) as error:
        raise type(error)(f"--config: {path!r}: {error}") from error
    return values


_OPTION_NAMES = {"moving": "moving", "fixed": "fixed", "moving_labels": "--labels", "fixed_labels": "--fixed-labels",
                 "moving_mask": "--moving-mask", "fixed_mask": "--fixed-mask"}


def _fit(args) -> dict:
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o: {args.output!r} is a file; expected an output folder")
    _check_device(args.device)
    row = {"moving": args.moving, "fixed": args.fixed, "moving_labels": args.labels or "",
           "fixed_labels": args.fixed_labels or "", "moving_mask": args.moving_mask or "",
           "fixed_mask": args.fixed_mask or ""}
    with background_writes():        # files are compressed and written while the next output is computed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registered = register_row(row, out, _config(args.config), args.device, not args.quiet,
                                      init=args.init, names=_OPTION_NAMES)
        for warning in caught:
            print(f"nfreg fit: warning: {warning.message}", file=sys.stderr)
        if args.figure:
            from .viz import overview_figure          # matplotlib only when a figure is drawn
            overview_figure(registered.result, registered.moving.data, registered.fixed.data, out / "overview.png",
                            warped=registered.warped.data)
    summary = {**registered.numbers, "backend": registered.result.backend, "moving": args.moving,
               "fixed": args.fixed}
    end_outputs(out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))    # last: the folder is complete
    print(json.dumps(summary, indent=1))
    return summary


def _check_device(device: str | None) -> None:
    """``--device``: cpu or cuda[:N], and CUDA only where there is one."""
    if device is None:
        return
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device: expected cpu or cuda[:N], got {device!r}") from error
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but this machine has no CUDA device (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")


def _warp(args) -> None:
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"-o: {args.output!r} is a folder; expected an output file (.npy, .nii, .nii.gz)")
    for name, value in (("result", args.result), ("image", args.image), ("--reference", args.reference)):
        if value and same_file(value, output):
            raise ValueError(f"-o: {args.output!r} is the {name} file; it would be overwritten")
    if not output.name.lower().endswith(SUFFIXES):
        raise ValueError(f"-o: {args.output!r} has an unknown extension; expected one of {', '.join(SUFFIXES)}")
    try:
        result = RegistrationResult.load(args.result)
    except (OSError, ValueError) as error:
        raise type(error)(f"result: {error}") from error
    image, _ = as_image("image", args.image)
    mode = "nearest" if args.nearest else args.interpolation
    warp = result.warp_inverse if args.inverse else result.warp
    write_image(args.output, warp(image, mode=mode, reference=args.reference))
    print(f"wrote {args.output}")


def _cohort(args) -> int:
    _check_device(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = run_cohort(args.pairs_csv, args.output, _config(args.config), device=args.device,
                            progress=not args.quiet, init=args.init)
    for warning in caught:
        print(f"nfreg cohort: warning: {warning.message}", file=sys.stderr)
    shutdown()
    if merged is None:
        return 0
    failed = [row for row in merged if row["status"] != "ok"]
    print(f"{len(merged) - len(failed)} of {len(merged)} pairs registered; summary in "
          f"{Path(args.output) / 'summary.csv'}")
    if failed:
        print(f"nfreg cohort: {len(failed)} pair(s) failed: {', '.join(str(row['pair']) for row in failed)} "
              "(their errors are in summary.csv)", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> None:
    if args.brain:
        from .brain_demo import run_brain_demo
        run_brain_demo(Path(args.out) / "brain", seed=0 if args.seed is None else args.seed, progress=not args.quiet)
        return
    from .demo import run_demo
    run_demo(Path(args.out), seed=2 if args.seed is None else args.seed, size=args.size, progress=not args.quiet)


def _kernels(args) -> int:
    """Build the compiled kernels now (or find the cached build) instead of on the first fit."""
    import time

    from .._cuda_ext import NativeBuildError, load
    started = time.perf_counter()
    try:
        module = load()
    except NativeBuildError as error:
        print(f"nfreg kernels: {error}\nnfreg kernels: fits will use the pure-PyTorch backend (about 12 times slower "
              "in 3D; see docs/backends.md)", file=sys.stderr)
        return 1
    devices = "CPU and CUDA" if module.__name__.endswith("_cuda") else "CPU"
    print(f"compiled kernels for the {devices} ready in {time.perf_counter() - started:.1f} s: {module.__file__}")
    return 0


def _benchmark(args) -> None:
    benchmark_vs_icon.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfreg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="register MOVING to FIXED with a pair of neural fields")
    fit.add_argument("moving")
    fit.add_argument("fixed")
    fit.add_argument("-o", "--output", required=True, help="output folder")
    fit.add_argument("--labels", help="moving label map, warped with label interpolation (each label "
                     "interpolated linearly, the most likely taken)")
    fit.add_argument("--fixed-labels", help="fixed label map (Dice in the summary)")
    fit.add_argument("--moving-mask", help="where the moving image counts in the similarity")
    fit.add_argument("--fixed-mask", help="where the fixed image counts in the similarity")
    fit.add_argument("--figure", action="store_true",
                     help="also draw overview.png: middle slices of the images, the warped image, the "
                          "deformation grid, det J and the loss terms (about 0.5 s more)")
    fit.set_defaults(run=_fit)

    warp = commands.add_parser("warp", help="apply a saved result to another moving-space image")
    warp.add_argument("result", help="a result.pt written by `nfreg fit` or RegistrationResult.save")
    warp.add_argument("image")
    warp.add_argument("-o", "--output", required=True, help="output file (.npy, .nii, .nii.gz)")
    warp.add_argument("--interpolation", choices=("linear", "nearest", "label"), default="linear",
                      help="linear (images; default), nearest, or label (label maps: each label interpolated "
                           "linearly, the most likely taken, as nfreg fit warps --labels)")
    warp.add_argument("--nearest", action="store_true", help="the same as --interpolation nearest")
    warp.add_argument("--inverse", action="store_true",
                      help="apply phi_BA: a fixed-space image onto the moving grid")
    warp.add_argument("--reference", help="an image whose grid (and header) the output takes; default the "
                                          "fixed grid of the result (the moving grid with --inverse)")
    warp.set_defaults(run=_warp)

    cohort = commands.add_parser("cohort", help="register every pair of a CSV (moving,fixed[,labels])")
    cohort.add_argument("pairs_csv")
    cohort.add_argument("-o", "--output", required=True, help="output folder")
    cohort.set_defaults(run=_cohort)

    demo = commands.add_parser("demo", help="fit one synthetic 2D pair and draw it (out/fit_pair_2d.png); "
                                            "--brain: the real Colin27 -> MNI152 pair (out/brain/)")
    demo.add_argument("--brain", action="store_true",
                      help="register Colin27 to MNI152 at 2 mm and score the 116 AAL structures")
    demo.add_argument("--out", default="out", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=None,
                      help="2D: which random pair (default 2); --brain: the fit's seed (default 0)")
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    kernels = commands.add_parser("kernels", help="build the compiled kernels now (otherwise the first fit "
                                                  "builds them: about 40 s), or say why they cannot be built")
    kernels.set_defaults(run=_kernels)

    benchmark = commands.add_parser("benchmark", help="neural fields against conv GradICON/ICON on the same pairs",
                                    description=benchmark_vs_icon.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark_vs_icon.add_arguments(benchmark)
    benchmark.set_defaults(run=_benchmark)

    for command in (fit, cohort):
        command.add_argument("--init", default=None,
                             help="where the maps start: world (the headers' alignment; the default for NIfTI, unless the "
                                  "headers put no part of the fixed image in the moving one: then moments), "
                                  "centers (image centres aligned), moments (intensity moments and a rotation "
                                  "search; the default for .npy), or an ITK affine file (.mat/.txt, fixed -> "
                                  "moving, as ANTs writes)")
        command.add_argument("--config", help="JSON file of FitConfig fields (on top of the images' preset: 3d, 2d-scan for 2D NIfTI or MGH, 2d for .npy)")
        command.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu, or the rank's GPU)")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        print(f"nfreg {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, ImportError, RuntimeError, KeyError) as error:
        if os.environ.get("NFREG_TRACEBACK"):
            raise
        print(f"nfreg {args.command}: {error}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
