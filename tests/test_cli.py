"""The nfreg command on NIfTI files with headers: world-space fits, their outputs and summary,
nfreg warp by world coordinates, inputs checked before fitting; the real brain pair stored as
distributed (Colin27 RAS, MNI152 LAS)."""

import json

import numpy as np
import pytest

from neuralfield_reg import metrics
from neuralfield_reg.app.cli import main
from neuralfield_reg.app.cohort import read_row
from neuralfield_reg.geometry import Grid, Image, resample_to
from neuralfield_reg.io.images import read_image, write_image

nibabel = pytest.importorskip("nibabel")

QUICK = {"iterations": 60, "similarity_points": 1024, "gradient_icon_points": 128,
         "affine": {"iterations": 20, "rigid_iterations": 10, "working_size": 24}}


def phantom(grid: Grid, shift=0.0):
    world = grid.world_points() - np.array([shift, 0.0, 0.0])
    body = ((world / [15.0, 12.0, 10.0]) ** 2).sum(-1)
    side = (((world - [7.0, 0.0, 0.0]) / 4.5) ** 2).sum(-1)
    labels = np.where(side < 1, 2, np.where(body < 1, 1, 0)).astype(np.uint8)
    intensity = (0.6 / (1 + np.exp(np.clip((body - 1) * 6, -50, 50)))
                 + 0.3 / (1 + np.exp(np.clip((side - 1) * 6, -50, 50))) + 0.1).astype(np.float32)
    return intensity, labels


@pytest.fixture
def files(tmp_path):
    fixed = Grid.from_spacing((22, 20, 16), 2.0, origin=(21.0, -19.0, -15.0), direction=np.diag([-1.0, 1.0, 1.0]))
    moving = Grid.from_spacing((20, 22, 18), 2.0, origin=(-17.0, -21.0, -17.0))
    paths = {}
    for name, grid, shift in (("fixed", fixed, 0.0), ("moving", moving, 3.0)):
        intensity, labels = phantom(grid, shift)
        paths[name] = tmp_path / f"{name}.nii.gz"
        paths[f"{name}_labels"] = tmp_path / f"{name}_labels.nii.gz"
        write_image(paths[name], Image(intensity, grid))
        write_image(paths[f"{name}_labels"], Image(labels, grid))
    paths["config"] = tmp_path / "quick.json"
    paths["config"].write_text(json.dumps(QUICK))
    return paths


def test_fit_and_warp_work_in_world_coordinates(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["fit", str(files["moving"]), str(files["fixed"]), "-o", str(out), "--labels",
                 str(files["moving_labels"]), "--fixed-labels", str(files["fixed_labels"]), "--config",
                 str(files["config"]), "--quiet", "--figure"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == "world" and (summary["moving_orientation"], summary["fixed_orientation"]) == ("RAS", "LAS")
    fixed_labels = read_image(files["fixed_labels"])
    moving_labels = read_image(files["moving_labels"])
    by_world = resample_to(moving_labels, fixed_labels.grid, mode="label").data
    assert summary["dice_before"] == pytest.approx(metrics.mean_dice(by_world, fixed_labels.data))
    assert summary["dice"] > summary["dice_before"] + 0.05 and summary["dice"] > 0.85
    assert summary["folding_fraction"] == 0.0 and 0.5 < summary["world_overlap"] <= 1.0
    for name in ("result.pt", "warped.nii.gz", "warped_labels.nii.gz", "jacobian_determinant.nii.gz",
                 "displacement_itk.nii.gz", "inverse_displacement_itk.nii.gz", "affine.mat", "affine.txt",
                 "overview.png"):
        assert (out / name).stat().st_size > 0, name
    warped = read_image(out / "warped_labels.nii.gz")
    assert warped.grid.same_as(fixed_labels.grid)                   # the fixed header, not the identity

    # nfreg warp: by default onto the fixed grid with its header; --reference another grid; --inverse
    assert main(["warp", str(out / "result.pt"), str(files["moving_labels"]), "-o", str(tmp_path / "w.nii.gz"),
                 "--interpolation", "label"]) == 0
    again = read_image(tmp_path / "w.nii.gz")
    assert again.grid.same_as(fixed_labels.grid)
    np.testing.assert_array_equal(again.data, warped.data)
    assert main(["warp", str(out / "result.pt"), str(files["moving_labels"]), "-o", str(tmp_path / "r.nii.gz"),
                 "--nearest", "--reference", str(files["moving"])]) == 0
    assert read_image(tmp_path / "r.nii.gz").grid.same_as(moving_labels.grid)
    assert main(["warp", str(out / "result.pt"), str(files["fixed_labels"]), "-o", str(tmp_path / "i.nii.gz"),
                 "--nearest", "--inverse"]) == 0
    inverse = read_image(tmp_path / "i.nii.gz")
    assert inverse.grid.same_as(moving_labels.grid)
    assert metrics.mean_dice(inverse.data, moving_labels.data) > 0.85


def test_freesurfer_mgz_files_register_as_their_nifti_copies(files, tmp_path, capsys):
    """MGH/MGZ files (FreeSurfer's) carry a voxel-to-RAS matrix as NIfTI files do: the same
    images as .mgz give the same fit, with NIfTI outputs on the fixed grid."""
    mgz = {}
    for name in ("moving", "fixed", "moving_labels", "fixed_labels"):
        image = nibabel.load(files[name])
        mgz[name] = tmp_path / f"{name}.mgz"
        nibabel.save(nibabel.MGHImage(np.asarray(image.dataobj), image.affine), mgz[name])
        again = read_image(mgz[name])
        assert again.grid.same_as(read_image(files[name]).grid)
        np.testing.assert_array_equal(again.data, read_image(files[name]).data)
    summaries = {}
    for kind, paths in (("nifti", files), ("mgz", mgz)):
        out = tmp_path / kind
        assert main(["fit", str(paths["moving"]), str(paths["fixed"]), "-o", str(out), "--labels",
                     str(paths["moving_labels"]), "--fixed-labels", str(paths["fixed_labels"]), "--config",
                     str(files["config"]), "--quiet"]) == 0, capsys.readouterr().err
        summaries[kind] = json.loads((out / "summary.json").read_text())
        assert read_image(out / "warped_labels.nii.gz").grid.same_as(read_image(files["fixed"]).grid)
    for key in ("dice", "dice_before", "folding_fraction", "inverse_consistency_error", "world_overlap"):
        assert summaries["mgz"][key] == pytest.approx(summaries["nifti"][key]), key
    # nfreg warp writes MGH too, in the types MGH holds
    assert main(["warp", str(tmp_path / "mgz" / "result.pt"), str(mgz["moving_labels"]), "-o",
                 str(tmp_path / "w.mgz"), "--interpolation", "label"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "w.mgz").data,
                                  read_image(tmp_path / "mgz" / "warped_labels.nii.gz").data)
    from neuralfield_reg.io.images import save_image
    save_image(tmp_path / "i64.mgz", np.arange(24, dtype=np.int64).reshape(2, 3, 4))
    assert read_image(tmp_path / "i64.mgz").data.dtype == np.int32
    with pytest.raises(TypeError, match="big.mgz.*MGH files hold"):
        save_image(tmp_path / "big.mgz", np.full((2, 3, 4), 2 ** 40, dtype=np.int64))


def test_inputs_are_checked_before_fitting(files, tmp_path, capsys):
    other = Grid.from_spacing((20, 22, 18), 2.0, origin=(-10.0, -21.0, -17.0))      # moved 7 mm
    write_image(tmp_path / "shifted_labels.nii.gz", Image(read_image(files["moving_labels"]).data, other))
    out = tmp_path / "out"
    code = main(["fit", str(files["moving"]), str(files["fixed"]), "-o", str(out), "--labels",
                 str(tmp_path / "shifted_labels.nii.gz"), "--config", str(files["config"]), "--quiet"])
    assert code == 2
    assert "--labels" in capsys.readouterr().err
    assert not (out / "result.pt").exists()
    write_image(tmp_path / "half.nii.gz", Image(np.full((20, 22, 18), 0.5, np.float32),
                                                read_image(files["moving"]).grid))
    assert main(["fit", str(files["moving"]), str(files["fixed"]), "-o", str(out), "--labels",
                 str(tmp_path / "half.nii.gz"), "--config", str(files["config"]), "--quiet"]) == 2
    assert "whole numbers" in capsys.readouterr().err
    labels = read_image(files["moving_labels"])
    noisy = labels.data.astype(np.float32) + np.float32(2e-4) * np.sin(np.arange(labels.data.size)).reshape(
        labels.shape).astype(np.float32)                        # labels another tool stored as floats
    write_image(tmp_path / "float_labels.nii.gz", Image(noisy, labels.grid))
    row = read_row({"moving": str(files["moving"]), "fixed": str(files["fixed"]),
                    "moving_labels": str(tmp_path / "float_labels.nii.gz")})
    np.testing.assert_array_equal(row["moving_labels"].data, labels.data)
    write_image(tmp_path / "far_labels.nii.gz", Image(noisy + np.float32(0.01), labels.grid))
    with pytest.raises(ValueError, match="moving_labels.*whole numbers"):
        read_row({"moving": str(files["moving"]), "fixed": str(files["fixed"]),
                  "moving_labels": str(tmp_path / "far_labels.nii.gz")})
    assert main(["fit", str(files["moving"]), str(files["fixed"]), "-o", str(out), "--init", "sideways",
                 "--config", str(files["config"]), "--quiet"]) == 2
    assert "init" in capsys.readouterr().err


def test_the_brain_pair_as_distributed_starts_from_its_headers(tmp_path, capsys):
    """Colin27 stored RAS on its own field of view, MNI152 stored LAS: read by array index the
    hemispheres are swapped; `nfreg fit` with no options starts from the world alignment (mean
    AAL Dice 0.76 on the packaged 2 mm pair) and ends above it."""
    from neuralfield_reg.data.brain import write_brain_pair_nifti
    paths = write_brain_pair_nifti(tmp_path / "pair")
    fixed_labels = read_image(paths["fixed_labels"]).data
    moving_labels = read_image(paths["moving_labels"]).data
    index_aligned = metrics.mean_dice(np.pad(moving_labels, 2), fixed_labels)   # the arrays as they lie
    out = tmp_path / "out"
    assert main(["fit", str(paths["moving"]), str(paths["fixed"]), "-o", str(out), "--labels",
                 str(paths["moving_labels"]), "--fixed-labels", str(paths["fixed_labels"]), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert index_aligned < 0.3
    assert 0.75 < summary["dice_before"] < 0.78, summary
    assert summary["dice"] > summary["dice_before"] + 0.05, summary
    assert summary["folding_fraction"] < 1e-4


def test_kernels_command_builds_or_finds_the_compiled_kernels(capsys):
    """`nfreg kernels` loads (building if needed) the module that fits use, and names its file."""
    import os

    from neuralfield_reg._cuda_ext import load

    assert main(["kernels"]) == 0
    printed = capsys.readouterr().out.strip()
    path = printed.rsplit(": ", 1)[1]
    assert printed.startswith("compiled kernels for the CPU")
    assert path == load().__file__ and os.path.isfile(path)


def test_kernels_command_says_why_they_cannot_be_built(monkeypatch, capsys):
    """Without a compiler the command exits 1 with the build's reason and the fallback it means."""
    import neuralfield_reg._cuda_ext as extension

    def failing(verbose=False):
        raise extension.NativeBuildError("building the hash-grid kernels failed: no C++ compiler found")

    monkeypatch.setattr(extension, "load", failing)
    assert main(["kernels"]) == 1
    error = capsys.readouterr().err
    assert "no C++ compiler found" in error and "pure-PyTorch backend" in error
