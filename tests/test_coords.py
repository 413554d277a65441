"""Coordinates and sampling against closed-form answers."""

import pytest
import torch

from neuralfield_reg.geometry.coords import (identity_grid, physical_extent, sample, sample_batch, unit_to_voxel,
                                    voxel_to_unit)


def test_identity_grid_puts_voxel_centres_at_i_over_n_minus_1():
    grid = identity_grid((3, 5))
    assert grid.shape == (3, 5, 2)
    torch.testing.assert_close(grid[2, 4], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(grid[1, 3], torch.tensor([0.5, 0.75]))
    grid3 = identity_grid((2, 3, 4))
    torch.testing.assert_close(grid3[1, 2, 3], torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(grid3[0, 1, 1], torch.tensor([0.0, 0.5, 1 / 3]))


def test_identity_grid_rejects_single_voxel_axes():
    with pytest.raises(ValueError, match="shape"):
        identity_grid((1, 5))


def test_voxel_unit_round_trip_and_extent():
    voxels = torch.tensor([[0.0, 0.0], [4.0, 9.0], [1.5, 2.25]])
    unit = voxel_to_unit(voxels, (5, 10))
    torch.testing.assert_close(unit[1], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(unit_to_voxel(unit, (5, 10)), voxels)
    assert physical_extent((5, 10), (2.0, 0.5)) == (8.0, 4.5)


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_linear_sampling_is_exact_at_voxel_centres_and_linear_between(shape):
    image = torch.rand(shape, dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    torch.testing.assert_close(sample(image, grid), image)
    # A linear ramp is reproduced exactly anywhere inside the domain.
    ramp = sum((k + 1) * grid[..., k] for k in range(len(shape)))
    points = torch.rand(50, len(shape), dtype=torch.float64)
    torch.testing.assert_close(sample(ramp, points), sum((k + 1) * points[:, k] for k in range(len(shape))))


def test_border_and_zero_padding():
    image = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    outside = torch.tensor([[-0.5, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(sample(image, outside), torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(sample(image, outside, padding="zeros"), torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)
    assert sample(image.long(), outside, mode="nearest", padding="zeros").tolist() == [0, 0]


def test_nearest_keeps_integer_labels():
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    points = torch.tensor([[0.9, 0.45], [0.1, 0.8], [0.0, 0.0]])
    out = sample(labels, points, mode="nearest")
    assert out.dtype == torch.int32
    assert out.tolist() == [5, 3, 1]


def test_channels_and_point_batch_shape():
    image = torch.rand(3, 5, 6)
    points = torch.rand(4, 7, 2)
    out = sample(image, points)
    assert out.shape == (3, 4, 7)
    torch.testing.assert_close(out[1], sample(image[1], points))


def test_linear_sampling_is_differentiable_in_the_points():
    image = torch.rand(8, 9, dtype=torch.float64)
    points = (torch.rand(5, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: sample(image, p), (points,))


def test_sampling_errors():
    with pytest.raises(TypeError, match="nearest"):
        sample(torch.ones(4, 4, dtype=torch.long), torch.rand(3, 2))
    with pytest.raises(ValueError, match="points"):
        sample(torch.ones(4, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="image"):
        sample(torch.ones(4), torch.rand(3, 2))
    with pytest.raises(ValueError, match="mode"):
        sample(torch.ones(4, 4), torch.rand(3, 2), mode="cubic")


@pytest.mark.parametrize("shape", [(5, 7), (4, 5, 6)])
def test_batched_sampling_matches_one_image_at_a_time(shape):
    images = torch.randn(3, 2, *shape, dtype=torch.float64)
    points = torch.rand(3, 4, 5, len(shape), dtype=torch.float64) * 1.2 - 0.1    # some outside
    for padding in ("border", "zeros"):
        batched = sample_batch(images, points, padding=padding)
        assert batched.shape == (3, 2, 4, 5)
        for b in range(3):
            assert torch.allclose(batched[b], sample(images[b], points[b], padding=padding), atol=1e-12)
    with pytest.raises(ValueError, match="images and points"):
        sample_batch(images, points[:2])


@pytest.mark.parametrize("blocky", [False, True])       # True: most points see one label only
@pytest.mark.parametrize("dim", [2, 3])
def test_label_interpolation_is_the_most_likely_label(dim, blocky):
    """Against an independent reference: every label's indicator sampled linearly (grid_sample
    path), the label with the largest interpolated weight; at voxel centres the labels themselves."""
    from neuralfield_reg.geometry.coords import sample_batch
    generator = torch.Generator().manual_seed(dim)
    shape = (7, 6, 5)[:dim]
    labels = torch.randint(0, 4, shape, generator=generator).to(torch.int16) * 3      # values 0, 3, 6, 9
    if blocky:
        labels = labels.repeat_interleave(3, 0).repeat_interleave(3, 1)
        shape = tuple(labels.shape)
    points = torch.rand(500, dim, generator=generator, dtype=torch.float64) * 1.1 - 0.05
    out = sample(labels, points, mode="label")
    assert out.dtype == torch.int16
    values = torch.unique(labels)
    one_hot = torch.stack([(labels == v).double() for v in values])                   # (L, *shape)
    weights = sample_batch(one_hot[None], points[None].double())[0]                  # (L, N)
    expected = values[weights.argmax(0)]
    clear = weights.topk(2, dim=0).values
    clear = (clear[0] - clear[1]) > 1e-9                                              # no ties
    assert clear.float().mean() > 0.9
    assert torch.equal(out[clear], expected[clear])
    centres = identity_grid(shape, dtype=torch.float64).reshape(-1, dim)
    assert torch.equal(sample(labels, centres, mode="label"), labels.reshape(-1))
    outside = sample(labels, torch.full((1, dim), 1.5, dtype=torch.float64), mode="label", padding="zeros")
    assert outside.item() == 0
    # channels are label maps of their own: each comes out as it does alone
    stacked = torch.stack([labels, labels.flip(0), torch.zeros_like(labels)])
    by_channel = sample(stacked, points, mode="label")
    assert torch.equal(by_channel[0], out) and not by_channel[2].any()
    assert torch.equal(by_channel[1], sample(labels.flip(0), points, mode="label"))
