"""Similarity and inverse-consistency losses against closed-form answers."""

import math

import pytest
import torch

from neuralfield_reg.losses import (as_pair, diffusion, gradient_icon_autograd, gradient_icon_fd, icon,
                                   inverse_consistency_residual, inverse_consistency_terms, lncc, map_jacobians,
                                   mi, ncc, residual_jacobians, ssd)


def affine_pair(dim, dtype=torch.float64):
    matrix = torch.eye(dim, dtype=dtype) + 0.2 * torch.randn(dim, dim, dtype=dtype)
    offset = 0.1 * torch.randn(dim, dtype=dtype)
    inverse = torch.linalg.inv(matrix)
    return (lambda x: x @ matrix.T + offset), (lambda y: (y - offset) @ inverse.T), matrix


def smooth_pair(dim, dtype=torch.float64):
    def phi_AB(x):
        return x + 0.04 * torch.sin(2 * math.pi * x.roll(1, dims=-1)) + 0.02 * x ** 2

    def phi_BA(x):
        return x - 0.03 * torch.cos(3 * x) * x.roll(1, dims=-1)
    return phi_AB, phi_BA


def test_ssd_and_ncc_values():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert float(ssd(a, a + 1)) == pytest.approx(1.0)
    assert float(ncc(a, 3 * a + 5)) == pytest.approx(0.0, abs=1e-6)
    assert float(ncc(a, -a)) == pytest.approx(2.0, abs=1e-6)


def test_lncc_is_zero_for_locally_affine_intensity_changes_and_positive_otherwise():
    image = torch.rand(24, 24, dtype=torch.float64)
    # Not exactly 0: eps = 1e-5 in the denominator, against local variances of ~0.1.
    assert float(lncc(image, 2 * image + 1, window=5)) == pytest.approx(0.0, abs=2e-3)
    assert float(lncc(image, torch.rand(24, 24, dtype=torch.float64), window=5)) > 0.5
    volume = torch.rand(10, 11, 12, dtype=torch.float64)
    assert float(lncc(volume, volume, window=3)) == pytest.approx(0.0, abs=2e-3)


def test_lncc_matches_explicit_windows():
    """Reference: local statistics from explicit (border-clipped) windows, one voxel at a time."""
    a, b = torch.rand(7, 8, dtype=torch.float64), torch.rand(7, 8, dtype=torch.float64)
    radius, eps, total, masked = 1, 1e-5, 0.0, 0.0
    mask = torch.rand(7, 8) < 0.5
    for i in range(7):
        for j in range(8):
            wa = a[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1]
            wb = b[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1]
            covariance = (wa * wb).mean() - wa.mean() * wb.mean()
            variances = ((wa * wa).mean() - wa.mean() ** 2) * ((wb * wb).mean() - wb.mean() ** 2)
            total += float(covariance ** 2 / (variances + eps))
            masked += float(covariance ** 2 / (variances + eps)) if mask[i, j] else 0.0
    assert float(lncc(a, b, window=3, eps=eps)) == pytest.approx(1.0 - total / 56, abs=1e-12)
    assert float(lncc(a, b, window=3, eps=eps, weights=mask)) == pytest.approx(
        1.0 - masked / int(mask.sum()), abs=1e-12)           # weights: which voxels' correlations count


@pytest.mark.parametrize("name", ["ssd", "ncc", "lncc", "mi"])
def test_batched_similarity_gives_one_value_per_pair(name):
    function = {"ssd": ssd, "ncc": ncc, "lncc": lncc, "mi": mi}[name]
    warped, target = torch.rand(3, 9, 10, dtype=torch.float64), torch.rand(3, 9, 10, dtype=torch.float64)
    target[1] = 2 * warped[1] + 1
    single = torch.stack([function(warped[k], target[k]) for k in range(3)])
    torch.testing.assert_close(function(warped, target, batched=True), single, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["ssd", "ncc", "mi"])
def test_weights_select_the_points_that_count(name):
    function = {"ssd": ssd, "ncc": ncc, "mi": mi}[name]
    warped, target = torch.rand(2, 50, dtype=torch.float64), torch.rand(2, 50, dtype=torch.float64)
    mask = torch.rand(2, 50) < 0.6
    weighted = function(warped, target, batched=True, weights=mask)
    for k in range(2):
        assert float(weighted[k]) == pytest.approx(float(function(warped[k][mask[k]], target[k][mask[k]])),
                                                   abs=1e-12)
    with pytest.raises(ValueError, match="weights"):
        function(warped, target, weights=mask[:, :10])


def test_similarity_errors():
    with pytest.raises(ValueError, match="shapes"):
        ssd(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="window"):
        lncc(torch.ones(5, 5), torch.ones(5, 5), window=4)
    with pytest.raises(ValueError, match="bins"):
        mi(torch.rand(5), torch.rand(5), bins=3)


def mutual_information_by_loops(a, b, bins):
    """MI of two samples from an explicit Parzen histogram: cubic B-spline windows at v (bins - 1)
    on the centres -2 .. bins + 1, entropies summed bin by bin (an independent reference)."""
    def window(t):
        t = abs(t)
        return (4 - 6 * t * t + 3 * t ** 3) / 6 if t < 1 else (2 - t) ** 3 / 6 if t < 2 else 0.0
    centres = range(-2, bins + 2)
    joint = {}
    for x, y in zip(a, b):
        for k in centres:
            for m in centres:
                joint[k, m] = joint.get((k, m), 0.0) + window(x * (bins - 1) - k) * window(y * (bins - 1) - m) / len(a)
    p_a = {k: sum(joint[k, m] for m in centres) for k in centres}
    p_b = {m: sum(joint[k, m] for k in centres) for m in centres}
    return sum(p * math.log(p / (p_a[k] * p_b[m])) for (k, m), p in joint.items() if p > 0)


def test_mi_matches_an_explicit_parzen_histogram():
    torch.manual_seed(0)
    a = torch.rand(40, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(40, dtype=torch.float64)).clamp(0, 1)
    for bins in (4, 9):
        want = mutual_information_by_loops(a.tolist(), b.tolist(), bins)
        assert float(mi(a, b, bins)) == pytest.approx(-want, abs=1e-12)
        assert want > 0.1


def test_mi_ignores_contrast_and_scores_dependence():
    torch.manual_seed(1)
    a = torch.rand(2000, dtype=torch.float64)
    b = a ** 2                                           # the same structure, another contrast
    assert float(mi(a, b)) == pytest.approx(float(mi(a, 1 - b)), abs=1e-12)     # inverted contrast: the same
    assert float(mi(a, b)) == pytest.approx(float(mi(b, a)), abs=1e-12)         # symmetric
    independent = torch.rand(2000, dtype=torch.float64)
    assert float(mi(a, b)) < -1.5 and float(mi(a, independent)) > -0.5           # lower is better


def test_mi_gradient_matches_finite_differences():
    torch.manual_seed(2)
    a = torch.rand(30, dtype=torch.float64).clamp(0.02, 0.98).requires_grad_(True)
    b = (a.detach() + 0.2 * torch.rand(30, dtype=torch.float64)).clamp(0, 1)
    weights = torch.rand(30) < 0.8
    assert torch.autograd.gradcheck(lambda x: mi(x, b, 7, weights=weights), (a,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
def test_penalties_vanish_for_an_exact_inverse_pair(dim):
    phi_AB, phi_BA, _ = affine_pair(dim)
    points = torch.rand(200, dim, dtype=torch.float64)
    assert float(icon(phi_AB, phi_BA, points)) < 1e-24
    assert gradient_icon_autograd(phi_AB, phi_BA, points).item() < 1e-24
    assert float(gradient_icon_fd(phi_AB, phi_BA, points)) < 1e-12


@pytest.mark.parametrize("dim", [2, 3])
def test_autograd_penalty_matches_the_analytic_jacobian(dim):
    # phi_BA = identity, phi_AB(x) = x + a sin(2 pi x) componentwise: dr/dx = diag(2 pi a cos(2 pi x)).
    a = 0.03

    def phi_AB(x):
        return x + a * torch.sin(2 * math.pi * x)

    points = torch.rand(100, dim, dtype=torch.float64)
    expected_one = ((2 * math.pi * a * torch.cos(2 * math.pi * points)) ** 2).sum(1).mean()
    residual_A, residual_B, jacobian_A, jacobian_B = residual_jacobians(as_pair(phi_AB, lambda x: x), points)
    expected = torch.diag_embed(2 * math.pi * a * torch.cos(2 * math.pi * points))
    torch.testing.assert_close(jacobian_A, expected)
    torch.testing.assert_close(jacobian_B, expected)
    torch.testing.assert_close(residual_A, a * torch.sin(2 * math.pi * points))
    # Symmetric: the other direction has the same residual here.
    torch.testing.assert_close(gradient_icon_autograd(phi_AB, lambda x: x, points), expected_one)


@pytest.mark.parametrize("dim", [2, 3])
def test_autograd_and_finite_difference_versions_agree_on_smooth_maps(dim):
    phi_AB, phi_BA = smooth_pair(dim)
    points = torch.rand(300, dim, dtype=torch.float64)
    exact = gradient_icon_autograd(phi_AB, phi_BA, points)
    approximate = gradient_icon_fd(phi_AB, phi_BA, points, step=1e-3)
    assert exact.item() > 1e-3
    assert float(approximate) == pytest.approx(exact.item(), rel=1e-2)


def test_penalties_are_positive_for_a_non_inverse_pair():
    phi_AB, _, _ = affine_pair(2)
    phi_BA = lambda x: x  # noqa: E731
    points = torch.rand(50, 2, dtype=torch.float64)
    assert float(icon(phi_AB, phi_BA, points)) > 1e-4
    assert gradient_icon_autograd(phi_AB, phi_BA, points).item() > 1e-3


def test_anisotropic_extent_measures_the_jacobian_in_physical_units():
    # r(x) = B x for a linear B: with S = diag(extent) the physical Jacobian is S B S^-1.
    b = torch.tensor([[0.0, 0.3], [0.1, 0.0]], dtype=torch.float64)
    phi_AB = lambda x: x + x @ b.T  # noqa: E731
    points = torch.rand(10, 2, dtype=torch.float64)
    extent = (10.0, 40.0)
    scale = torch.tensor(extent, dtype=torch.float64)
    physical = scale[:, None] * b / scale[None, :]
    expected = (physical ** 2).sum()
    value = gradient_icon_autograd(phi_AB, lambda x: x, points, extent_A=extent, extent_B=extent)
    torch.testing.assert_close(value, expected)
    fd = gradient_icon_fd(phi_AB, lambda x: x, points, extent_A=extent, extent_B=extent)
    torch.testing.assert_close(fd, expected)


def test_gradient_icon_is_differentiable_in_parameters():
    weight = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    phi_AB = lambda x: x + weight * torch.sin(3 * x)  # noqa: E731
    points = torch.rand(20, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w: gradient_icon_autograd(lambda x: x + w * torch.sin(3 * x), lambda x: x, points), (weight,))
    value = gradient_icon_autograd(phi_AB, lambda x: x, points)
    (grad,) = torch.autograd.grad(value, weight)
    assert float(grad) > 0


def test_terms_match_the_one_direction_functions():
    phi_AB, phi_BA = smooth_pair(2)
    points = torch.rand(40, 2, dtype=torch.float64)
    terms = inverse_consistency_terms(as_pair(phi_AB, phi_BA), points, extent_A=(3.0, 5.0), extent_B=(4.0, 4.0))
    torch.testing.assert_close(terms["icon"], icon(phi_AB, phi_BA, points, extent_A=(3.0, 5.0), extent_B=(4.0, 4.0)))
    torch.testing.assert_close(terms["gradient_icon"], gradient_icon_fd(
        phi_AB, phi_BA, points, step=1e-6, extent_A=(3.0, 5.0), extent_B=(4.0, 4.0)), rtol=1e-4, atol=1e-8)


def test_residual_definition():
    phi_AB = lambda x: x + 0.1  # noqa: E731
    phi_BA = lambda x: 2 * x  # noqa: E731
    points = torch.rand(5, 2)
    torch.testing.assert_close(inverse_consistency_residual(phi_AB, phi_BA, points), points + 0.1)


@pytest.mark.parametrize("dim", [2, 3])
def test_diffusion_matches_the_analytic_gradient_of_the_displacement(dim):
    # phi(x) = M x + c + a sin(2 pi x) componentwise: J - M = diag(2 pi a cos(2 pi x)); in physical
    # units entry (k, j) is scaled by out_k / in_j (only the diagonal is non-zero here).
    torch.manual_seed(0)
    a, c = 0.03, 0.05
    linear = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, dtype=torch.float64)
    extent_A = torch.tensor([1.0, 2.0, 1.5][:dim], dtype=torch.float64)
    extent_B = torch.tensor([2.0, 1.0, 0.7][:dim], dtype=torch.float64)

    def phi_AB(x):
        return x @ linear.T + c + a * torch.sin(2 * math.pi * x)

    points = torch.rand(50, dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    value = diffusion(as_pair(phi_AB, lambda x: x), points, linear, eye, extent_A=extent_A.tolist(),
                      extent_B=extent_B.tolist())
    gradient = 2 * math.pi * a * torch.cos(2 * math.pi * points) * (extent_A / extent_B)
    torch.testing.assert_close(value, 0.5 * (gradient ** 2).sum(1).mean())
    # the same value from inverse_consistency_terms' one evaluation of both maps
    terms = inverse_consistency_terms(as_pair(phi_AB, lambda x: x), points, extent_A=extent_A.tolist(),
                                      extent_B=extent_B.tolist(), linear_AB=linear, linear_BA=eye)
    torch.testing.assert_close(terms["diffusion"], value)
    assert "diffusion" not in inverse_consistency_terms(as_pair(phi_AB, lambda x: x), points)
    jacobian_AB, jacobian_BA = map_jacobians(as_pair(phi_AB, lambda x: x), points)
    torch.testing.assert_close(jacobian_BA, eye.expand(50, dim, dim))
    # against central differences of the map
    step = 1e-5
    columns = [(phi_AB(points + step * eye[j]) - phi_AB(points - step * eye[j])) / (2 * step) for j in range(dim)]
    torch.testing.assert_close(jacobian_AB, torch.stack(columns, -1), rtol=1e-7, atol=1e-8)
    # an affine map is not penalised, whatever its linear part
    assert diffusion(as_pair(lambda x: x @ linear.T + c, lambda x: x), points, linear, eye).item() < 1e-24


def test_diffusion_is_differentiable_in_parameters():
    points = torch.rand(20, 2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    weight = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: diffusion(as_pair(lambda x: x + w * torch.sin(3 * x), lambda x: x), points, eye, eye), (weight,))
