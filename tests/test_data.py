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
