"""Smoke tests of the benchmark (demos/benchmark_vs_icon.py, ``nfreg benchmark``) on tiny
configurations: every method gives finite numbers in the table, and the files are written."""

import csv
import importlib.util
import math
from pathlib import Path

from neuralfield_reg.app.cli import main as nfreg

SCRIPT = Path(__file__).resolve().parents[1] / "demos" / "benchmark_vs_icon.py"
NUMBERS = ("dice_mean", "folds", "abs_det_minus_1", "ice", "seconds_per_pair", "peak_gib")


def test_every_method_gives_finite_numbers_2d(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_vs_icon", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--pairs", "3", "--subset-pairs", "2", "--size", "32", "--nf-iterations", "5",
                        "--train-pairs", "8", "--train-size", "16", "--train-minutes", "0.02",
                        "--finetune-steps", "2", "--figure-pairs", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["nf_gradicon", "nf_icon", "nf_none", "conv_gradicon",
                                           "conv_gradicon_ft", "conv_icon", "conv_icon_ft"]
    assert [r["pairs"] for r in rows] == [3, 2, 2, 3, 2, 3, 2]
    for row in rows:
        for key in NUMBERS:
            assert math.isfinite(row[key]), (row["method"], key)
    assert {p.name for p in tmp_path.iterdir()} >= {"table.md", "table.csv", "pairs.csv", "pairs.png"}
    with open(tmp_path / "pairs.csv") as stream:
        assert len(list(csv.DictReader(stream))) == 3 + 2 + 2 + 3 + 2 + 3 + 2


def test_cli_benchmark_3d_reports_every_label(tmp_path):
    code = nfreg(["benchmark", "--dataset", "bodies3d", "--methods", "nf_gradicon", "conv_gradicon",
                  "--pairs", "2", "--size", "16", "--nf-iterations", "3", "--train-pairs", "2",
                  "--train-size", "16", "--train-minutes", "0.01", "--finetune-steps", "1",
                  "--figure-pairs", "1", "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "table.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["method"] for r in rows] == ["nf_gradicon", "conv_gradicon", "conv_gradicon_ft"]
    for row in rows:
        for key in NUMBERS + ("dice_1", "dice_2", "dice_3"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    assert "Dice per label" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "pairs.png").stat().st_size > 0


def test_brain_dataset_runs_the_neural_fields_only(tmp_path, capsys):
    code = nfreg(["benchmark", "--dataset", "brain", "--methods", "nf_gradicon", "nf_none", "conv_gradicon",
                  "--nf-iterations", "3", "--figure-pairs", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "skipping conv_gradicon" in capsys.readouterr().out
    with open(tmp_path / "table.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["method"] for r in rows] == ["nf_gradicon", "nf_none"]
    for row in rows:
        assert row["pairs"] == "1" and math.isfinite(float(row["dice_mean"]))
        assert math.isfinite(float(row["dice_116"]))
