"""Fused native training step on the CPU: encoding + MLP in one kernel, with hand-written gradients.

With the native backend on the CPU, a fit's step is a handful of kernel calls instead of hundreds
of small autograd operations (``cuda_ext/fused_cpu.cpp``):

    ======================  ==============================================  =====================
    Function                forward computes                                backward
    ======================  ==============================================  =====================
    fields_displacement     u_t(x) = scale * MLP_t(w * enc_t(clamp(x)))     dL/dtable, dL/dW,
                                                                            dL/db (not dL/dx)
    gradient_icon_fused     the gradient-ICON penalty of every pair and,    scales the stored
                            in the same pass, its parameter gradient        gradient
    penalty_fused           weight * gradient-ICON + diffusion_weight *     scales the stored
                            diffusion (both maps' displacement gradients    gradient
                            at the same points), from the same pass
    similarity_fused        the SSD, NCC or MI of both maps of every pair   scales the stored
                            at random voxels (sampling the other image      gradient
                            included) and its parameter gradient
    fused_loss              similarity + the weighted penalty terms,        scales the stored
                            both kernels' gradients in one set of buffers   gradient
    fused_loss_gradients    fused_loss and its parameter gradients,         none (no graph)
                            without autograd (the fit assigns .grad)
    fields_jacobian         du_t/dx by forward-mode jets (for dense         none (no graph)
                            Jacobian determinants)
    ======================  ==============================================  =====================

The penalty's Jacobians are carried forward (value and d derivatives per evaluation) and the
reverse mode is written out in the kernel, so no double backward is needed. All are first-order
only (their backward is not differentiable again); the general autograd path
(``losses.inverse_consistency_terms`` on the native or torch encodings) is the reference the tests
compare them with.

The similarity's inputs travel as a :class:`SimilarityInputs`, the penalty's as a
:class:`PenaltyInputs`. Convention: points are unit coordinates (``[0, 1]^d`` over an image's
domain); field ``2 p`` is pair ``p``'s ``phi_AB`` and ``2 p + 1`` its ``phi_BA``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..losses.similarity import MI_BINS, NCC_EPS
from .native import NativeHashGridEncoding


def fused_supported(encoding, *tensors: torch.Tensor) -> bool:
    """Whether the fused CPU kernels can evaluate fields with this encoding on these tensors."""
    return (isinstance(encoding, NativeHashGridEncoding)
            and all(t.device.type == "cpu" and t.dtype == encoding.params.dtype for t in tensors)
            and encoding.params.dtype in (torch.float32, torch.float64))


def _kernel_args(encoding: NativeHashGridEncoding, level_weights: torch.Tensor | None, like: torch.Tensor):
    module, geometry = encoding.kernel_setup()
    # The parameter itself, not a reshaped view: the Functions reshape it inside (autograd then
    # sums the kernels' table gradients in place, without a view's backward and an extra copy).
    table = encoding.params
    if level_weights is None:
        level_weights = torch.ones(encoding.config.n_levels, dtype=like.dtype)
    level_weights = level_weights.to(like.device, like.dtype).contiguous()
    return module, table, geometry, level_weights


def _rows(table: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """The kernels' view of a table parameter: one row of ``n_features`` per grid vertex."""
    return table.reshape(-1, geometry[1])


class _FusedFields(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, field, level_weights, module, geometry, scale, n_layers, graph, table, *params):
        weights, biases = list(params[:n_layers]), list(params[n_layers:])
        # Keep what the backward needs (every point's activations and corner records) only when a
        # graph is being built (``graph``: grad mode at the call) through a parameter that needs
        # it: without, the kernel runs about three times faster (dense maps, warps).
        save = graph and any(ctx.needs_input_grad[8:])
        ctx.table_shape, table = table.shape, _rows(table, geometry)
        displacement, saved, saved_corners = module.fields_forward(points, field, table, *geometry, level_weights,
                                                                   weights, biases, scale, save)
        ctx.save_for_backward(saved, saved_corners, points, field, level_weights, table, *params)
        ctx.module, ctx.geometry, ctx.scale, ctx.n_layers = module, geometry, scale, n_layers
        return displacement

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved, saved_corners, points, field, level_weights, table, *params = ctx.saved_tensors
        n_layers = ctx.n_layers
        grads = ctx.module.fields_backward(grad_out.contiguous(), saved, saved_corners, points, field, table,
                                           *ctx.geometry, level_weights, list(params[:n_layers]),
                                           list(params[n_layers:]), ctx.scale)
        return (None,) * 8 + _in_parameter_order(grads, ctx.table_shape)


def fields_displacement(fields, points: torch.Tensor, field: torch.Tensor,
                        level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(P, d)`` displacements of a ``DisplacementFields`` (native encoding), point ``n`` by field
    ``field[n]``: the same function as its autograd path (ReLU MLP on the clamped points'
    encoding), differentiable in the parameters but not in the points."""
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points)
    return _FusedFields.apply(points.contiguous(), field.contiguous(), level_weights, module, geometry,
                              float(fields.output_scale), len(fields.weights), torch.is_grad_enabled(), table,
                              *fields.weights, *fields.biases)


def fields_jacobian(fields, points: torch.Tensor, field: int) -> torch.Tensor:
    """``(P, d, d)`` Jacobians ``du_k/dx_j`` of field ``field`` of a ``DisplacementFields`` (native
    encoding, CPU) at ``(P, d)`` points, in one native call (forward-mode jets, no autograd
    graph); the same numbers as differentiating :meth:`DisplacementFields.forward` with autograd.
    Not differentiable."""
    module, table, geometry, level_weights = _kernel_args(fields.encoding, None, points)
    index = torch.full((points.shape[0],), field, dtype=torch.long)
    with torch.no_grad():
        return module.fields_jacobian(points.contiguous(), index, _rows(table.detach(), geometry), *geometry,
                                      level_weights, [w.detach() for w in fields.weights],
                                      [b.detach() for b in fields.biases], float(fields.output_scale))


def _in_parameter_order(gradients: Sequence[torch.Tensor], table_shape) -> tuple:
    """The kernels' gradients (dtable as rows, then dW and db per layer) in the fields' parameter
    order: the table gradient in the table parameter's shape, then every dW, then every db. The
    table gradient is reshaped in place: a view would keep autograd from summing it in place."""
    grad_table, *layer_grads = gradients
    return (grad_table.resize_(table_shape), *layer_grads[0::2], *layer_grads[1::2])


def _per_pair_gradients(gradients: Sequence[torch.Tensor], grad_per_pair: torch.Tensor, table_shape) -> tuple:
    """The kernels' parameter gradients of a per-pair loss ``(B,)`` (dtable, then dW and db per
    layer, each with the 2B fields first), in parameter order and scaled in place by the incoming
    gradient of each pair: fields 2p and 2p + 1 belong to pair p. The tensors are the caller's to
    hand over (see :func:`_handed_over`)."""
    ordered = _in_parameter_order(gradients, table_shape)
    grad_table = ordered[0]
    if grad_per_pair.numel() == 1:                 # one pair: one scale (often 1, nothing to do)
        scale = float(grad_per_pair)
        if scale != 1.0:
            for gradient in ordered:
                gradient.mul_(scale)
        return ordered
    per_field = grad_per_pair.repeat_interleave(2)
    grad_table.view(per_field.shape[0], -1).mul_(per_field[:, None])
    for gradient in ordered[1:]:
        gradient.mul_(per_field.reshape(-1, *[1] * (gradient.dim() - 1)))
    return ordered


def _run_and_keep(ctx, kernel, inputs: tuple, need_grad: bool, table_shape, n_values: int = 1):
    """A fused Function's forward: ``kernel(*inputs, need_grad=...)`` returns ``n_values`` per-pair
    values and (with ``need_grad``) the parameter gradients of the first; the gradients and the
    inputs are kept for :func:`_handed_over`. Returns the values (one tensor when ``n_values`` is
    1)."""
    out = kernel(*inputs, need_grad=need_grad)
    ctx.save_for_backward(*inputs)
    ctx.kernel = lambda *saved: kernel(*saved)[n_values:]
    ctx.gradients = out[n_values:]
    ctx.table_shape = table_shape
    return out[0] if n_values == 1 else tuple(out[:n_values])


def _handed_over(ctx, grad_per_pair: torch.Tensor) -> tuple:
    """A fused Function's backward: the parameter gradients, scaled by the incoming gradient of
    each pair. On the first backward they are the ones the forward computed, handed over
    (autograd then keeps the table gradient as ``.grad`` instead of copying it, as it must for a
    tensor referenced elsewhere, and the scaling is in place); on a later one
    (``retain_graph=True``, gradcheck), the kernel runs again on the saved inputs. Either way
    autograd's version check refuses inputs modified in place since the forward (as it does for
    its own operations), instead of a gradient of the old parameters."""
    inputs = ctx.saved_tensors                     # unpacking runs the version check
    gradients, ctx.gradients = ctx.gradients, None
    if gradients is None:
        gradients = ctx.kernel(*inputs)
    return _per_pair_gradients(gradients, grad_per_pair, ctx.table_shape)


class _FusedKernel(torch.autograd.Function):
    """A fused kernel as an autograd Function: ``kernel(*inputs, need_grad=...)`` returns
    ``n_values`` per-pair values (only the first differentiable) and the parameter gradients of
    the first; ``inputs`` are ``n_leading`` tensors, then the table and the MLP's parameters."""

    @staticmethod
    def forward(ctx, kernel, n_values, n_leading, *inputs):
        ctx.n_leading = n_leading
        values = _run_and_keep(ctx, kernel, inputs, any(ctx.needs_input_grad[3 + n_leading:]),
                               inputs[n_leading].shape, n_values=n_values)
        if n_values > 1:
            ctx.mark_non_differentiable(*values[1:])
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, *_grad_others):
        return (None,) * (3 + ctx.n_leading) + _handed_over(ctx, grad_value)


MEASURES = ("ssd", "ncc", "mi")      # the similarity kernel's measure codes are their indices


@dataclass(frozen=True)
class SimilarityInputs:
    """The similarity's inputs for ``B`` pairs.

    Attributes:
        moving, fixed: ``(B, *shape_A)`` and ``(B, *shape_B)`` images.
        points_B, points_A: ``(B, N, d)`` voxels of B's and A's grids (unit coordinates, equal
            counts ``N``), where ``moving o phi_AB`` and ``fixed o phi_BA`` are compared.
        targets_B, targets_A: ``(B, N)`` the fixed image's values at ``points_B`` and the moving
            image's at ``points_A``.
        masks_B, masks_A: optional ``(B, N)`` 0/1 weights (the fixed and moving masks there).
        measure: ``"ssd"`` (mean squared difference), ``"ncc"`` (``1 -`` global normalised
            cross-correlation) or ``"mi"`` (``-`` mutual information with ``bins`` intensity
            bins), as ``losses.ssd`` / ``losses.ncc`` / ``losses.mi`` with those weights.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    points_B: torch.Tensor
    targets_B: torch.Tensor
    points_A: torch.Tensor
    targets_A: torch.Tensor
    masks_B: torch.Tensor | None = None
    masks_A: torch.Tensor | None = None
    measure: str = "ssd"
    bins: int = MI_BINS

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"measure: expected one of {MEASURES}, got {self.measure!r}")
        if not isinstance(self.bins, int) or self.bins < 4:
            raise ValueError(f"bins: expected an integer >= 4, got {self.bins!r}")

    def measure_args(self) -> tuple:
        """The similarity kernel's last three arguments: measure code, NCC's eps, MI's bins."""
        return MEASURES.index(self.measure), NCC_EPS, self.bins

    def tensors(self, maps) -> tuple:
        """The similarity kernel's tensors: points, targets and masks of field 2p (B's voxels,
        phi_AB) and 2p + 1 (A's voxels, phi_BA) interleaved, the images, and the maps' affine
        parts."""
        dtype = self.points_B.dtype

        def interleave(b, a):
            return torch.stack([b, a], dim=1).reshape(-1, *b.shape[1:]).to(dtype).contiguous()

        if self.masks_B is None and self.masks_A is None:
            masks = self.points_B.new_zeros(0)
        else:
            masks = interleave(self.masks_B if self.masks_B is not None else torch.ones_like(self.targets_B),
                               self.masks_A if self.masks_A is not None else torch.ones_like(self.targets_A))
        return (interleave(self.points_B, self.points_A), interleave(self.targets_B, self.targets_A), masks,
                self.moving.contiguous(), self.fixed.contiguous(), maps.matrices.to(dtype).contiguous(),
                maps.offsets.to(dtype).contiguous())


@dataclass(frozen=True)
class PenaltyInputs:
    """The penalty's inputs: ``points`` ``(B, M, d)`` (unit coordinates of B's domain), the
    gradient-ICON ``weight`` in the loss, the physical extents (mm per axis) of A's and B's
    domains, in which the Jacobians are measured (None: 1 per axis), and the weight of the
    diffusion term (:func:`~neuralfield_reg.losses.diffusion`, at the same points)."""

    points: torch.Tensor
    weight: float = 1.0
    extent_A: Sequence[float] | None = None
    extent_B: Sequence[float] | None = None
    diffusion_weight: float = 0.0

    def extents(self) -> torch.Tensor:
        """``(2, d)``: the extent per axis of A's and of B's domain."""
        dim = self.points.shape[-1]
        return torch.tensor([list(self.extent_A) if self.extent_A is not None else [1.0] * dim,
                             list(self.extent_B) if self.extent_B is not None else [1.0] * dim],
                            dtype=self.points.dtype)


def _parameters(fields) -> tuple:
    return (*fields.weights, *fields.biases)


def _penalty_call(maps, penalty: PenaltyInputs, level_weights) -> tuple:
    """``(kernel, tensors, parameters)`` of :func:`penalty_fused` (see :func:`_loss_call`);
    ``kernel`` returns ``[weighted sum, gradient_icon, diffusion]`` and the sum's gradients."""
    fields, points = maps.fields, penalty.points
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points)
    scale, n_layers = float(fields.output_scale), len(fields.weights)
    weight, diffusion_weight = float(penalty.weight), float(penalty.diffusion_weight)

    def kernel(points, scales, matrices, offsets, level_weights, table, *params, need_grad=True):
        value, smoothness, *gradients = module.gradient_icon(
            points, scales, matrices, offsets, _rows(table, geometry), *geometry, level_weights,
            list(params[:n_layers]), list(params[n_layers:]), scale, need_grad, weight, diffusion_weight, [])
        return [weight * value + diffusion_weight * smoothness, value, smoothness, *gradients]

    tensors = (points.contiguous(), penalty.extents(), maps.matrices.to(points.dtype).contiguous(),
               maps.offsets.to(points.dtype).contiguous(), level_weights)
    return kernel, tensors, (table, *_parameters(fields))


def penalty_fused(maps, penalty: PenaltyInputs, *, level_weights: torch.Tensor | None = None):
    """``(total, gradient_icon, diffusion)``, each ``(B,)``: the penalty terms of the ``B`` pairs
    of a ``MapPairs`` (native encoding) at ``penalty.points``, from one native pass, and
    ``total = penalty.weight * gradient_icon + penalty.diffusion_weight * diffusion``; only
    ``total`` is differentiable (the others are for logging). The values are those of
    :func:`~neuralfield_reg.losses.inverse_consistency_terms` ``["gradient_icon"]`` and
    :func:`~neuralfield_reg.losses.diffusion` (with the maps' matrices as linear parts)."""
    kernel, tensors, parameters = _penalty_call(maps, penalty, level_weights)
    return _FusedKernel.apply(kernel, 3, len(tensors), *tensors, *parameters)


def gradient_icon_fused(maps, points: torch.Tensor, *, extent_A: Sequence[float] | None = None,
                        extent_B: Sequence[float] | None = None,
                        level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient-ICON penalty of the ``B`` pairs of a ``MapPairs`` (native encoding), ``(B,)``,
    at ``(B, N, d)`` points (unit coordinates of B's domain; extents as in
    :class:`PenaltyInputs`).

    Field ``2 p`` is pair ``p``'s ``phi_AB`` and ``2 p + 1`` its ``phi_BA``, each
    ``phi(x) = matrices[t] x + offsets[t] + u_t(x)``. The value is that of
    :func:`~neuralfield_reg.losses.inverse_consistency_terms` ``["gradient_icon"]``.
    """
    return penalty_fused(maps, PenaltyInputs(points, 1.0, extent_A, extent_B), level_weights=level_weights)[0]


def similarity_fused(maps, inputs: SimilarityInputs, *, level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The fit's similarity of the ``B`` pairs of a ``MapPairs`` (native encoding), ``(B,)``:
    ``sim(moving o phi_AB, fixed)`` at ``points_B`` plus ``sim(fixed o phi_BA, moving)`` at
    ``points_A``, ``sim`` the inputs' measure (see :class:`SimilarityInputs`).

    Points mapped outside the other image's domain do not count (all count when fewer than 16
    land inside, or when the mask leaves none), as in the fit's similarity term
    (``engine.objective.compared_points``).
    """
    fields = maps.fields
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, inputs.points_B)
    scale, n_layers, measure = float(fields.output_scale), len(fields.weights), inputs.measure_args()

    def kernel(points, targets, masks, moving, fixed, matrices, offsets, level_weights, table, *params,
               need_grad=True):
        return module.similarity(points, targets, masks, moving, fixed, matrices, offsets, _rows(table, geometry),
                                 *geometry, level_weights, list(params[:n_layers]), list(params[n_layers:]), scale,
                                 need_grad, *measure)

    tensors = (*inputs.tensors(maps), level_weights)
    return _FusedKernel.apply(kernel, 1, len(tensors), *tensors, table, *_parameters(fields))


def _loss_call(maps, similarity: SimilarityInputs, penalty: PenaltyInputs, level_weights) -> tuple:
    """``(kernel, tensors, parameters)`` of the fused loss: both native calls in one kernel (the
    penalty's weighted gradients added to the similarity's), its leading tensors, and the table
    and MLP parameters. ``kernel(*tensors, *parameters, need_grad=...)`` returns ``[loss,
    similarity, gradient_icon, diffusion]`` and, with ``need_grad``, dtable, then dW and db per
    layer."""
    points_B, points = similarity.points_B, penalty.points
    if points.dim() != 3 or points.shape[::2] != points_B.shape[::2]:
        raise ValueError(f"penalty.points: expected (B, M, d) points with B and d of points_B "
                         f"{tuple(points_B.shape)}, got {tuple(points.shape)}")
    fields = maps.fields
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points_B)
    scale, n_layers = float(fields.output_scale), len(fields.weights)
    weight, diffusion_weight = float(penalty.weight), float(penalty.diffusion_weight)
    measure = similarity.measure_args()

    def kernel(points, targets, masks, moving, fixed, matrices, offsets, level_weights, penalty_points, scales,
               table, *params, need_grad=True):
        weights, biases, rows = list(params[:n_layers]), list(params[n_layers:]), _rows(table, geometry)
        similarity, *gradients = module.similarity(points, targets, masks, moving, fixed, matrices, offsets, rows,
                                                   *geometry, level_weights, weights, biases, scale, need_grad,
                                                   *measure)
        value, smoothness = module.gradient_icon(penalty_points, scales, matrices, offsets, rows, *geometry,
                                                 level_weights, weights, biases, scale, need_grad, weight,
                                                 diffusion_weight, gradients)
        return [similarity + weight * value + diffusion_weight * smoothness, similarity, value, smoothness,
                *gradients]

    tensors = (*similarity.tensors(maps), level_weights, points.contiguous(), penalty.extents())
    return kernel, tensors, (table, *_parameters(fields))


def fused_loss(maps, similarity: SimilarityInputs, penalty: PenaltyInputs, *,
               level_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The fit's loss of the ``B`` pairs, ``(loss, similarity, gradient_icon, diffusion)``, each
    ``(B,)``: ``loss = similarity + penalty.weight * gradient_icon + penalty.diffusion_weight *
    diffusion`` with the similarity of :func:`similarity_fused` and the terms of
    :func:`penalty_fused`.

    Only ``loss`` is differentiable (the others are for logging); its gradient is the sum of the
    two kernels' gradients, computed in one set of buffers (no second table gradient to allocate
    and add)."""
    kernel, tensors, parameters = _loss_call(maps, similarity, penalty, level_weights)
    return _FusedKernel.apply(kernel, 4, len(tensors), *tensors, *parameters)


def fused_loss_gradients(maps, similarity: SimilarityInputs, penalty: PenaltyInputs, *,
                         level_weights: torch.Tensor | None = None):
    """:func:`fused_loss` without autograd: ``(loss, similarity, gradient_icon, diffusion,
    gradients)``, where ``gradients`` are the gradients of ``loss.sum()`` with respect to
    ``maps.fields.parameters()`` (in that order), as the kernels computed them with the loss. The
    fit assigns them to the parameters' ``.grad`` and skips the autograd graph, its backward pass
    and its bookkeeping."""
    kernel, tensors, parameters = _loss_call(maps, similarity, penalty, level_weights)
    with torch.no_grad():
        loss, similarity_value, penalty_value, diffusion_value, *gradients = kernel(*tensors, *parameters)
    return (loss, similarity_value, penalty_value, diffusion_value,
            list(_in_parameter_order(gradients, parameters[0].shape)))
