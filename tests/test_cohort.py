"""The cohort runner: CSV in, per-pair outputs and a merged summary out; resume; failures;
two torchrun processes (gloo) sharing the pairs."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import neuralfield_reg as nfr
from neuralfield_reg.app.cohort import read_pairs, run_cohort
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.io.images import load_image, save_image

QUICK = nfr.FitConfig(iterations=20, similarity_points=256, gradient_icon_points=64,
                      affine=nfr.AffineConfig(iterations=5, search_iterations=5))


def write_cohort(folder, n_pairs, corrupt=None):
    rows = []
    for i, pair in enumerate(shape_pairs(n_pairs, 24, hollow=False, seed=7)):
        for name in ("moving", "fixed", "moving_labels", "fixed_labels"):
            save_image(folder / f"{name}{i}.npy", getattr(pair, name))
        rows.append({name: f"{name}{i}.npy" for name in ("moving", "fixed", "moving_labels", "fixed_labels")})
    if corrupt is not None:
        (folder / f"moving{corrupt}.npy").write_text("not an array")
    with open(folder / "pairs.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "pairs.csv"


def summaries(out):
    with open(out / "summary.csv") as stream:
        return list(csv.DictReader(stream))


def test_cohort_writes_outputs_records_failures_and_resumes(tmp_path):
    pairs_csv = write_cohort(tmp_path, 3, corrupt=1)
    out = tmp_path / "out"
    merged = run_cohort(pairs_csv, out, QUICK, progress=False)
    assert [row["pair"] for row in merged] == [0, 1, 2]
    assert [row["status"] for row in merged] == ["ok", "failed", "ok"]
    assert "moving1.npy" in merged[1]["error"]                     # the failure names the file
    for index in (0, 2):
        folder = out / "pairs" / f"{index:05d}"
        assert {p.name for p in folder.iterdir()} >= {"result.pt", "warped.npy", "warped_labels.npy",
                                                       "summary.json"}
        assert merged[index]["dice"] > 0.5 and np.isfinite(merged[index]["inverse_consistency_error"])
        warped, _ = load_image(folder / "warped_labels.npy")
        assert warped.shape == (24, 24) and warped.dtype == np.uint8
    assert len(summaries(out)) == 3

    # A rerun skips the finished pairs; a pair whose summary is gone (killed midway) is redone.
    stamps = {i: os.stat(out / "pairs" / f"{i:05d}" / "summary.json").st_mtime_ns for i in (0, 2)}
    os.unlink(out / "pairs" / "00002" / "summary.json")
    merged = run_cohort(pairs_csv, out, QUICK, progress=False)
    assert os.stat(out / "pairs" / "00000" / "summary.json").st_mtime_ns == stamps[0]
    assert merged[2]["status"] == "ok" and merged[1]["status"] == "failed"


def test_cohort_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs_csv"):
        read_pairs(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("source,target\na.npy,b.npy\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['moving', 'fixed'\]"):
        read_pairs(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("moving,fixed\n")
    with pytest.raises(ValueError, match="lists no pairs"):
        read_pairs(tmp_path / "empty.csv")


def test_image_files_round_trip_and_errors(tmp_path):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    save_image(tmp_path / "volume.nii.gz", array, affine)
    loaded, loaded_affine = load_image(tmp_path / "volume.nii.gz")
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_image(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="unknown extension"):
        load_image(tmp_path / "volume.png")
    (tmp_path / "broken.npy").write_text("text")
    with pytest.raises(ValueError, match="broken.npy"):
        load_image(tmp_path / "broken.npy")
    save_image(tmp_path / "line.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2D or 3D"):
        load_image(tmp_path / "line.npy")


SCRIPT = textwrap.dedent("""
    import sys
    import neuralfield_reg as nfr
    from neuralfield_reg.app.cohort import run_cohort
    from neuralfield_reg.app.distributed import shutdown
    config = nfr.FitConfig(iterations=10, similarity_points=256, gradient_icon_points=64,
                           affine=nfr.AffineConfig(iterations=5, search_iterations=5))
    run_cohort(sys.argv[1], sys.argv[2], config, progress=False)
    shutdown()
""")


def test_two_torchrun_processes_share_the_pairs(tmp_path):
    pairs_csv = write_cohort(tmp_path, 4)
    script = tmp_path / "cohort_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(pairs_csv), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = summaries(out)
    assert sorted(int(r["pair"]) for r in rows) == [0, 1, 2, 3]          # every pair exactly once
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted({r["rank"] for r in rows}) == ["0", "1"]
    assert [json.loads((out / "pairs" / f"{i:05d}" / "summary.json").read_text())["rank"] for i in range(4)] \
        == [0, 1, 0, 1]


def test_cli_fit_warp_and_cohort(tmp_path, capsys):
    from neuralfield_reg.app.cli import main
    pairs_csv = write_cohort(tmp_path, 2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"iterations": 40, "similarity_points": 256, "gradient_icon_points": 64,
                                  "affine": None, "clip_percentiles": [0, 100]}))
    out = tmp_path / "fit"
    save_image(tmp_path / "mask.npy", np.ones((24, 24), dtype=np.uint8))
    assert main(["fit", str(tmp_path / "moving0.npy"), str(tmp_path / "fixed0.npy"), "-o", str(out),
                 "--labels", str(tmp_path / "moving_labels0.npy"), "--fixed-labels",
                 str(tmp_path / "fixed_labels0.npy"), "--config", str(config), "--quiet",
                 "--fixed-mask", str(tmp_path / "mask.npy")]) == 0
    assert {p.name for p in out.iterdir()} >= {"result.pt", "warped.npy", "warped_labels.npy", "summary.json"}
    assert not (out / "overview.png").exists()                       # drawn with --figure only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice"] > summary["dice_before"] + 0.08            # measured: 0.43 -> 0.70
    assert summary["backend"] in ("native", "torch")
    assert main(["warp", str(out / "result.pt"), str(tmp_path / "moving_labels0.npy"), "-o",
                 str(tmp_path / "w.npy"), "--interpolation", "label"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), np.load(out / "warped_labels.npy"))
    assert main(["cohort", str(pairs_csv), "-o", str(tmp_path / "cohort"), "--config", str(config),
                 "--quiet"]) == 0
    assert len(summaries(tmp_path / "cohort")) == 2
    assert main(["fit", str(tmp_path / "missing.npy"), str(tmp_path / "fixed0.npy"), "-o", str(out)]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "32", "--quiet"]) == 0
    assert (tmp_path / "demo" / "fit_pair_2d.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0


def test_a_killed_cohort_run_resumes_without_redoing_finished_pairs(tmp_path):
    """Kill the runner once the first pair is done, rerun, and check that pair was not redone."""
    import signal
    import time
    pairs_csv = write_cohort(tmp_path, 3)
    script = tmp_path / "cohort_slow.py"
    script.write_text(SCRIPT.replace("iterations=10", "iterations=150"))
    out = tmp_path / "out"
    first = out / "pairs" / "00000" / "summary.json"
    process = subprocess.Popen([sys.executable, str(script), str(pairs_csv), str(out)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (out / "summary.csv").exists()      # killed midway
    stamp = os.stat(first).st_mtime_ns
    assert (out / "pairs" / "00001" / "INCOMPLETE").exists() or not (out / "pairs" / "00001").exists()
    same_config = nfr.FitConfig(iterations=150, similarity_points=256, gradient_icon_points=64,
                                affine=nfr.AffineConfig(iterations=5, search_iterations=5))
    merged = run_cohort(pairs_csv, out, same_config, progress=False)
    assert [row["status"] for row in merged] == ["ok", "ok", "ok"]
    assert os.stat(first).st_mtime_ns == stamp                        # not redone
    assert not any((out / "pairs" / f"{i:05d}" / "INCOMPLETE").exists() for i in range(3))
    # other settings: every pair is registered again
    merged = run_cohort(pairs_csv, out, QUICK, progress=False)
    assert os.stat(first).st_mtime_ns != stamp


def test_known_translation_in_millimetres_on_anisotropic_voxels(tmp_path):
    """Voxels of 2 x 1 x 3 mm; the moving blob sits 4 mm further along axis 0 and 3 mm along axis 2
    (2 and 1 voxels). The fit, given the spacings from the affines, recovers +4 / 0 / +3 mm, and
    the ITK field holds it in LPS (x and y negated) on the fixed grid."""
    import nibabel
    from neuralfield_reg.io.images import spacing_of
    from neuralfield_reg.transforms.itk import save_displacement_itk, world_displacement
    shape, affine = (20, 24, 14), np.diag([2.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [-20.0, 5.0, 7.0]
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, (2.0, 1.0, 3.0))], indexing="ij"))

    def blob(centre_mm):
        r2 = sum((grid[k] - centre_mm[k]) ** 2 / radius ** 2 for k, radius in enumerate((9.0, 6.0, 10.0)))
        return np.exp(-r2).astype(np.float32)
    fixed, moving = blob((19.0, 11.5, 19.5)), blob((23.0, 11.5, 22.5))
    config = nfr.FitConfig(iterations=150)
    spacing = (spacing_of(affine, 3), spacing_of(affine, 3))
    result = nfr.fit_pair(moving, fixed, config, spacing=spacing, progress=False)
    displacement = world_displacement(result, affine, affine)
    inner = displacement[5:15, 6:18, 4:10].reshape(-1, 3)
    np.testing.assert_allclose(inner.mean(0), [4.0, 0.0, 3.0], atol=0.3)
    assert np.abs(inner - [4.0, 0.0, 3.0]).max() < 1.0
    save_displacement_itk(tmp_path / "field.nii.gz", result, affine, affine)
    field = nibabel.load(tmp_path / "field.nii.gz")
    assert field.shape == (*shape, 1, 3) and field.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(field.affine, affine)
    np.testing.assert_allclose(np.asarray(field.dataobj)[10, 12, 7, 0], displacement[10, 12, 7] * [-1, -1, 1],
                               atol=1e-5)
    flat = nfr.fit_pair(moving[5], fixed[5], nfr.FitConfig(iterations=2), spacing=(1.0, 3.0), progress=False)
    save_displacement_itk(tmp_path / "f.nii.gz", flat)               # 2D: (X, Y, 1, 1, 2)
    assert nibabel.load(tmp_path / "f.nii.gz").shape == (24, 14, 1, 1, 2)
