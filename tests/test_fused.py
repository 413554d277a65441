"""The fused CPU kernels (neuralfield_reg/encoders/fused.py) against the per-operation autograd path on the
torch backend: displacements, the gradient-ICON penalty, the SSD similarity, and their parameter
gradients."""

import dataclasses

import numpy as np
import pytest
import torch

import neuralfield_reg as nfr
from neuralfield_reg.data import shape_pairs
from neuralfield_reg.encoders import HashGridConfig
from neuralfield_reg.transforms.fields import MapPairs
from neuralfield_reg.geometry.coords import sample_batch
from neuralfield_reg.encoders.fused import (PenaltyInputs, SimilarityInputs, _FusedKernel, _penalty_call,
                                   fields_displacement, fields_jacobian, fused_loss, fused_loss_gradients,
                                   gradient_icon_fused, penalty_fused, similarity_fused)
from neuralfield_reg.losses import diffusion, inverse_consistency_terms, mi, ncc, ssd

CASES = [  # (dim, encoding, hidden widths); every encoding mixes dense and hashed levels
    (2, HashGridConfig(n_levels=4, log2_hashmap_size=8, base_resolution=3, per_level_scale=2.0), (8, 8)),
    (2, HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=6, base_resolution=4,
                       per_level_scale=1.5, interpolation="Smoothstep"), (12,)),
    (3, HashGridConfig(n_levels=3, log2_hashmap_size=8, base_resolution=3, per_level_scale=2.0), (8, 40, 8)),
    (3, HashGridConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=7, base_resolution=4,
                       per_level_scale=1.7, interpolation="Smoothstep"), (8, 8)),
    (3, HashGridConfig(n_levels=2, n_features_per_level=4, log2_hashmap_size=7, base_resolution=3,
                       per_level_scale=2.0), (16,)),                  # the 3D preset's 4 features
]


def twin_maps(dim, encoding, widths, n_pairs, dtype):
    """Native and torch MapPairs with the same random (non-zero) parameters and affine parts."""
    native = MapPairs(dim, n_pairs, encoding=encoding, hidden_widths=widths, backend="native").to(dtype)
    with torch.no_grad():
        for parameter in native.parameters():
            parameter.normal_(0, 0.5)
        native.matrices += 0.1 * torch.randn_like(native.matrices)
        native.offsets += 0.05 * torch.randn_like(native.offsets)
    reference = MapPairs(dim, n_pairs, encoding=encoding, hidden_widths=widths, backend="torch").to(dtype)
    reference.load_state_dict(native.state_dict())
    return native, reference


def parity_case(dim, encoding, widths, dtype):
    """Twin maps of two pairs and level weights with the last level switched off."""
    native, reference = twin_maps(dim, encoding, widths, 2, dtype)
    return native, reference, torch.linspace(1.0, 0.0, encoding.n_levels, dtype=dtype)


def assert_same_parameter_gradients(fused, expected, upstream, native, reference, tolerance):
    """d<upstream, output>/d(parameters) of the fused output against the autograd one."""
    got = torch.autograd.grad((fused * upstream).sum(), list(native.fields.parameters()))
    want = torch.autograd.grad((expected * upstream).sum(), list(reference.fields.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance * w.abs().max().item())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_fields_match_the_autograd_path(dim, encoding, widths, dtype, tolerance):
    native, reference, level_weights = parity_case(dim, encoding, widths, dtype)
    points = torch.rand(4, 70, dim, dtype=dtype) * 1.3 - 0.15            # some outside the unit cube
    field = torch.arange(4).repeat_interleave(70)
    fused = fields_displacement(native.fields, points.reshape(-1, dim), field, level_weights)
    expected = reference.fields.forward_batched(points, level_weights).reshape(-1, dim)
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)
    with torch.no_grad():                    # without a graph: the kernel alone, the same numbers
        bare = fields_displacement(native.fields, points.reshape(-1, dim), field, level_weights)
    assert not bare.requires_grad
    torch.testing.assert_close(bare, fused.detach(), rtol=0, atol=0)

    assert_same_parameter_gradients(fused, expected, torch.randn_like(expected), native, reference, tolerance)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_fields_jacobian_matches_autograd(dim, encoding, widths, dtype, tolerance):
    native, reference, _ = parity_case(dim, encoding, widths, dtype)
    points = torch.rand(150, dim, dtype=dtype) * 1.3 - 0.15            # some outside the unit cube
    for field in (0, 3):
        got = fields_jacobian(native.fields, points, field)
        x = points.clone().requires_grad_(True)
        args = [None] * 4
        args[field] = x
        u = reference.fields(args)[field]
        want = torch.stack([torch.autograd.grad(u[:, k].sum(), x, retain_graph=True)[0] for k in range(dim)], dim=1)
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
        assert want.abs().max() > 0.1


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_gradient_icon_matches_the_autograd_path(dim, encoding, widths, dtype, tolerance):
    native, reference, level_weights = parity_case(dim, encoding, widths, dtype)
    points = torch.rand(2, 40, dim, dtype=dtype)
    extent_A, extent_B = [1.0, 2.0, 1.5][:dim], [2.0, 1.0, 0.7][:dim]
    fused = gradient_icon_fused(native, points, extent_A=extent_A, extent_B=extent_B, level_weights=level_weights)
    expected = inverse_consistency_terms(lambda a, b: reference(a, b, level_weights), points, extent_A=extent_A,
                                         extent_B=extent_B)["gradient_icon"]
    assert fused.shape == (2,)
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=0)
    inner_AB, inner_BA = reference(points, points, level_weights)
    outside = ((inner_AB < 0) | (inner_AB > 1)) | ((inner_BA < 0) | (inner_BA > 1))
    assert outside.any()             # the outer maps also see clamped points (the clamp's mask)
    assert_same_parameter_gradients(fused, expected, torch.tensor([0.7, 1.3], dtype=dtype), native, reference,
                                    tolerance)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_penalty_with_diffusion_matches_the_autograd_path(dim, encoding, widths, dtype, tolerance):
    """penalty_fused's weighted sum of gradient-ICON and diffusion (one pass of the kernel) against
    the autograd path's: both values and the parameter gradients of the sum."""
    native, reference, level_weights = parity_case(dim, encoding, widths, dtype)
    points = torch.rand(2, 40, dim, dtype=dtype)
    extent_A, extent_B = [1.0, 2.0, 1.5][:dim], [2.0, 1.0, 0.7][:dim]
    weight, diffusion_weight = 0.3, 0.7
    total, penalty, smoothness = penalty_fused(native, PenaltyInputs(points, weight, extent_A, extent_B,
                                                                     diffusion_weight), level_weights=level_weights)
    pair = lambda a, b: reference(a, b, level_weights)  # noqa: E731
    want_penalty = inverse_consistency_terms(pair, points, extent_A=extent_A, extent_B=extent_B)["gradient_icon"]
    want_smoothness = diffusion(pair, points, reference.matrices[0::2], reference.matrices[1::2],
                                extent_A=extent_A, extent_B=extent_B)
    want_total = weight * want_penalty + diffusion_weight * want_smoothness
    for got, want in ((penalty, want_penalty), (smoothness, want_smoothness), (total, want_total)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=0)
    assert want_smoothness.min() > 1e-3 and total.requires_grad and not smoothness.requires_grad
    assert_same_parameter_gradients(total, want_total, torch.tensor([0.7, 1.3], dtype=dtype), native, reference,
                                    tolerance)


def reference_similarity(images, mapped, targets, masks, measure="ssd"):
    """fit_pair's SSD (or NCC, or MI) term, written with sample_batch: points mapped outside the unit
    cube do not count unless fewer than 16 land inside; a mask that leaves no point counts all."""
    warped = sample_batch(images[:, None], mapped)[:, 0]
    inside = ((mapped >= 0) & (mapped <= 1)).all(-1)
    inside = inside | (inside.sum(1, keepdim=True) < 16)
    if masks is not None:
        inside = inside & (masks != 0)
        inside = inside | ~inside.any(1, keepdim=True)
    return {"ssd": ssd, "ncc": ncc, "mi": mi}[measure](warped, targets, batched=True, weights=inside)


@pytest.mark.parametrize("measure", ["ssd", "ncc", "mi"])
@pytest.mark.parametrize("shift", [0.0, 0.9])        # 0.9: fewer than 16 points land inside
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_similarity_matches_the_autograd_path(dim, encoding, widths, dtype, tolerance, shift, measure):
    native, reference, level_weights = parity_case(dim, encoding, widths, dtype)
    with torch.no_grad():
        for maps in (native, reference):
            maps.offsets += shift
    n_points = 60
    shape_A, shape_B = [(13, 9), (7, 11, 6)][dim - 2], [(10, 14), (9, 5, 8)][dim - 2]
    moving, fixed = torch.rand(2, *shape_A, dtype=dtype), torch.rand(2, *shape_B, dtype=dtype)
    points_B, points_A = torch.rand(2, n_points, dim, dtype=dtype), torch.rand(2, n_points, dim, dtype=dtype)
    targets_B, targets_A = torch.rand(2, n_points, dtype=dtype), torch.rand(2, n_points, dtype=dtype)
    masks_B = (torch.rand(2, n_points) > 0.3).to(dtype)
    masks_B[1] = 0                                       # pair 1: the mask leaves no point
    fused = similarity_fused(native, SimilarityInputs(moving, fixed, points_B, targets_B, points_A, targets_A,
                                                      masks_B=masks_B, measure=measure), level_weights=level_weights)
    mapped_B, mapped_A = reference(points_B, points_A, level_weights)
    expected = (reference_similarity(moving, mapped_B, targets_B, masks_B, measure)
                + reference_similarity(fixed, mapped_A, targets_A, None, measure))
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=0)
    inside = ((mapped_B >= 0) & (mapped_B <= 1)).all(-1).sum(1)
    # shift 0: some pair leaves out the points mapped outside; 0.9: every pair falls back to all
    assert (inside < 16).all() if shift else ((inside >= 16) & (inside < n_points)).any()
    assert_same_parameter_gradients(fused, expected, torch.tensor([0.7, 1.3], dtype=dtype), native, reference,
                                    tolerance)


@pytest.mark.parametrize("measure", ["ssd", "ncc", "mi"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim,encoding,widths", CASES)
def test_fused_loss_is_the_similarity_plus_the_weighted_penalty(dim, encoding, widths, dtype, tolerance, measure):
    """fused_loss (both kernels, the penalty's gradient added to the similarity's in the kernel)
    against the autograd path's similarity + weight * penalty: values and parameter gradients, on a
    first backward and on a second one (retain_graph: the kernels run again)."""
    native, reference, level_weights = parity_case(dim, encoding, widths, dtype)
    n_points, weight, diffusion_weight = 50, 0.37, 0.21
    shape_A, shape_B = [(13, 9), (7, 11, 6)][dim - 2], [(10, 14), (9, 5, 8)][dim - 2]
    moving, fixed = torch.rand(2, *shape_A, dtype=dtype), torch.rand(2, *shape_B, dtype=dtype)
    points_B, points_A = torch.rand(2, n_points, dim, dtype=dtype), torch.rand(2, n_points, dim, dtype=dtype)
    targets_B, targets_A = torch.rand(2, n_points, dtype=dtype), torch.rand(2, n_points, dtype=dtype)
    masks_A = (torch.rand(2, n_points) > 0.3).to(dtype)
    penalty_points = torch.rand(2, 30, dim, dtype=dtype)
    extent_A, extent_B = [1.0, 2.0, 1.5][:dim], [2.0, 1.0, 0.7][:dim]
    inputs = SimilarityInputs(moving, fixed, points_B, targets_B, points_A, targets_A, masks_A=masks_A,
                              measure=measure)
    penalty_inputs = PenaltyInputs(penalty_points, weight, extent_A, extent_B, diffusion_weight)
    loss, similarity, penalty, smoothness = fused_loss(native, inputs, penalty_inputs, level_weights=level_weights)
    mapped_B, mapped_A = reference(points_B, points_A, level_weights)
    want_similarity = (reference_similarity(moving, mapped_B, targets_B, None, measure)
                       + reference_similarity(fixed, mapped_A, targets_A, masks_A, measure))
    pair = lambda a, b: reference(a, b, level_weights)  # noqa: E731
    want_penalty = inverse_consistency_terms(pair, penalty_points, extent_A=extent_A,
                                             extent_B=extent_B)["gradient_icon"]
    want_smoothness = diffusion(pair, penalty_points, reference.matrices[0::2], reference.matrices[1::2],
                                extent_A=extent_A, extent_B=extent_B)
    want_loss = want_similarity + weight * want_penalty + diffusion_weight * want_smoothness
    for got, want in ((similarity, want_similarity), (penalty, want_penalty), (smoothness, want_smoothness),
                      (loss, want_loss)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=0)
    assert not similarity.requires_grad and not penalty.requires_grad and loss.requires_grad
    upstream = torch.tensor([0.7, 1.3], dtype=dtype)
    want_sum = torch.autograd.grad(want_loss.sum(), list(reference.fields.parameters()), retain_graph=True)
    want = torch.autograd.grad((want_loss * upstream).sum(), list(reference.fields.parameters()))
    for _ in range(2):                   # the forward's gradients, then the kernels' rerun
        got = torch.autograd.grad((loss * upstream).sum(), list(native.fields.parameters()), retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance * w.abs().max().item())
    # without autograd: the same numbers, the gradients in maps.fields.parameters() order
    direct = fused_loss_gradients(native, inputs, penalty_inputs, level_weights=level_weights)
    for got, want_value in zip(direct[:4], (loss, similarity, penalty, smoothness)):
        torch.testing.assert_close(got, want_value, rtol=0, atol=0)
    assert list(native.parameters()) == list(native.fields.parameters())      # what fit_pair's Adam gets
    for g, w in zip(direct[4], want_sum, strict=True):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance * w.abs().max().item())
    with pytest.raises(ValueError, match=r"penalty.points: expected \(B, M, d\)"):
        fused_loss(native, inputs, PenaltyInputs(penalty_points[:1], weight))


def test_gradient_icon_float64_gradcheck_on_a_tiny_config():
    encoding = HashGridConfig(n_levels=2, log2_hashmap_size=4, base_resolution=2, per_level_scale=2.0,
                              interpolation="Smoothstep")
    native, _ = twin_maps(2, encoding, (4,), 1, torch.float64)
    fields = native.fields
    points = torch.rand(1, 5, 2, dtype=torch.float64) * 0.8 + 0.1

    kernel, tensors, (table, *_) = _penalty_call(native, PenaltyInputs(points, 0.6, diffusion_weight=0.4), None)

    def penalty(table, *mlp):          # the Function itself, with the table as an explicit input
        return _FusedKernel.apply(kernel, 3, len(tensors), *tensors, table, *mlp)[0]

    params = [table.detach().clone().requires_grad_(True)]
    params += [p.detach().clone().requires_grad_(True) for p in (*fields.weights, *fields.biases)]
    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-6)


def test_fused_backward_is_first_order_only():
    native, _ = twin_maps(2, CASES[0][1], (8,), 1, torch.float32)
    fields = native.fields
    displacement = fields_displacement(fields, torch.rand(10, 2), torch.zeros(10, dtype=torch.long))
    (gradient,) = torch.autograd.grad(displacement.sum(), fields.weights[0], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gradient.sum(), fields.weights[0])


def test_points_that_need_a_gradient_use_the_autograd_path():
    native, reference = twin_maps(2, CASES[0][1], (8,), 1, torch.float32)
    points = torch.rand(2, 20, 2, requires_grad=True)
    assert not native.fields.fused_for(points)
    (grad_native,) = torch.autograd.grad(native.fields.forward_batched(points).sum(), points)
    (grad_reference,) = torch.autograd.grad(reference.fields.forward_batched(points).sum(), points)
    torch.testing.assert_close(grad_native, grad_reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity,diffusion_weight", [("ssd", 0.0), ("ncc", 0.0), ("mi", 0.0), ("ssd", 0.5)])
def test_fit_with_fused_kernels_follows_the_autograd_path(similarity, diffusion_weight):
    # Same seed, same points: the fused and per-operation paths compute one function, so a short fit
    # follows the same trajectory up to float32 rounding. The dense Adam update keeps this about the
    # kernels: with sparse_adam an entry whose gradient is exactly 0 on one path and a rounding
    # residue on the other would take a whole Adam step on one path only.
    pair = shape_pairs(1, size=48, seed=5)[0]
    config = nfr.FitConfig(iterations=40, affine=None, similarity_points=1024, gradient_icon_points=128,
                           backend="native", similarity=similarity, hidden_widths=(32, 32),
                           diffusion_weight=diffusion_weight, sparse_adam=False)
    fused = nfr.fit_pair(pair.moving, pair.fixed, config, progress=False)
    plain = nfr.fit_pair(pair.moving, pair.fixed, dataclasses.replace(config, fused_kernels=False), progress=False)
    # Float32 rounding differences grow along the trajectory (units near their ReLU kink switch on
    # one path and not the other; the exact agreement of the two paths is tested above, in float64):
    # the similarity within 1 % (MI, whose Parzen windows turn sharply between bins, within 5 %),
    # the small penalty on average, the maps within a quarter pixel.
    np.testing.assert_allclose(fused.history["similarity"], plain.history["similarity"],
                               rtol=5e-2 if similarity == "mi" else 1e-2, atol=1e-7)
    np.testing.assert_allclose(np.mean(fused.history["gradient_icon"][-10:]),
                               np.mean(plain.history["gradient_icon"][-10:]), rtol=0.1)
    if diffusion_weight > 0:
        np.testing.assert_allclose(np.mean(fused.history["diffusion"][-10:]),
                                   np.mean(plain.history["diffusion"][-10:]), rtol=0.1)
        assert np.mean(fused.history["diffusion"][-10:]) > 1e-4
    else:
        assert "diffusion" not in fused.history
    np.testing.assert_allclose(fused.displacement("AB"), plain.displacement("AB"), atol=0.25)
    np.testing.assert_allclose(fused.displacement("BA"), plain.displacement("BA"), atol=0.25)
    assert np.abs(fused.displacement("AB")).max() > 0.5          # and they did move


def test_jacobian_determinant_with_the_fused_kernel_matches_autograd():
    pair = shape_pairs(1, 32, seed=3)[0]
    config = nfr.FitConfig(iterations=40, affine=nfr.AffineConfig(iterations=10, search_iterations=5))
    result = nfr.fit_pair(pair.moving, pair.fixed, config, spacing=(1.0, 2.0), progress=False)
    assert result.backend == "native"
    for direction in ("AB", "BA"):
        fused = result.jacobian_determinant(direction)
        result.maps.fields.use_fused = False
        autograd = result.jacobian_determinant(direction)
        result.maps.fields.use_fused = True
        np.testing.assert_allclose(fused, autograd, rtol=1e-5, atol=1e-6)
        assert np.abs(autograd - autograd.mean()).max() > 1e-3          # the fields are not flat


def test_fused_gradients_are_handed_over_and_recomputed_for_a_second_backward():
    """The first backward through a fused Function gets the gradient its forward computed (scaled
    in place); a second one (retain_graph) runs the kernel again and gets the same numbers, and
    parameters changed in place since the forward are refused by autograd's version check."""
    native, reference = twin_maps(2, CASES[0][1], (8,), 1, torch.float32)
    points = torch.rand(1, 30, 2)
    penalty = gradient_icon_fused(native, points)
    expected = inverse_consistency_terms(reference, points)["gradient_icon"]
    (2.5 * expected.sum()).backward()
    for scale in (2.5, 1.0):
        native.zero_grad()
        (scale * penalty.sum()).backward(retain_graph=True)
        for got, want in zip(native.fields.parameters(), reference.fields.parameters()):
            torch.testing.assert_close(got.grad, want.grad * scale / 2.5, rtol=1e-5,
                                       atol=1e-5 * want.grad.abs().max().item())
    with torch.no_grad():
        native.fields.weights[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.sum().backward()
    # also on a first backward: the forward's gradient would belong to the old parameters
    penalty = gradient_icon_fused(native, points)
    with torch.no_grad():
        native.fields.biases[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.sum().backward()
