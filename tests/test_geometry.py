"""Grid and Image: conversions between voxel, unit and world coordinates against hand-built
matrices, refusal of bad headers, NIfTI round trips, resampling by world coordinates."""

import numpy as np
import pytest
import torch

from neuralfield_reg.geometry import Grid, Image, orientation_code, resample_to, rotation_matrix
from neuralfield_reg.io.images import as_image, read_image, write_image

nibabel = pytest.importorskip("nibabel")


def oblique_grid(shape=(10, 12, 8)):
    direction = rotation_matrix((20.0, -10.0, 35.0))
    return Grid.from_spacing(shape, (1.5, 0.8, 2.5), origin=(-30.0, 12.0, 5.0), direction=direction)


def test_conversions_agree_with_the_matrix():
    grid = oblique_grid()
    affine = grid.affine
    voxels = np.array([[0.0, 0.0, 0.0], [9.0, 11.0, 7.0], [2.5, 3.25, 6.0]])
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(grid.voxel_to_world(voxels), world, atol=1e-12)
    np.testing.assert_allclose(grid.world_to_voxel(world), voxels, atol=1e-12)
    unit = voxels / (np.array(grid.shape) - 1)
    np.testing.assert_allclose(grid.unit_to_world(unit), world, atol=1e-12)
    np.testing.assert_allclose(grid.world_to_unit(world), unit, atol=1e-12)
    np.testing.assert_allclose(grid.spacing, (1.5, 0.8, 2.5))
    np.testing.assert_allclose(grid.origin, (-30.0, 12.0, 5.0))
    np.testing.assert_allclose(grid.direction, rotation_matrix((20.0, -10.0, 35.0)), atol=1e-12)
    np.testing.assert_allclose(grid.extent, (13.5, 8.8, 17.5))
    np.testing.assert_allclose(grid.center, grid.voxel_to_world(np.array([4.5, 5.5, 3.5])))
    # torch in, torch out
    out = grid.unit_to_world(torch.tensor(unit, dtype=torch.float64))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), world, atol=1e-12)


def test_2d_grids_embed_in_the_nifti_matrix():
    grid = Grid((5, 7), np.array([[0.0, -2.0, 10.0], [1.5, 0.0, -3.0], [0.0, 0.0, 1.0]]))
    assert grid.affine.shape == (4, 4) and grid.affine[2, 2] == 1.0
    np.testing.assert_allclose(grid.spacing, (1.5, 2.0))
    np.testing.assert_allclose(grid.voxel_to_world(np.array([1.0, 1.0])), [8.0, -1.5])
    assert orientation_code(grid) == "AL"


@pytest.mark.parametrize("affine, message", [
    (np.full((4, 4), np.nan), "NaN"),
    (np.zeros((4, 4)), "zero voxel size"),
    (np.array([[1.0, 2.0, 0, 0], [1.0, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]), "singular"),
    (np.eye(3), "4x4"),
])
def test_bad_matrices_are_refused_by_name(affine, message):
    with pytest.raises(ValueError, match=f"my_scan.*{message}"):
        Grid((4, 4, 4), affine, name="my_scan")


def test_a_2d_slice_out_of_the_xy_plane_is_refused():
    affine = np.eye(4)
    affine[:3, 1] = [0.0, 0.0, 1.0]                     # a coronal slice
    affine[:3, 2] = [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="x-y plane"):
        Grid((4, 4), affine)


def test_orientation_codes():
    assert orientation_code(Grid((3, 3, 3))) == "RAS"
    assert orientation_code(Grid((3, 3, 3), np.diag([-1.0, 1.0, 1.0, 1.0]))) == "LAS"
    lip = np.zeros((4, 4))
    lip[0, 0], lip[2, 1], lip[1, 2], lip[3, 3] = -1.0, -1.0, -1.0, 1.0
    assert orientation_code(Grid((3, 3, 3), lip)) == "LIP"


def test_nifti_round_trip_keeps_the_header_and_a_bad_header_names_the_file(tmp_path):
    grid = oblique_grid()
    data = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    write_image(tmp_path / "scan.nii.gz", Image(data, grid))
    back = read_image(tmp_path / "scan.nii.gz")
    np.testing.assert_allclose(back.affine, grid.affine, atol=1e-5)
    np.testing.assert_array_equal(back.data, data)
    assert back.grid.same_as(grid)

    singular = np.eye(4)
    singular[:3, 2] = singular[:3, 0]
    nibabel.save(nibabel.Nifti1Image(data, singular), tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="bad.nii.gz.*singular"):
        read_image(tmp_path / "bad.nii.gz")
    nibabel.save(nibabel.Nifti1Image(data[:, :1], np.eye(4)), tmp_path / "coronal.nii.gz")   # a coronal slice
    with pytest.raises(ValueError, match=r"coronal.nii.gz.*one voxel along axis 1.*axial"):
        read_image(tmp_path / "coronal.nii.gz")
    nibabel.save(nibabel.Nifti1Image(data[:, :, :1], np.eye(4)), tmp_path / "axial.nii.gz")  # an axial one: 2D
    assert read_image(tmp_path / "axial.nii.gz").grid.dim == 2


def test_big_endian_files_are_read(tmp_path):
    data = np.arange(24, dtype=">f4").reshape(2, 3, 4)
    np.save(tmp_path / "big.npy", data)
    image = nibabel.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    nibabel.save(image, tmp_path / "big.nii")
    for name in ("big.npy", "big.nii"):
        read = read_image(tmp_path / name)
        assert read.data.dtype.isnative
        np.testing.assert_array_equal(read.data, np.arange(24).reshape(2, 3, 4))
        torch.from_numpy(np.ascontiguousarray(read.data))          # usable by torch


def test_every_numeric_dtype_is_written_and_read_back(tmp_path):
    """numpy's int64 (what a label map made with numpy is), bool and float16 have no NIfTI code
    nibabel writes by default: they are stored as int32 (where every value fits), uint8 and float32."""
    values = np.arange(24).reshape(2, 3, 4)
    for dtype, stored in ((np.int64, np.int32), (np.uint64, np.int32), (np.bool_, np.uint8),
                          (np.float16, np.float32), (np.uint16, np.uint16), (np.complex64, np.complex64)):
        write_image(tmp_path / "a.nii.gz", Image(values.astype(dtype), spacing=1.0))
        read = read_image(tmp_path / "a.nii.gz").data
        assert read.dtype == stored, dtype
        np.testing.assert_array_equal(read, values.astype(dtype))
    big = values.astype(np.int64) * 2 ** 40                                # beyond int32: kept 64-bit
    write_image(tmp_path / "big.nii.gz", Image(big, spacing=1.0))
    assert read_image(tmp_path / "big.nii.gz").data.dtype == np.int64
    np.testing.assert_array_equal(read_image(tmp_path / "big.nii.gz").data, big)


def test_an_rgb_image_is_refused_by_name(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    from neuralfield_reg.validation import check_image
    with pytest.raises(TypeError, match="moving: expected an array of numbers.*RGB"):
        check_image("moving", read_image(tmp_path / "rgb.nii.gz").data)


def test_intensities_beyond_float32_are_warped_in_float64():
    from neuralfield_reg.app.cohort import _storable
    assert _storable(np.array([[1.0, 2.0], [3.0, 4.0]])).dtype == np.float32
    huge = np.array([[1e300, 2.0], [3.0, 4.0]])
    assert _storable(huge).dtype == np.float64 and np.isfinite(_storable(huge)).all()


def test_as_image_says_which_inputs_carry_geometry(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    assert as_image("moving", array, spacing=2.0)[1] is False
    assert as_image("moving", array, spacing=2.0)[0].spacing == (2.0, 2.0, 2.0)
    nibabel.save(nibabel.Nifti1Image(array, np.diag([-1.0, 1.0, 1.0, 1.0])), tmp_path / "a.nii.gz")
    image, known = as_image("moving", tmp_path / "a.nii.gz")
    assert known and orientation_code(image.grid) == "LAS"
    image, known = as_image("moving", nibabel.load(tmp_path / "a.nii.gz"))
    assert known and orientation_code(image.grid) == "LAS"
    np.save(tmp_path / "a.npy", array)
    assert as_image("moving", tmp_path / "a.npy")[1] is False         # .npy has no header
    with pytest.raises(TypeError, match="moving"):
        as_image("moving", [1, 2, 3])
    with pytest.raises(FileNotFoundError, match="^moving: path: no file at .*missing.nii.gz"):
        as_image("moving", tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="^moving: path: 'hello' has an unknown extension"):
        as_image("moving", "hello")


def test_resampling_by_world_coordinates_is_exact_for_a_linear_function():
    """Linear interpolation reproduces a linear function of world position exactly, so a
    resampled image must equal that function at the target's voxels (inside the source box)."""
    source = oblique_grid((16, 18, 14))
    target = Grid.from_spacing((9, 10, 8), (1.2, 1.1, 1.3), origin=tuple(source.center - 4.0),
                               direction=np.diag([-1.0, 1.0, -1.0]))

    def f(world):
        return world @ np.array([0.3, -0.2, 0.5]) + 7.0

    image = Image(f(source.world_points()).astype(np.float64), source)
    out = resample_to(image, target)
    points = target.world_points()
    inside = source.contains(points)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out.data[inside], f(points)[inside], atol=1e-6)
    assert out.grid is target
    labels = Image((f(source.world_points()) > 7.0).astype(np.uint8), source)
    nearest = resample_to(labels, target, mode="nearest")
    assert nearest.data.dtype == np.uint8
    agree = nearest.data[inside] == (f(points)[inside] > 7.0)
    assert agree.mean() > 0.9


def test_a_coarser_grid_keeps_the_field_of_view_and_coarsening_keeps_a_linear_image():
    """Only the axes at least 1.5 times finer than the given spacing are coarsened, to at most that
    spacing; the first and last voxel centres stay (the same unit-to-world matrix, so maps in unit
    coordinates mean the same on both grids); a linear function of world position survives the
    anti-aliasing blur and the resampling away from the edges (an analytic check)."""
    from neuralfield_reg.geometry.resample import coarsen, coarser_grid

    fine = Grid.from_spacing((33, 25, 9), (1.0, 1.25, 3.0), origin=(-30.0, 12.0, 5.0),
                             direction=rotation_matrix((20.0, -10.0, 35.0)))
    coarse = coarser_grid(fine, 2.0)
    assert coarse.shape == (17, 16, 9)                       # 1 mm and 1.25 mm -> <= 2 mm; 3 mm kept
    assert all(s <= 2.0 + 1e-9 for s in coarse.spacing[:2]) and coarse.spacing[2] == pytest.approx(3.0)
    np.testing.assert_allclose(coarse.unit_to_world_matrix(), fine.unit_to_world_matrix(), atol=1e-12)
    assert coarser_grid(fine, 1.4) is fine                   # 1.4 < 1.5 x 1 mm: nothing to gain

    def f(world):
        return world @ np.array([0.3, -0.2, 0.5]) + 7.0

    data = torch.from_numpy(f(fine.world_points())).float()
    out = coarsen(data, fine, coarse).numpy()
    assert out.shape == coarse.shape
    interior = (slice(2, -2), slice(2, -2), slice(None))     # the blur replicates the edges
    np.testing.assert_allclose(out[interior], f(coarse.world_points())[interior], atol=1e-4)
    assert coarsen(data, fine, fine) is data


def test_coarsening_smooths_before_it_resamples():
    """A pattern at the fine grid's Nyquist frequency has no place on the coarse grid: resampled
    alone, every other voxel is picked and it becomes a constant (aliasing); coarsened, the
    Gaussian (sigma = 1/2 voxel for a factor 2, sampled out to 3 sigma) first takes it down to
    sum_k w_k (-1)^k / sum_k w_k = 0.57 of its amplitude."""
    from neuralfield_reg.geometry.filters import resample
    from neuralfield_reg.geometry.resample import coarsen, coarser_grid

    fine = Grid.from_spacing((41, 6), (1.0, 2.0))
    coarse = coarser_grid(fine, 2.0)
    assert coarse.shape == (21, 6)
    stripes = torch.tensor([(-1.0) ** i for i in range(41)])[:, None].expand(41, 6).contiguous()
    aliased = resample(stripes, coarse.shape)
    np.testing.assert_allclose(aliased.numpy(), 1.0, atol=1e-5)
    smoothed = coarsen(stripes, fine, coarse)[3:-3]
    offsets = np.arange(-2, 3)
    weights = np.exp(-offsets ** 2 / (2 * 0.5 ** 2))
    np.testing.assert_allclose(smoothed.abs().numpy(), (weights * (-1.0) ** offsets).sum() / weights.sum(), atol=1e-3)
