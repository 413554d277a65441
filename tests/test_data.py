import numpy as np

from neuralfield_reg.data import Shape, shape_pairs


def test_shapes_are_reproducible_and_in_range():
    first, second = shape_pairs(3, 64, seed=5), shape_pairs(3, 64, seed=5)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.moving, b.moving)
    pair = first[0]
    assert pair.moving.shape == (64, 64) and pair.moving.dtype == np.float32
    assert 0.0 <= pair.moving.min() and pair.moving.max() <= 1.0
    assert set(np.unique(pair.moving_labels)) <= {0, 1}


def test_circle_label_area_and_hollow_outline():
    circle = Shape("circle", (0.5, 0.5), 0.3, 0.0)
    image, labels = circle.render(201, hollow=True)
    area = labels.mean()
    assert abs(area - np.pi * 0.3 ** 2) < 0.01
    # The outline is bright on the boundary and dark at the centre and in the corners.
    assert image[100, 100] < 0.01 and image[0, 0] < 0.01 and image[100, 40] > 0.9


def test_triangle_area_matches_an_equilateral_triangle():
    triangle = Shape("triangle", (0.5, 0.5), 0.3, 0.4)
    _, labels = triangle.render(301, hollow=False)
    expected = 3 * np.sqrt(3) / 4 * 0.3 ** 2      # circumradius R: area 3 sqrt(3) R^2 / 4
    assert abs(labels.mean() - expected) < 0.01


def test_bodies_are_reproducible_with_the_stated_intensities_and_labels():
    from neuralfield_reg.data.shapes3d import body_pairs
    first, second = body_pairs(2, 32, seed=3), body_pairs(2, 32, seed=3)
    np.testing.assert_array_equal(first[1].fixed, second[1].fixed)
    pair = first[0]
    assert pair.moving.shape == (32, 32, 32) and pair.moving.dtype == np.float32
    assert set(np.unique(pair.moving_labels)) == {0, 1, 2, 3}
    # At 64^3, the median intensity of each structure is near the stated one and its extreme
    # reaches it (edges are a few voxels wide),
    # and sphere 2's voxel count is the volume of its ball (radius from the generator).
    from neuralfield_reg.data.shapes3d import Body
    body = Body.random(np.random.default_rng(7))
    image, labels = body.render(64)
    for label, intensity in ((0, 0.0), (1, 0.5), (2, 1.0), (3, 0.2)):
        assert abs(np.median(image[labels == label]) - intensity) < 0.1, label
    assert image[labels == 2].max() > 0.99 and image[labels == 3].min() < 0.21
    radius_voxels = body.spheres[0, 3] * 63
    assert abs((labels == 2).sum() / (4 / 3 * np.pi * radius_voxels ** 3) - 1) < 0.1


def test_brain_pair_is_world_aligned_with_aal_labels():
    from neuralfield_reg.data.brain import load_brain_pair
    from neuralfield_reg.metrics import mean_dice
    pair = load_brain_pair(2)
    assert pair.moving.shape == pair.fixed.shape == pair.moving_labels.shape == (91, 109, 91)
    assert pair.spacing == (2.0, 2.0, 2.0) and len(pair.label_names) == 116
    assert pair.label_names[1] == "Precentral_L" and pair.label_names[2] == "Precentral_R"
    assert set(np.unique(pair.fixed_labels)) == set(range(117))
    # RAS: the left precentral gyrus (label 1) lies at negative x in both images (no L/R flip),
    # and the two label maps overlap as a world-aligned start should (measured 0.762).
    for labels in (pair.moving_labels, pair.fixed_labels):
        centroid = pair.affine[:3, :3] @ np.argwhere(labels == 1).mean(0) + pair.affine[:3, 3]
        assert centroid[0] < -20
    assert 0.74 < mean_dice(pair.moving_labels, pair.fixed_labels) < 0.78


def test_prepare_brain_pair_brings_ras_and_las_files_onto_one_grid(tmp_path):
    nibabel = __import__("pytest").importorskip("nibabel")
    from neuralfield_reg.data.brain import load_brain_pair, prepare_brain_pair
    rng = np.random.default_rng(0)
    # A world volume on x, y, z in [-4, 5] x [-5, 4] x [-3, 6] mm; the "MNI" file stores it LAS,
    # the "Colin27" file RAS and one voxel smaller at the low end of every axis.
    world = rng.integers(1, 200, size=(10, 10, 10)).astype(np.float32)
    las = np.array([[-1.0, 0, 0, 5], [0, 1, 0, -5], [0, 0, 1, -3], [0, 0, 0, 1]])
    ras = np.array([[1.0, 0, 0, -3], [0, 1, 0, -4], [0, 0, 1, -2], [0, 0, 0, 1]])
    templates, data = tmp_path / "templates", tmp_path / "data"
    templates.mkdir(), data.mkdir()
    for name, folder in (("mni", data), ("mnia", data)):
        nibabel.save(nibabel.Nifti1Image(world[::-1].copy(), las), folder / f"{name}.nii.gz")
    for name in ("ch2bet", "aal"):
        nibabel.save(nibabel.Nifti1Image(world[1:, 1:, 1:].copy(), ras), templates / f"{name}.nii.gz")
    (templates / "aal.nii.txt").write_text("1 Precentral_L 2001\n2 Precentral_R 2002\n")
    pair = load_brain_pair(path=prepare_brain_pair(templates, data, tmp_path / "pair.npz", resolution_mm=1))
    np.testing.assert_array_equal(pair.affine, [[1, 0, 0, -4], [0, 1, 0, -5], [0, 0, 1, -3], [0, 0, 0, 1]])
    expected = np.round(255 * (world - world.min()) / (world.max() - world.min())) / 255
    np.testing.assert_allclose(pair.fixed, expected, atol=1e-6)
    inner = world[1:, 1:, 1:]                 # the moving grid is zero where Colin27 has no voxel
    assert not pair.moving[0].any() and not pair.moving[:, 0].any() and not pair.moving[:, :, 0].any()
    np.testing.assert_allclose(pair.moving[1:, 1:, 1:], np.round(255 * inner / inner.max()) / 255, atol=1e-6)
    np.testing.assert_array_equal(pair.fixed_labels, np.round(world).astype(np.uint8))
    assert pair.label_names == {1: "Precentral_L", 2: "Precentral_R"}
