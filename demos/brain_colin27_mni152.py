"""Register a real labelled pair: Colin27 (moving) to the MNI152 template (fixed) at 2 mm, and
score it with the AAL parcellation (116 structures), before and after.

    python demos/brain_colin27_mni152.py                 # writes out/brain/
    python demos/brain_colin27_mni152.py --seed 1 --out out/brain_seed1 --quiet

The 2 mm pair ships with the package (see neuralfield_reg/data/brain.py for where it comes
from); ``--pair-file`` takes another resolution made by
``neuralfield_reg.data.brain.prepare_brain_pair``. Also ``nfreg demo --brain``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuralfield_reg.app.brain_demo import run_brain_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/brain"))
    parser.add_argument("--pair-file", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    run_brain_demo(args.out, seed=args.seed, progress=not args.quiet, pair_file=args.pair_file)


if __name__ == "__main__":
    main()
