"""Smoke test of demos/benchmark_vs_icon.py on a tiny configuration: every method gives finite
numbers in the table, and the files are written."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "demos" / "benchmark_vs_icon.py"


def test_every_method_gives_finite_numbers(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_vs_icon", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--pairs", "2", "--size", "32", "--nf-iterations", "5", "--train-pairs", "8",
                        "--train-size", "16", "--train-minutes", "0.02", "--finetune-steps", "2",
                        "--figure-pairs", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["nf_gradicon", "nf_icon", "nf_none", "conv_gradicon",
                                           "conv_gradicon_ft", "conv_icon", "conv_icon_ft"]
    for row in rows:
        for key in ("dice_mean", "folds", "abs_det_minus_1", "ice", "seconds_per_pair", "peak_gib"):
            assert math.isfinite(row[key]), (row["method"], key)
    assert {p.name for p in tmp_path.iterdir()} >= {"table.md", "table.csv", "pairs.png"}
