"""ITK/ANTs files read back by an independent reader (SimpleITK, the `interop` extra; skipped
where absent): affine transform files both ways, and displacement fields that reproduce the
library's own warps in 2D and 3D, on grids with other orientations, origins and spacings."""

import dataclasses

import numpy as np
import pytest

import neuralfield_reg as nfr
from neuralfield_reg.geometry import Grid, Image, rotation_matrix
from neuralfield_reg.io.images import write_image
from neuralfield_reg.transforms.itk import lps_to_world, read_affine_itk, world_to_lps, write_affine_itk

nibabel = pytest.importorskip("nibabel")

QUICK = nfr.FitConfig(iterations=40, similarity_points=1024, gradient_icon_points=128,
                      affine=nfr.AffineConfig(iterations=20, rigid_iterations=10, working_size=24))


def random_world(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    world = np.eye(dim + 1)
    rotation = rotation_matrix(rng.uniform(-30, 30, size=1 if dim == 2 else 3))
    world[:dim, :dim] = rotation @ np.diag(rng.uniform(0.8, 1.2, dim))
    world[:dim, dim] = rng.uniform(-20, 20, dim)
    return world


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("suffix", [".txt", ".mat", ".tfm"])
def test_affine_files_round_trip(tmp_path, dim, suffix):
    world = random_world(dim, 1)
    write_affine_itk(tmp_path / f"a{suffix}", world)
    np.testing.assert_allclose(read_affine_itk(tmp_path / f"a{suffix}", dim), world, atol=1e-12)
    np.testing.assert_allclose(lps_to_world(*world_to_lps(world)), world)
    with pytest.raises(ValueError, match="expected 3D" if dim == 2 else "expected 2D"):
        read_affine_itk(tmp_path / f"a{suffix}", 5 - dim)


def test_unreadable_transform_files_are_refused(tmp_path):
    (tmp_path / "bad.txt").write_text("#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\n"
                                      "Parameters: 0 0 0 1 2 3\nFixedParameters: 0 0 0\n")
    with pytest.raises(ValueError, match="bad.txt.*Euler3D"):
        read_affine_itk(tmp_path / "bad.txt")
    (tmp_path / "bad.mat").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="bad.mat"):
        read_affine_itk(tmp_path / "bad.mat")
    with pytest.raises(FileNotFoundError, match="missing.mat"):
        read_affine_itk(tmp_path / "missing.mat")


sitk = pytest.importorskip("SimpleITK")


def lps(points: np.ndarray) -> np.ndarray:
    flip = np.array([-1.0, -1.0, 1.0][:points.shape[-1]])
    return points * flip


@pytest.mark.parametrize("dim", [2, 3])
def test_simpleitk_reads_our_affine_files_and_we_read_its(tmp_path, dim):
    world = random_world(dim, 2)
    points = np.random.default_rng(0).uniform(-50, 50, size=(5, dim))
    expected = points @ world[:dim, :dim].T + world[:dim, dim]
    for suffix in (".txt", ".mat"):
        write_affine_itk(tmp_path / f"ours{suffix}", world)
        transform = sitk.ReadTransform(str(tmp_path / f"ours{suffix}"))
        mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in lps(points)])
        np.testing.assert_allclose(lps(mapped), expected, atol=1e-9)
    # SimpleITK's own transform, with a centre (ITK's fixed parameters), in both formats
    theirs = sitk.AffineTransform(dim)
    matrix, offset = world_to_lps(world)
    theirs.SetMatrix(tuple(matrix.reshape(-1)))
    theirs.SetCenter(tuple(float(c) for c in np.arange(1, dim + 1) * 7.0))
    theirs.SetTranslation(tuple(float(t) for t in offset - (np.eye(dim) - matrix) @ np.array(theirs.GetCenter())))
    for suffix in (".txt", ".mat"):
        sitk.WriteTransform(theirs, str(tmp_path / f"theirs{suffix}"))
        np.testing.assert_allclose(read_affine_itk(tmp_path / f"theirs{suffix}", dim), world, atol=1e-9)


def phantom(grid: Grid):
    world = grid.world_points()
    centre = np.zeros(grid.dim)
    r_body = (((world - centre) / (np.array([16.0, 12.0, 10.0])[:grid.dim])) ** 2).sum(-1)
    side = np.zeros(grid.dim)
    side[0] = 7.0
    r_side = (((world - side) / 4.5) ** 2).sum(-1)
    labels = np.where(r_side < 1, 2, np.where(r_body < 1, 1, 0)).astype(np.uint8)
    intensity = (0.6 / (1 + np.exp(np.clip((r_body - 1) * 6, -50, 50)))
                 + 0.3 / (1 + np.exp(np.clip((r_side - 1) * 6, -50, 50))) + 0.1).astype(np.float32)
    return Image(intensity, grid), Image(labels, grid)


def grids(dim: int) -> tuple[Grid, Grid]:
    if dim == 3:
        fixed = Grid.from_spacing((22, 20, 16), (2.0, 1.8, 2.2), origin=(21.0, -18.0, -16.0),
                                  direction=np.diag([-1.0, 1.0, 1.0]))                    # LAS
        direction = rotation_matrix((10.0, -8.0, 15.0)) @ np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])
        moving = Grid.from_spacing((14, 24, 20), (2.5, 1.6, 2.0), origin=(0.0, 0.0, 0.0), direction=direction)
    else:
        fixed = Grid.from_spacing((36, 30), (1.2, 1.0), origin=(21.0, -15.0), direction=np.diag([-1.0, 1.0]))
        moving = Grid.from_spacing((28, 40), (1.0, 1.3), direction=rotation_matrix((80.0,)))
    # centre the moving grid on the scene, shifted by 2 mm
    shift = np.zeros(dim)
    shift[0] = 2.0
    affine = np.array(moving.world_matrix)
    affine[:dim, dim] += shift - moving.center
    return fixed, Grid(moving.shape, affine)


@pytest.mark.parametrize("dim", [2, 3])
def test_exported_fields_applied_by_simpleitk_reproduce_our_warps(tmp_path, dim):
    fixed_grid, moving_grid = grids(dim)
    fixed, fixed_labels = phantom(fixed_grid)
    moving, moving_labels = phantom(moving_grid)
    config = QUICK if dim == 3 else dataclasses.replace(QUICK, iterations=60)
    result = nfr.fit_pair(moving, fixed, config, progress=False)
    paths = result.save_itk(tmp_path)
    for name, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                        ("moving_labels", moving_labels)):
        write_image(tmp_path / f"{name}.nii.gz", image)

    def read(name):
        return sitk.ReadImage(str(tmp_path / name))

    def as_ours(image):                        # SimpleITK arrays run (z, y, x)
        return np.transpose(sitk.GetArrayFromImage(image))

    for field_name, source, reference, ours in (
            ("displacement", "moving_labels", "fixed", result.warp(moving_labels, mode="nearest", padding="zeros")),
            ("inverse_displacement", "fixed_labels", "moving",
             result.warp_inverse(fixed_labels, mode="nearest", padding="zeros"))):
        field = sitk.Cast(sitk.ReadImage(str(paths[field_name])), sitk.sitkVectorFloat64)
        assert field.GetDimension() == dim and field.GetNumberOfComponentsPerPixel() == dim
        transform = sitk.DisplacementFieldTransform(field)
        theirs = as_ours(sitk.Resample(read(f"{source}.nii.gz"), read(f"{reference}.nii.gz"), transform,
                                       sitk.sitkNearestNeighbor, 0))
        assert theirs.shape == ours.data.shape
        labelled = (theirs > 0) | (ours.data > 0)
        assert labelled.mean() > 0.1
        assert (theirs[labelled] == ours.data[labelled]).mean() >= 0.99, field_name
    # the affine part: SimpleITK's reading of affine.txt maps points as affine_AB does
    transform = sitk.ReadTransform(str(paths["affine_txt"]))
    points = fixed_grid.world_points(4).reshape(-1, dim)
    mapped = lps(np.array([transform.TransformPoint(tuple(map(float, p))) for p in lps(points)]))
    world = result.affine_AB
    np.testing.assert_allclose(mapped, points @ world[:dim, :dim].T + world[:dim, dim], atol=1e-6)
