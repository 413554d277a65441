"""The affine stage recovers known global transforms."""

import math

import numpy as np
import pytest
import torch

from neuralfield_reg._cuda_ext import load
from neuralfield_reg.registration.affine import AffineTransform, _apply, _Cost, fit_affine
from neuralfield_reg.config import AffineConfig
from neuralfield_reg.geometry.coords import identity_grid, sample
from neuralfield_reg.data import Shape, shape_pairs
from neuralfield_reg.losses.similarity import mi, ncc, ssd


def test_recovers_rotation_scale_and_translation_of_a_triangle():
    fixed_shape = Shape("triangle", (0.5, 0.52), 0.25, 0.3)
    moving_shape = Shape("triangle", (0.58, 0.47), 0.3, 0.3 + 0.7)
    fixed, fixed_labels = fixed_shape.render(64, hollow=True)
    moving, moving_labels = moving_shape.render(64, hollow=True)
    extent = (63.0, 63.0)
    transform = fit_affine(torch.from_numpy(moving), torch.from_numpy(fixed), extent, extent, AffineConfig())
    linear = transform.linear.numpy()
    # Scale 0.3 / 0.25 = 1.2: the area ratio is 1.44.
    assert abs(abs(np.linalg.det(linear)) - 1.2 ** 2) < 0.1
    # Centre of the fixed triangle maps onto the centre of the moving one (in voxels).
    matrix, offset = transform.unit_AB()
    centre = matrix @ torch.tensor([0.5, 0.52], dtype=matrix.dtype) + offset
    assert np.allclose(centre.numpy(), [0.58, 0.47], atol=0.02)
    # Labels overlap well after the affine alone (which checks the rotation too).
    grid = identity_grid((64, 64), dtype=matrix.dtype).reshape(-1, 2)
    warped = sample(torch.from_numpy(moving_labels).long(), grid @ matrix.T + offset, mode="nearest").reshape(64, 64)
    overlap = 2 * (warped.numpy() & fixed_labels).sum() / (warped.numpy().sum() + fixed_labels.sum())
    assert overlap > 0.93


def test_inverse_is_exact():
    fixed, _ = Shape("circle", (0.5, 0.5), 0.25, 0.0).render(32)
    moving, _ = Shape("circle", (0.55, 0.45), 0.3, 0.0).render(32)
    transform = fit_affine(torch.from_numpy(moving), torch.from_numpy(fixed), (31.0, 31.0), (31.0, 31.0),
                           AffineConfig(iterations=20))
    matrix_AB, offset_AB = transform.unit_AB()
    matrix_BA, offset_BA = transform.unit_BA()
    points = torch.rand(10, 2, dtype=matrix_AB.dtype)
    there = points @ matrix_AB.T + offset_AB
    torch.testing.assert_close(there @ matrix_BA.T + offset_BA, points)


def test_physical_coordinates_with_anisotropic_voxels():
    # The same circle drawn on a grid with voxels twice as long along axis 0: the moments start is a
    # pure translation in millimetres, no spurious scaling.
    size = 41
    fixed, _ = Shape("circle", (0.5, 0.5), 0.25, 0.0).render(size)
    moving = fixed[::2]  # 21 x 41, spacing (2, 1): same physical circle
    start_only = AffineConfig(iterations=0, rotation_search=False, search_iterations=0)
    transform = fit_affine(torch.from_numpy(np.ascontiguousarray(moving)), torch.from_numpy(fixed),
                           (20 * 2.0, 40.0), (40.0, 40.0), start_only)
    np.testing.assert_allclose(transform.linear.numpy(), np.eye(2), atol=0.05)
    assert math.isclose(float(transform.translation.abs().max()), 0.0, abs_tol=0.5)


def affine_label_overlap(pair) -> tuple[float, float]:
    """Scale (sqrt |det|) of the default affine stage on a generated 128^2 pair, and the Dice of
    its labels after that affine alone."""
    extent = (127.0, 127.0)
    transform = fit_affine(torch.from_numpy(pair.moving), torch.from_numpy(pair.fixed), extent, extent,
                           AffineConfig())
    matrix, offset = transform.unit_AB()
    grid = identity_grid((128, 128), dtype=matrix.dtype).reshape(-1, 2)
    warped = sample(torch.from_numpy(pair.moving_labels).long(), grid @ matrix.T + offset,
                    mode="nearest").reshape(128, 128).numpy()
    overlap = 2 * (warped & pair.fixed_labels).sum() / (warped.sum() + pair.fixed_labels.sum())
    return math.sqrt(abs(np.linalg.det(transform.linear.numpy()))), overlap


def test_search_keeps_the_scale_near_the_moments_estimate_on_a_strongly_scaled_pair():
    # A generated pair whose moving shape is about 2.2x smaller (moments scale 0.45). Without a
    # bound on the search's scale, the similarity of the thin outlines also improved by shrinking
    # phi_AB until both warped images were background: the scale collapsed to 0.13 and the labels
    # missed.
    scale, overlap = affine_label_overlap(shape_pairs(3, 128, seed=7)[2])
    assert 0.3 < scale < 0.6
    assert overlap > 0.8


def test_affine_aligns_a_small_triangle_with_a_large_circle():
    # A generated pair of different shapes: a thin triangle (887 labelled pixels) and a circle
    # 2.9x wider. With SSD as the affine cost, placing the outlines apart scored better than
    # overlapping them (0.025 against 0.029 at the moments' start) and the refinement then
    # collapsed the map to rank ~1: Dice 0 after the affine and after the whole fit. 1 - NCC
    # prefers the overlap (correlation 0.85 against 0.54).
    scale, overlap = affine_label_overlap(shape_pairs(1, 128, hollow=True, seed=11)[0])
    assert 0.2 < scale < 0.5
    assert overlap > 0.75


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["ncc", "ssd", "mi"])
@pytest.mark.parametrize("shape_A,shape_B", [((20, 24), (18, 22)), ((9, 10, 11), (8, 12, 10))])
def test_native_cost_matches_the_torch_cost(shape_A, shape_B, kind, masked):
    """The compiled affine_ncc kernel (sampling, 1 - NCC, SSD or -MI and the gradient in one call)
    against the same cost in torch operations with autograd: values and gradients of a batch of
    transforms, including maps that leave the image (clamped coordinates, zero derivative) and one
    that sends every point outside past a corner (a constant warped image: correlation 0); with
    masks, each direction compares only its target's masked voxels."""
    dim = len(shape_A)
    generator = torch.Generator().manual_seed(5)
    A = torch.rand(shape_A, dtype=torch.float64, generator=generator)
    B = torch.rand(shape_B, dtype=torch.float64, generator=generator)
    extent_A = torch.tensor([n - 1.0 for n in shape_A], dtype=torch.float64)
    extent_B = torch.tensor([n - 1.0 for n in shape_B], dtype=torch.float64)
    grid_A, grid_B = identity_grid(shape_A, dtype=torch.float64), identity_grid(shape_B, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    linear = torch.cat([eye + 0.3 * torch.randn(4, dim, dim, dtype=torch.float64, generator=generator),
                        1.8 * eye[None], 0.5 * eye[None]])
    translation = torch.cat([2.0 * torch.randn(4, dim, dtype=torch.float64, generator=generator),
                             torch.zeros(1, dim, dtype=torch.float64), torch.full((1, dim), 60.0, dtype=torch.float64)])
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    masks = (A > 0.3, B > 0.4) if masked else (None, None)
    results = []
    for kernels in (None, load()):
        cost = _Cost(A, B, grid_A, grid_B, extent_A, extent_B, kernels, kind, masks)
        parameters = [linear.clone().requires_grad_(True), translation.clone().requires_grad_(True)]
        values = cost(*parameters)
        results.append([values.detach(), *torch.autograd.grad((weights * values).sum(), parameters)])
    for name, native, reference in zip(["cost", "d/dlinear", "d/dtranslation"], results[1], results[0]):
        torch.testing.assert_close(native, reference, rtol=1e-10, atol=1e-12, msg=name)
    assert results[0][1].abs().max() > 0.1          # the gradients are not trivially zero
    # The reference: sample (grid_sample) and the library's loss functions, both directions.
    transform = AffineTransform(linear, translation, tuple(extent_A.tolist()), tuple(extent_B.tolist()))
    dim = len(shape_A)
    loss = {"ncc": ncc, "ssd": ssd, "mi": mi}[kind]
    expected = 0.0
    for (matrix, offset), image, grid, target, mask in ((transform.unit_AB(), A, grid_B, B, masks[1]),
                                                        (transform.unit_BA(), B, grid_A, A, masks[0])):
        kept = torch.ones(target.shape, dtype=torch.bool) if mask is None else mask
        warped = sample(image, _apply(matrix, offset, grid[kept]))                          # (K, P)
        expected = expected + loss(warped, target[kept].expand_as(warped), batched=True)
    if kind == "ncc":
        # The last map sends every point of both images past a corner: nothing left to correlate.
        assert abs(float(results[0][0][-1]) - 2.0) < 1e-9
    torch.testing.assert_close(results[0][0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("refinement_cost", ["ncc", "ssd", "mi"])
def test_native_affine_stage_gives_the_torch_stage_result(refinement_cost):
    pair = shape_pairs(1, 64, seed=3)[0]
    extent = (63.0, 63.0)
    config = AffineConfig(iterations=60, search_iterations=15, refinement_cost=refinement_cost)
    transforms = [fit_affine(torch.from_numpy(pair.moving), torch.from_numpy(pair.fixed), extent, extent, config,
                             native=native) for native in (False, True)]
    torch.testing.assert_close(transforms[1].linear, transforms[0].linear, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(transforms[1].translation, transforms[0].translation, rtol=1e-8, atol=1e-7)


def test_refinement_cost_is_checked():
    with pytest.raises(ValueError, match="AffineConfig.refinement_cost"):
        AffineConfig(refinement_cost="mse")


@pytest.mark.parametrize("cost", ["ncc", "mi"])
def test_masks_keep_a_skull_from_scaling_the_affine(cost):
    """A "skull" ring around the moving brain and none around the fixed one: on the whole images
    the refinement scales the head onto the brain (about 1.6x); compared inside each image's
    foreground (the fit's automatic masks) it stays at the true identity."""
    from neuralfield_reg.registration.fit import foreground_mask
    y, x = torch.meshgrid(*[torch.linspace(0, 1, 64, dtype=torch.float64)] * 2, indexing="ij")
    radius = ((x - 0.5) ** 2 + (y - 0.5) ** 2).sqrt()
    brain = (0.5 * (radius < 0.25).double() + 0.4 * (((x - 0.42) ** 2 + (y - 0.55) ** 2).sqrt() < 0.08).double()
             + 0.3 * (((x - 0.6) ** 2 + (y - 0.4) ** 2).sqrt() < 0.06).double())
    head = brain + ((radius > 0.33) & (radius < 0.4)).double()
    extent = (63.0, 63.0)
    start = AffineTransform(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), extent, extent)
    config = AffineConfig(refinement_cost=cost)
    masks = (foreground_mask(head.float()), foreground_mask(brain.float()))
    whole = fit_affine(head, brain, extent, extent, config, native=True, start=start)
    masked = fit_affine(head, brain, extent, extent, config, native=True, start=start, masks=masks)
    assert torch.linalg.svdvals(whole.linear).min() > 1.3
    torch.testing.assert_close(masked.linear, torch.eye(2, dtype=torch.float64), rtol=0, atol=0.05)
    assert masked.translation.abs().max() < 0.5                               # voxels


def test_a_mask_too_small_for_a_coarse_level_is_left_out_there():
    """A fixed mask of 2x2 voxels vanishes on the pyramid's coarse levels: those compare every voxel
    instead of none, and the stage still returns a finite transform."""
    pair = shape_pairs(1, 32, seed=3)[0]
    extent = (31.0, 31.0)
    start = AffineTransform(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), extent, extent)
    tiny = torch.zeros(32, 32, dtype=torch.bool)
    tiny[15:17, 15:17] = True
    for native in (False, True):
        transform = fit_affine(torch.from_numpy(pair.moving), torch.from_numpy(pair.fixed), extent, extent,
                               AffineConfig(iterations=20, rigid_iterations=10), native=native, start=start,
                               masks=(None, tiny))
        assert torch.isfinite(transform.linear).all() and torch.isfinite(transform.translation).all()
