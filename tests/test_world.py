"""Registration in world coordinates: the same scans stored in other orientations, with other
headers, fields of view and spacings give the same answer; the initialisations; the result's
world maps, warps onto other grids and files."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg import metrics
from neuralfield_reg.registration.affine import AffineTransform
from neuralfield_reg.geometry import Grid, Image, orientation_code, resample_to, rotation_matrix
from neuralfield_reg.transforms.world import initial_world, local_to_world, world_to_local, world_to_unit

QUICK = nfr.FitConfig(iterations=40, similarity_points=1024, gradient_icon_points=128, hidden_widths=(32, 32),
                      affine=nfr.AffineConfig(iterations=20, rigid_iterations=10, working_size=24))


def scene(world, shift=(0.0, 0.0, 0.0)):
    """An asymmetric labelled phantom defined in world mm: an ellipsoid body (label 1) holding a
    sphere on its right (label 2) and a smaller one anterior-superior (label 3). Returns smooth
    intensities and labels."""
    p = world - np.asarray(shift)
    body = ((p / np.array([17.0, 13.0, 11.0])) ** 2).sum(-1)
    right = (((p - [8.0, 0.0, 0.0]) / 5.0) ** 2).sum(-1)
    front = (((p - [-5.0, 6.0, 4.0]) / 3.5) ** 2).sum(-1)
    labels = np.where(body < 1, 1, 0)
    labels = np.where(right < 1, 2, labels)
    labels = np.where(front < 1, 3, labels).astype(np.uint8)
    def inside(r2):
        return 1.0 / (1.0 + np.exp(np.clip((r2 - 1.0) * 8.0, -50.0, 50.0)))
    intensity = 0.5 * inside(body) + 0.4 * inside(right) - 0.3 * inside(front) + 0.3
    return intensity.astype(np.float32), labels


def sampled(grid, shift=(0.0, 0.0, 0.0)):
    intensity, labels = scene(grid.world_points(), shift)
    return Image(intensity, grid), Image(labels, grid)


def restored(image: Image, order, flips) -> Image:
    """The same image stored with its axes in another order (new axis k = old axis order[k]) and
    the new axes in ``flips`` reversed; the header changes so that every voxel keeps its world
    position."""
    data = np.transpose(image.data, order)
    affine = np.array(image.affine)
    columns = affine[:3, list(order)]
    affine[:3, :3] = columns
    for axis in flips:
        data = np.flip(data, axis)
        affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        affine[:3, axis] *= -1
    return Image(np.ascontiguousarray(data), Grid(data.shape, affine))


FIXED_GRID = Grid.from_spacing((22, 20, 18), 2.0, origin=(-21.0, -19.0, -17.0))
MOVING_GRID = Grid.from_spacing((24, 20, 20), 2.0, origin=(-23.0, -18.0, -20.0))
STORAGES = {"RAS": ((0, 1, 2), ()), "LAS": ((0, 1, 2), (0,)), "LIP": ((0, 2, 1), (0, 1, 2)),
            "SRA": ((2, 0, 1), ())}


def test_local_unit_and_world_forms_agree():
    moving = Grid.from_spacing((10, 12, 9), (1.0, 2.0, 1.5), origin=(3.0, -4.0, 8.0),
                               direction=rotation_matrix((10.0, 20.0, -30.0)) @ np.diag([-1.0, 1.0, 1.0]))
    fixed = Grid.from_spacing((8, 11, 13), (2.0, 1.0, 1.0), origin=(-5.0, 2.0, 1.0),
                              direction=rotation_matrix((-5.0, 0.0, 15.0)))
    world = np.eye(4)
    world[:3, :3] = 1.1 * rotation_matrix((3.0, -4.0, 5.0))
    world[:3, 3] = (2.0, -1.0, 0.5)
    linear, translation = world_to_local(world, moving, fixed)
    np.testing.assert_allclose(local_to_world(linear, translation, moving, fixed), world, atol=1e-12)
    transform = AffineTransform(torch.from_numpy(linear), torch.from_numpy(translation), moving.extent, fixed.extent)
    matrix, offset = transform.unit_AB()
    expected_matrix, expected_offset = world_to_unit(world, moving, fixed)
    np.testing.assert_allclose(matrix.numpy(), expected_matrix, atol=1e-12)
    np.testing.assert_allclose(offset.numpy(), expected_offset, atol=1e-12)
    # a fixed voxel's world point, mapped by the unit form, lands where the world form sends it
    unit = np.array([0.3, 0.6, 0.2])
    np.testing.assert_allclose(moving.unit_to_world(expected_matrix @ unit + expected_offset),
                               world[:3, :3] @ fixed.unit_to_world(unit) + world[:3, 3], atol=1e-9)
    centers = initial_world("centers", moving, fixed)
    np.testing.assert_allclose(centers[:3, :3] @ fixed.center + centers[:3, 3], moving.center)


def test_same_scans_stored_in_other_orientations_give_the_same_warped_labels():
    fixed, fixed_labels = sampled(FIXED_GRID)
    moving, moving_labels = sampled(MOVING_GRID, shift=(2.0, -1.5, 1.0))
    reference = None
    for name, (order, flips) in STORAGES.items():
        stored, stored_labels = restored(moving, order, flips), restored(moving_labels, order, flips)
        assert orientation_code(stored.grid) == name
        result = nfr.fit_pair(stored, fixed, QUICK, progress=False)
        assert result.metadata["init"] == "world"
        warped = result.warp(stored_labels, mode="nearest")
        assert warped.grid is result.fixed_grid
        dice = metrics.mean_dice(warped.data, fixed_labels.data)
        assert metrics.folding_fraction(result.jacobian_determinant()) == 0.0     # no flip counted as a fold
        if reference is None:
            reference, reference_dice = warped.data, dice
            assert dice > 0.85
            continue
        labelled = (reference > 0) | (warped.data > 0)
        assert (reference[labelled] == warped.data[labelled]).mean() > 0.97, name
        assert abs(dice - reference_dice) < 0.02, name
    # Read by array index (bare arrays, no header), the x-flipped copy cannot be registered:
    # a rotation search cannot undo a reflection.
    las, las_labels = restored(moving, *STORAGES["LAS"]), restored(moving_labels, *STORAGES["LAS"])
    blind = nfr.fit_pair(las.data, fixed.data, QUICK, progress=False)
    assert metrics.mean_dice(blind.warp(las_labels.data, mode="nearest"), fixed_labels.data) < reference_dice - 0.1


def test_a_header_change_of_both_images_changes_nothing_and_a_given_transform_undoes_one():
    fixed, fixed_labels = sampled(FIXED_GRID)
    moving, moving_labels = sampled(MOVING_GRID, shift=(2.0, -1.5, 1.0))
    config = dataclasses.replace(QUICK, affine=None)
    motion = np.eye(4)
    motion[:3, :3] = rotation_matrix((25.0, -40.0, 70.0))
    motion[:3, 3] = (100.0, -50.0, 30.0)

    def moved(image):
        return Image(image.data, Grid(image.shape, motion @ image.affine))

    first = nfr.fit_pair(moving, fixed, config, progress=False)
    second = nfr.fit_pair(moved(moving), moved(fixed), config, progress=False)
    np.testing.assert_allclose(second.maps.matrices.numpy(), first.maps.matrices.numpy(), atol=1e-6)
    np.testing.assert_allclose(second.maps.offsets.numpy(), first.maps.offsets.numpy(), atol=1e-6)
    np.testing.assert_array_equal(second.warp(moved(moving_labels), mode="nearest").data,
                                  first.warp(moving_labels, mode="nearest").data)
    # The moving header alone moved (the scanner reported another position): the world start is
    # wrong by `motion`, and init=motion (fixed -> moving points) puts every voxel back.
    start = nfr.fit_pair(moved(moving), moving, dataclasses.replace(config, iterations=1), init=motion,
                         progress=False)
    np.testing.assert_allclose(start.affine_AB, motion, atol=1e-5)
    np.testing.assert_allclose(start.maps.matrices[0].numpy(), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(start.maps.offsets[0].numpy(), np.zeros(3), atol=1e-6)


def test_oblique_anisotropic_smaller_field_of_view_is_undone_by_the_world_start():
    fixed, fixed_labels = sampled(FIXED_GRID)
    oblique = Grid.from_spacing((30, 16, 12), (1.2, 2.0, 3.0), origin=(-20.0, -14.0, -12.0),
                                direction=rotation_matrix((15.0, -10.0, 25.0)))
    oblique = Grid(oblique.shape, oblique.affine)
    corner = oblique.center - (oblique.unit_to_world(np.full(3, 0.5)) - oblique.unit_to_world(np.zeros(3)))
    oblique = Grid(oblique.shape, np.vstack([np.hstack([oblique.affine[:3, :3], corner[:, None]]), [0, 0, 0, 1]]))
    moving, moving_labels = sampled(oblique)
    start = nfr.fit_pair(moving, fixed, dataclasses.replace(QUICK, affine=None, iterations=1), progress=False)
    with torch.no_grad():                    # the start alone: the fields' output layer back at zero
        start.maps.fields.weights[-1].zero_()
        start.maps.fields.biases[-1].zero_()
    warped = start.warp(moving)
    inside = oblique.contains(FIXED_GRID.world_points(), margin=-1.0)
    assert 0.3 < inside.mean() < 0.9                                   # a smaller field of view
    error = np.abs(warped.data - fixed.data)[inside]               # interpolation error of 3 mm voxels
    assert error.mean() < 0.02 and error.max() < 0.2
    # the start's warp is resampling by world coordinates (an independent implementation)
    resampled = resample_to(moving, FIXED_GRID).data
    assert np.abs(warped.data - resampled)[inside].max() < 1e-4
    labels = start.warp(moving_labels, mode="nearest").data
    assert (labels == resample_to(moving_labels, FIXED_GRID, mode="nearest").data)[inside].mean() > 0.999
    assert (labels[inside] == fixed_labels.data[inside]).mean() > 0.9      # 3 mm nearest-neighbour labels
    np.testing.assert_allclose(start.jacobian_determinant(), 1.0, atol=1e-4)
    full = nfr.fit_pair(moving, fixed, QUICK, progress=False)
    labels = full.warp(moving_labels, mode="nearest").data
    assert (labels[inside] == fixed_labels.data[inside]).mean() > 0.9


def test_world_maps_affine_part_and_warps_onto_other_grids():
    fixed, fixed_labels = sampled(FIXED_GRID)
    moving, moving_labels = sampled(restored(sampled(MOVING_GRID)[0], *STORAGES["LIP"]).grid, shift=(2.0, 0.0, 0.0))
    result = nfr.fit_pair(moving, fixed, QUICK, progress=False)
    # world_AB agrees with the unit maps
    unit = torch.rand(50, 3)
    with torch.no_grad():
        mapped = result.phi_AB(unit).double().numpy()
    np.testing.assert_allclose(result.world_AB(FIXED_GRID.unit_to_world(unit.double().numpy())),
                               moving.grid.unit_to_world(mapped), atol=1e-3)
    back = result.world_BA(result.world_AB(FIXED_GRID.world_points(6).reshape(-1, 3)))
    assert np.abs(back - FIXED_GRID.world_points(6).reshape(-1, 3)).mean() < 0.5     # mm
    # the affine part found the 2 mm shift along x (world)
    assert abs(result.affine_AB[0, 3] - 2.0) < 1.0 and np.abs(result.affine_AB[:3, :3] - np.eye(3)).max() < 0.1
    default = result.warp(moving_labels, mode="nearest").data
    # The moving labels at twice the resolution, on another grid, read by world position: closer
    # to the phantom's labels at the mapped points than the 2 mm labels are (nearest-neighbour
    # error 0.5 mm instead of 1 mm).
    fine_grid = Grid.from_spacing((48, 40, 40), 1.0, origin=(-23.5, -18.5, -20.5))
    fine = Image(scene(fine_grid.world_points(), (2.0, 0.0, 0.0))[1], fine_grid)
    from_fine = result.warp(fine, mode="nearest").data
    truth = scene(result.world_AB(FIXED_GRID.world_points().reshape(-1, 3)), (2.0, 0.0, 0.0))[1]
    truth = truth.reshape(FIXED_GRID.shape)

    def agreement(labels):
        labelled = (labels > 0) | (truth > 0)
        return (labels[labelled] == truth[labelled]).mean()
    assert agreement(from_fine) > 0.85 and agreement(from_fine) > agreement(default) + 0.03
    # onto a cropped reference grid: the same voxels as the default output
    cropped = Grid(FIXED_GRID.shape[:2] + (10,), FIXED_GRID.affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4.0], [0, 0, 0, 1]]))
    onto = result.warp(moving_labels, mode="nearest", reference=cropped)
    assert onto.grid is cropped
    assert (onto.data == default[:, :, 4:14]).mean() > 0.99
    inverse = result.warp_inverse(fixed_labels, mode="label")
    assert inverse.grid is result.moving_grid
    assert metrics.mean_dice(inverse.data, moving_labels.data) > 0.8


def test_grids_survive_save_and_load_and_old_files_still_load(tmp_path):
    fixed, _ = sampled(FIXED_GRID)
    moving, _ = sampled(restored(sampled(MOVING_GRID)[0], *STORAGES["LAS"]).grid)
    result = nfr.fit_pair(moving, fixed, dataclasses.replace(QUICK, iterations=2), progress=False)
    result.save(tmp_path / "r.pt")
    loaded = nfr.RegistrationResult.load(tmp_path / "r.pt")
    assert loaded.moving_grid.same_as(moving.grid) and loaded.fixed_grid.same_as(fixed.grid)
    np.testing.assert_allclose(loaded.affine_AB, result.affine_AB, atol=1e-6)
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    del state["moving_grid"], state["fixed_grid"]                      # as written before grids existed
    torch.save(state, tmp_path / "old.pt")
    old = nfr.RegistrationResult.load(tmp_path / "old.pt")
    assert old.moving_shape == moving.shape and old.moving_spacing == moving.spacing
    state["maps"]["matrices"][0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt.*non-finite"):
        nfr.RegistrationResult.load(tmp_path / "nan.pt")


def test_initialisation_choices_and_their_errors(tmp_path):
    fixed, _ = sampled(FIXED_GRID)
    far = Grid(MOVING_GRID.shape, MOVING_GRID.affine @ np.array(
        [[1, 0, 0, 300.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))     # 600 mm away
    moving, _ = sampled(far, shift=(600.0, 0.0, 0.0))
    config = dataclasses.replace(QUICK, affine=None, iterations=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        world = nfr.fit_pair(moving, fixed, config, init="world", progress=False)
    assert world.metadata["start_overlap"] == 0.0 and world.metadata["init"] == "world"
    assert any("init='centers'" in str(w.message) for w in caught)
    # By default, headers that put nothing of one image in the other give way to the images'
    # moments (the scene is 600 mm along x in the moving image's world).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = nfr.fit_pair(moving, fixed, config, progress=False)
    assert default.metadata["init"] == "moments"
    assert any("starting from the images' moments" in str(w.message) for w in caught)
    np.testing.assert_allclose(default.affine_AB[:3, 3], [600.0, 0.0, 0.0], atol=2.0)
    np.testing.assert_allclose(default.affine_AB[:3, :3], np.eye(3), atol=0.05)
    centers = nfr.fit_pair(moving, fixed, config, init="centers", progress=False)
    np.testing.assert_allclose(centers.affine_AB[:3, :3] @ fixed.grid.center + centers.affine_AB[:3, 3],
                               moving.grid.center, atol=1e-3)
    assert centers.metadata["start_overlap"] > 0.8
    from neuralfield_reg.transforms.itk import write_affine_itk
    write_affine_itk(tmp_path / "start.mat", centers.affine_AB)
    given = nfr.fit_pair(moving, fixed, config, init=str(tmp_path / "start.mat"), progress=False)
    np.testing.assert_allclose(given.affine_AB, centers.affine_AB, atol=1e-5)
    (tmp_path / "bad.mat").write_text("garbage")
    for bad, message in (("nowhere", "no such file"), (np.eye(3), r"\(4, 4\)"),
                         (str(tmp_path / "bad.mat"), "bad.mat' is not a readable ITK affine"),
                         (np.diag([-1.0, 1.0, 1.0, 1.0]), "reflection")):
        with pytest.raises(ValueError, match=f"^init: .*{message}"):
            nfr.fit_pair(moving, fixed, config, init=bad, progress=False)
    with pytest.raises(ValueError, match="moving and fixed.*header"):
        nfr.fit_pair(moving, fixed.data, config, progress=False)
    with pytest.raises(ValueError, match="spacing.*own geometry"):
        nfr.fit_pair(moving, fixed, config, spacing=2.0, progress=False)
    mask = Image(np.ones(fixed.shape, bool), Grid(fixed.shape, np.diag([3.0, 3.0, 3.0, 1.0])))
    with pytest.raises(ValueError, match="fixed_mask.*grid"):
        nfr.fit_pair(moving, fixed, config, init="centers", fixed_mask=mask, progress=False)


def test_world_identity_of_differently_stored_2d_images():
    grid = Grid.from_spacing((30, 26), (1.0, 1.5), origin=(-15.0, -20.0))
    world = grid.world_points()
    blob = np.exp(-(((world - [3.0, -1.0]) / [7.0, 9.0]) ** 2).sum(-1)).astype(np.float32)
    blob += 0.5 * np.exp(-(((world - [-6.0, 8.0]) / 3.0) ** 2).sum(-1)).astype(np.float32)
    fixed = Image(blob, grid)
    flipped = Image(np.ascontiguousarray(blob[::-1].T), Grid((26, 30), np.array(
        [[0.0, -1.0, grid.world_matrix[0, 2] + 29.0], [1.5, 0.0, grid.world_matrix[1, 2]], [0.0, 0.0, 1.0]])))
    np.testing.assert_allclose(resample_to(flipped, grid).data, blob, atol=1e-5)
    result = nfr.fit_pair(flipped, fixed, nfr.FitConfig(iterations=30, affine=nfr.AffineConfig(iterations=10,
                                                                                                rigid_iterations=10)),
                          progress=False)
    assert np.abs(result.warp(flipped).data - blob).mean() < 0.01
    assert (result.jacobian_determinant() > 0).all()


def test_fit_pairs_starts_each_pair_from_its_own_headers():
    fixed, fixed_labels = sampled(FIXED_GRID)
    moving, moving_labels = sampled(MOVING_GRID, shift=(2.0, -1.5, 1.0))
    las, las_labels = restored(moving, (0, 1, 2), (0,)), restored(moving_labels, (0, 1, 2), (0,))
    config = dataclasses.replace(QUICK, affine=None, iterations=20)
    results = nfr.fit_pairs([moving, las], [fixed, fixed], config, progress=False)
    single = nfr.fit_pair(las, fixed, config, seed=1, progress=False)
    np.testing.assert_allclose(results[1].maps.matrices.numpy(), single.maps.matrices.numpy(), atol=1e-6)
    for result, labels in zip(results, (moving_labels, las_labels)):
        np.testing.assert_allclose(result.affine_AB, np.eye(4), atol=1e-5)          # the world identity
        assert metrics.mean_dice(result.warp(labels, mode="nearest").data, fixed_labels.data) > 0.8
    # A pair whose headers do not meet starts from its moments; the other pair keeps its headers.
    far_grid = Grid(MOVING_GRID.shape, MOVING_GRID.affine @ np.array(
        [[1, 0, 0, 300.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))     # 600 mm away
    far, _ = sampled(far_grid, shift=(600.0, 0.0, 0.0))
    with pytest.warns(UserWarning, match="of pair 1 inside the moving image .*moments"):
        mixed = nfr.fit_pairs([moving, far], [fixed, fixed], dataclasses.replace(config, iterations=1),
                              progress=False)
    assert [r.metadata["init"] for r in mixed] == ["world", "moments"]
    np.testing.assert_allclose(mixed[0].affine_AB, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(mixed[1].affine_AB[:3, 3], [600.0, 0.0, 0.0], atol=2.0)
    with pytest.raises(ValueError, match="same voxel sizes"):
        nfr.fit_pairs([moving, Image(moving.data, spacing=1.0)], [fixed, fixed], config, progress=False)


def test_a_finer_moving_image_is_fitted_at_the_fixed_resolution():
    """A 1 mm moving scan (and its mask) against a 2 mm fixed one: the fit samples the moving
    image smoothed and resampled to 2 mm over its own field of view (the same unit cube), which is
    what a fit on that coarser image given by the caller does (to 1/40 voxel: the smoothed image's
    maximum is 1 - 2e-7, which the caller's fit rescales to 1); the result stays on the
    given 1 mm grid, and warps the 1 mm labels as well as the fit on the 1 mm image itself."""
    from neuralfield_reg.geometry.resample import coarsen, coarser_grid

    fine_grid = Grid.from_spacing((47, 39, 39), 1.0, origin=MOVING_GRID.origin)
    coarse_grid = coarser_grid(fine_grid, 2.0)
    assert coarse_grid.shape == MOVING_GRID.shape
    fixed, fixed_labels = sampled(FIXED_GRID)
    moving, moving_labels = sampled(fine_grid, shift=(2.0, -1.5, 1.0))
    # in [0, 1] with both ends on flat regions: normalising the intensities nearly commutes with smoothing
    moving = moving.with_data(np.clip((moving.data - 0.3) / 0.8, 0.0, 1.0))
    mask = moving_labels.data > 0
    result = nfr.fit_pair(moving, fixed, QUICK, moving_mask=mask, progress=False)
    assert result.moving_grid.same_as(fine_grid) and result.metadata["moving_fit_shape"] == coarse_grid.shape
    batched = nfr.fit_pairs([moving], [fixed], QUICK, moving_masks=[mask], progress=False)[0]
    assert batched.history == result.history and batched.moving_grid.same_as(fine_grid)

    as_coarse = Image(coarsen(torch.from_numpy(moving.data), fine_grid, coarse_grid).numpy(), coarse_grid)
    coarse_mask = coarsen(torch.from_numpy(mask).float(), fine_grid, coarse_grid).numpy() >= 0.5
    off = dataclasses.replace(QUICK, moving_at_fixed_resolution=False)
    given = nfr.fit_pair(as_coarse, fixed, off, moving_mask=coarse_mask, progress=False)
    np.testing.assert_allclose(result.world_displacement("AB"), given.world_displacement("AB"), atol=0.05)

    at_1mm = nfr.fit_pair(moving, fixed, off, moving_mask=mask, progress=False)
    assert at_1mm.metadata["moving_fit_shape"] == fine_grid.shape
    agree = [(r.warp(moving_labels, mode="nearest").data == fixed_labels.data).mean() for r in (result, at_1mm)]
    assert agree[0] > 0.9 and agree[0] > agree[1] - 0.01
