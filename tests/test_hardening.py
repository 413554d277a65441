"""Careless and hostile use of the command line and its files: no input destroyed, no stale or
half-written output folder that looks complete, no silent wrong answer, a clear error (exit 2,
naming the argument or file, no traceback) for everything else, and divergence that stays finite."""

import argparse
import csv
import json
import os
import pickle
import re
import stat

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg.app.cli import main
from neuralfield_reg.app.cohort import read_pairs, run_cohort
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.io.images import save_image

QUICK = {"iterations": 5, "similarity_points": 128, "gradient_icon_points": 32,
         "affine": {"iterations": 2, "search_iterations": 2}}


@pytest.fixture
def pair(tmp_path):
    shapes = shape_pairs(1, 24, hollow=False, seed=3)[0]
    paths = {}
    for name in ("moving", "fixed", "moving_labels", "fixed_labels"):
        paths[name] = tmp_path / f"{name}.npy"
        save_image(paths[name], getattr(shapes, name))
    paths["config"] = tmp_path / "quick.json"
    paths["config"].write_text(json.dumps(QUICK))
    return paths


def fit(paths, out, *extra):
    return main(["fit", str(paths["moving"]), str(paths["fixed"]), "-o", str(out), "--config", str(paths["config"]),
                 "--quiet", *map(str, extra)])


def test_an_input_is_never_overwritten(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert fit(pair, out) == 0
    os.replace(out / "warped.npy", tmp_path / "keep.npy")
    save_image(out / "warped.npy", np.load(tmp_path / "keep.npy"))
    before = (out / "warped.npy").read_bytes()
    code = main(["fit", str(out / "warped.npy"), str(pair["fixed"]), "-o", str(out), "--config",
                 str(pair["config"]), "--quiet"])
    assert code == 2 and "overwritten" in capsys.readouterr().err
    assert (out / "warped.npy").read_bytes() == before
    assert main(["warp", str(out / "result.pt"), str(pair["moving"]), "-o", str(pair["moving"])]) == 2
    assert "overwritten" in capsys.readouterr().err


def test_refit_leaves_no_stale_files_and_an_interrupted_run_says_so(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert fit(pair, out, "--labels", pair["moving_labels"], "--fixed-labels", pair["fixed_labels"]) == 0
    assert (out / "warped_labels.npy").exists() and not (out / "INCOMPLETE").exists()
    assert fit(pair, out) == 0                                          # no labels this time
    assert not (out / "warped_labels.npy").exists()
    assert "dice" not in json.loads((out / "summary.json").read_text())

    import neuralfield_reg.app.viz as viz

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(viz, "overview_figure", interrupted)
    assert fit(pair, out, "--figure") == 130
    assert (out / "INCOMPLETE").exists() and not (out / "summary.json").exists()
    assert (out / "result.pt").exists() and not (out / "overview.png").exists()   # this run's files only
    monkeypatch.undo()
    assert fit(pair, out, "--figure") == 0
    assert not (out / "INCOMPLETE").exists() and (out / "overview.png").exists()
    assert fit(pair, out) == 0                                          # no figure asked for: none left
    assert not (out / "overview.png").exists() and (out / "summary.json").exists()


def test_files_follow_the_umask(pair, tmp_path):
    previous = os.umask(0o022)
    try:
        assert fit(pair, tmp_path / "out", "--figure") == 0
    finally:
        os.umask(previous)
    for name in ("result.pt", "warped.npy", "summary.json", "overview.png"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name


def test_clear_errors_before_any_fit(pair, tmp_path, capsys, monkeypatch):
    import neuralfield_reg.app.cohort as cohort

    def no_fit(*args, **kwargs):
        raise AssertionError("fit_pair should not run")
    monkeypatch.setattr(cohort, "fit_pair", no_fit)
    (tmp_path / "a_file").write_text("x")
    save_image(tmp_path / "mask255.npy", (np.load(pair["moving"]) > 0.5).astype(np.uint8) * 255)
    cases = [
        (["-o", str(tmp_path / "o"), "--moving-mask", str(tmp_path / "mask255.npy")],
         "--moving-mask: expected a boolean or 0/1 mask, got values such as [255] (a mask of 0 and one other value"),
        (["-o", str(tmp_path / "a_file")], "is a file"),
        (["-o", str(tmp_path / "a_file" / "sub")], "cannot be written"),
        (["-o", str(tmp_path / "o"), "--device", "banana"], "--device"),
        (["-o", str(tmp_path / "o"), "--labels", str(tmp_path / "missing.npy")], "--labels"),
    ]
    if not torch.cuda.is_available():
        cases.append((["-o", str(tmp_path / "o"), "--device", "cuda"], "no CUDA"))
    for extra, message in cases:
        code = main(["fit", str(pair["moving"]), str(pair["fixed"]), "--config", str(pair["config"]), "--quiet",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    for values, message in (({"iterations": True}, "iterations"), ({"learning_rate": "fast"}, "learning_rate"),
                            ({"blur_sigmas": 3}, "blur_sigmas"), ({"affine": 5}, "affine"),
                            ({"hidden_widths": [32, 2.5]}, "hidden_widths"),
                            ({"similarity_points": 64.5}, "similarity_points"),
                            ({"affine": {"iterationz": 3}}, "iterationz")):
        (tmp_path / "bad.json").write_text(json.dumps(values))
        code = main(["fit", str(pair["moving"]), str(pair["fixed"]), "-o", str(tmp_path / "o"), "--config",
                     str(tmp_path / "bad.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (values, err)
    (tmp_path / "o").mkdir(exist_ok=True)
    assert main(["warp", str(pair["config"]), str(pair["moving"]), "-o", str(tmp_path / "o")]) == 2
    assert "folder" in capsys.readouterr().err


def test_crafted_result_files_are_refused_by_name(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert fit(pair, out) == 0
    state = torch.load(out / "result.pt", weights_only=True)
    del state["architecture"]
    torch.save(state, tmp_path / "crafted.pt")
    assert main(["warp", str(tmp_path / "crafted.pt"), str(pair["moving"]), "-o", str(tmp_path / "w.npy")]) == 2
    err = capsys.readouterr().err
    assert "crafted.pt" in err and "architecture" in err and "Traceback" not in err
    # each file is named by its argument; a pickle of other objects is refused without torch's
    # advice to load it with weights_only=False (which would run its code)
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps(argparse.Namespace(a=1)))
    for argv, message in (([str(tmp_path / "pickled.pt"), str(pair["moving"]), "-o", str(tmp_path / "w.npy")],
                           "result: path: .*pickled.pt' is not a readable neuralfield_reg result.*tensors and plain "
                           "values, the only kind read$"),
                          ([str(out / "result.pt"), str(tmp_path / "none.npy"), "-o", str(tmp_path / "w.npy")],
                           "image: path: no file"),
                          ([str(out / "result.pt"), str(pair["moving"]), "-o", str(tmp_path / "w.txt")],
                           "-o: .*w.txt' has an unknown extension")):
        assert main(["warp", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and "weights_only" not in err, (argv, err)


def test_masks_and_labels_must_mean_what_they_say(pair):
    moving, fixed = np.load(pair["moving"]), np.load(pair["fixed"])
    with pytest.raises(ValueError, match="fixed_mask.*0/1.*0.5"):
        nfr.fit_pair(moving, fixed, nfr.FitConfig(iterations=2), fixed_mask=np.full(fixed.shape, 0.5), progress=False)
    nfr.fit_pair(moving, fixed, nfr.FitConfig(iterations=2, affine=None), fixed_mask=np.ones(fixed.shape, np.float32),
                 progress=False)


def write_csv(path, rows, header=("moving", "fixed", "moving_labels", "fixed_labels")):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def test_cohort_rows_columns_reruns_and_exit_codes(pair, tmp_path, capsys):
    csv_path = tmp_path / "pairs.csv"
    write_csv(csv_path, [["moving.npy", "fixed.npy", "moving_labels.npy", "fixed_labels.npy"]])
    out = tmp_path / "cohort"
    assert run_cohort(csv_path, out, nfr.FitConfig.from_dict(QUICK), progress=False)[0]["status"] == "ok"
    # the row changes: the pair is registered again, with the new moving image
    save_image(tmp_path / "other.npy", np.load(pair["moving"])[::-1].copy())
    write_csv(csv_path, [["other.npy", "fixed.npy", "moving_labels.npy", "fixed_labels.npy"]])
    merged = run_cohort(csv_path, out, nfr.FitConfig.from_dict(QUICK), progress=False)
    assert merged[0]["moving"].endswith("other.npy")
    assert json.loads((out / "pairs" / "00000" / "summary.json").read_text())["inputs"]["moving"].endswith("other.npy")
    # a typo in a column name is reported, short rows and blank cells are clear errors
    write_csv(csv_path, [["moving.npy", "fixed.npy", "moving_labels.npy"]], header=("moving", "fixed", "labels"))
    with pytest.warns(UserWarning, match="labels"):
        read_pairs(csv_path)
    write_csv(csv_path, [["moving.npy"]], header=("moving", "fixed"))
    assert main(["cohort", str(csv_path), "-o", str(out), "--quiet"]) == 2
    assert "row 1" in capsys.readouterr().err
    write_csv(csv_path, [["moving.npy", " "]], header=("moving", "fixed"))
    with pytest.raises(ValueError, match="row 1.*no fixed path"):
        read_pairs(csv_path)
    # every pair failed: a non-zero exit
    write_csv(csv_path, [["missing.npy", "fixed.npy"]], header=("moving", "fixed"))
    assert main(["cohort", str(csv_path), "-o", str(tmp_path / "c2"), "--quiet", "--config", str(pair["config"])]) == 1
    assert "1 pair(s) failed" in capsys.readouterr().err


def test_gradicon_training_takes_items_with_a_channel_axis():
    from neuralfield_reg import gradicon

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, shape):
            self.shape = shape

        def __len__(self):
            return 4

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return torch.rand(self.shape, generator=generator), torch.rand(self.shape, generator=generator)

    model = gradicon.default_model(2, (16, 16))
    history = gradicon.train(model, Pairs((1, 16, 16)), batch_size=2, steps=1, progress=False)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    with pytest.raises(ValueError, match=r"\(H, W\).*leading channel"):
        gradicon.train(model, Pairs((2, 16, 16)), batch_size=2, steps=1, progress=False)


def test_divergence_that_stays_finite_is_detected():
    shapes = shape_pairs(1, 48, hollow=True, seed=5)[0]
    exploding = nfr.FitConfig(iterations=40, learning_rate=1.0, output_scale=1.0, affine=None)
    with pytest.raises(nfr.FitDivergedError, match="gradient_icon term exploded"):
        nfr.fit_pair(shapes.moving, shapes.fixed, exploding, progress=False)
    # without the penalty, the fields themselves run off the image
    unconstrained = nfr.FitConfig(iterations=40, learning_rate=3.0, output_scale=3.0, gradient_icon_weight=0.0,
                                  affine=None)
    with pytest.raises(nfr.FitDivergedError, match="displacement.*image widths"):
        nfr.fit_pair(shapes.moving, shapes.fixed, unconstrained, progress=False)
    # asked to, the fit rolls back and finishes with a smaller learning rate
    config = nfr.FitConfig(iterations=60, learning_rate=0.3, output_scale=1.0, affine=None, on_divergence="rollback",
                           hidden_widths=(32, 32))
    result = nfr.fit_pair(shapes.moving, shapes.fixed, config, progress=False)
    assert result.metadata["rollbacks"] and max(result.history["gradient_icon"]) < 10.0


def test_background_writes_finish_before_the_block_ends_and_report_a_failed_write(tmp_path):
    import threading

    from neuralfield_reg.io.files import atomic_write, atomic_write_text, background_writes

    release = threading.Event()
    writers = set()

    def slow(temporary):
        writers.add(threading.current_thread().name)
        release.wait(5)                                 # held until the caller has moved on
        with open(temporary, "w") as stream:
            stream.write("slow")

    with background_writes():
        atomic_write(tmp_path / "slow.txt", slow)
        assert not (tmp_path / "slow.txt").exists()     # the call returned before the file was written
        atomic_write_text(tmp_path / "fast.txt", "fast")
        release.set()
    assert (tmp_path / "slow.txt").read_text() == "slow" and (tmp_path / "fast.txt").read_text() == "fast"
    assert writers and threading.current_thread().name not in writers

    def broken(temporary):
        raise OSError("disk full")

    (tmp_path / "kept.txt").write_text("before")
    with pytest.raises(OSError, match="disk full"):
        with background_writes():
            atomic_write(tmp_path / "kept.txt", broken)
            atomic_write_text(tmp_path / "other.txt", "written")
    assert (tmp_path / "kept.txt").read_text() == "before"                  # never half-written
    assert (tmp_path / "other.txt").read_text() == "written"                # the other writes went on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.txt", "kept.txt", "other.txt", "slow.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):          # a missing folder: at the call
        with background_writes():
            atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    with pytest.raises(KeyError):                      # the block's own error, after its writes finished
        with background_writes():
            atomic_write(tmp_path / "late.txt", slow)
            raise KeyError("body")
    assert (tmp_path / "late.txt").read_text() == "slow"
