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
    similarity_ssd_fused    the SSD of both maps of every pair at random    scales the stored
                            voxels (sampling the other image included) and  gradient
                            its parameter gradient
    fused_loss              similarity + weight * penalty (the two above),  scales the stored
                            both kernels' gradients in one set of buffers   gradient
    fused_loss_gradients    fused_loss and its parameter gradients,         none (no graph)
                            without autograd (fit_pair assigns .grad)
    fields_jacobian         du_t/dx by forward-mode jets (for dense         none (no graph)
                            Jacobian determinants)
    ======================  ==============================================  =====================

The penalty's Jacobians are carried forward (value and d derivatives per evaluation) and the
reverse mode is written out in the kernel, so no double backward is needed. All are first-order
only (their backward is not differentiable again); the general autograd path
(``losses.inverse_consistency_terms`` on the native or torch encodings) is the reference the tests
compare them with.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .encoders.native import NativeHashGridEncoding


def fused_supported(encoding, *tensors: torch.Tensor) -> bool:
    """Whether the fused CPU kernels can evaluate fields with this encoding on these tensors."""
    return (isinstance(encoding, NativeHashGridEncoding)
            and all(t.device.type == "cpu" and t.dtype == encoding.params.dtype for t in tensors)
            and encoding.params.dtype in (torch.float32, torch.float64))


def _kernel_args(encoding: NativeHashGridEncoding, level_weights: torch.Tensor | None, like: torch.Tensor):
    config = encoding.config
    # The parameter itself, not a reshaped view: the Functions reshape it inside (autograd then
    # sums the kernels' table gradients in place, without a view's backward and an extra copy).
    table = encoding.params
    if level_weights is None:
        level_weights = torch.ones(config.n_levels, dtype=like.dtype)
    level_weights = level_weights.to(like.device, like.dtype).contiguous()
    geometry = (encoding._geometry, config.n_features_per_level, config.interpolation == "Smoothstep",
                encoding.layout.total_rows)
    return encoding._module, table, geometry, level_weights


def _rows(table: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """The kernels' view of a table parameter: one row of ``n_features`` per grid vertex."""
    return table.reshape(-1, geometry[1])


class _FusedFields(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, field, level_weights, module, geometry, scale, n_layers, table, *params):
        weights, biases = list(params[:n_layers]), list(params[n_layers:])
        save = any(ctx.needs_input_grad[7:])
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
        return (None,) * 7 + _in_parameter_order(grads, ctx.table_shape)


def fields_displacement(fields, points: torch.Tensor, field: torch.Tensor,
                        level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(P, d)`` displacements of a ``DisplacementFields`` (native encoding), point ``n`` by field
    ``field[n]``: the same function as its autograd path (ReLU MLP on the clamped points'
    encoding), differentiable in the parameters but not in the points."""
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points)
    return _FusedFields.apply(points.contiguous(), field.contiguous(), level_weights, module, geometry,
                              float(fields.output_scale), len(fields.weights), table, *fields.weights,
                              *fields.biases)


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


class _FusedGradientIcon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, scales, matrices, offsets, level_weights, module, geometry, scale, n_layers, table,
                *params):
        def kernel(points, scales, matrices, offsets, level_weights, table, *params, need_grad=True):
            return module.gradient_icon(points, scales, matrices, offsets, _rows(table, geometry), *geometry,
                                        level_weights, list(params[:n_layers]), list(params[n_layers:]), scale,
                                        need_grad, 1.0, [])

        return _run_and_keep(ctx, kernel, (points, scales, matrices, offsets, level_weights, table, *params),
                             any(ctx.needs_input_grad[9:]), table.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_penalty):
        return (None,) * 9 + _handed_over(ctx, grad_penalty)


class _FusedSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, targets, masks, moving, fixed, matrices, offsets, level_weights, module, geometry, scale,
                n_layers, table, *params):
        def kernel(points, targets, masks, moving, fixed, matrices, offsets, level_weights, table, *params,
                   need_grad=True):
            return module.similarity_ssd(points, targets, masks, moving, fixed, matrices, offsets,
                                         _rows(table, geometry), *geometry, level_weights, list(params[:n_layers]),
                                         list(params[n_layers:]), scale, need_grad)

        inputs = (points, targets, masks, moving, fixed, matrices, offsets, level_weights, table, *params)
        return _run_and_keep(ctx, kernel, inputs, any(ctx.needs_input_grad[12:]), table.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_similarity):
        return (None,) * 12 + _handed_over(ctx, grad_similarity)


def _loss_kernels(module, geometry, scale, n_layers, penalty_weight):
    """The kernel of fused_loss: both native calls, the penalty's weighted gradients added to the
    similarity's. ``kernel(*inputs, need_grad=...)`` returns ``[loss, similarity, penalty]`` and,
    with ``need_grad``, dtable, then dW and db per layer."""
    def kernel(points, targets, masks, moving, fixed, matrices, offsets, level_weights, penalty_points, scales,
               table, *params, need_grad=True):
        weights, biases, rows = list(params[:n_layers]), list(params[n_layers:]), _rows(table, geometry)
        similarity, *gradients = module.similarity_ssd(points, targets, masks, moving, fixed, matrices, offsets,
                                                       rows, *geometry, level_weights, weights, biases, scale,
                                                       need_grad)
        penalty = module.gradient_icon(penalty_points, scales, matrices, offsets, rows, *geometry, level_weights,
                                       weights, biases, scale, need_grad, penalty_weight, gradients)[0]
        return [similarity + penalty_weight * penalty, similarity, penalty, *gradients]

    return kernel


class _FusedLoss(torch.autograd.Function):
    """similarity + penalty_weight * penalty per pair, both kernels' gradients in one set: the
    penalty kernel adds its (weighted) gradients to the similarity kernel's, so a step has one
    table gradient to allocate, fill and hand over instead of two to add up. Takes the kernel and
    the inputs of _loss_call."""

    @staticmethod
    def forward(ctx, kernel, *inputs):
        table = inputs[_LOSS_TABLE]
        values = _run_and_keep(ctx, kernel, inputs, any(ctx.needs_input_grad[1 + _LOSS_TABLE:]), table.shape,
                               n_values=3)
        ctx.mark_non_differentiable(*values[1:])
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_similarity, _grad_penalty):
        return (None,) * (1 + _LOSS_TABLE) + _handed_over(ctx, grad_loss)


def _similarity_inputs(maps, moving, fixed, points_B, targets_B, points_A, targets_A, masks_B, masks_A) -> tuple:
    """The similarity kernel's tensors: points, targets and masks of field 2p (B's voxels, phi_AB)
    and 2p + 1 (A's voxels, phi_BA) interleaved, the images, and the maps' affine parts."""
    def interleave(b, a):
        return torch.stack([b, a], dim=1).reshape(-1, *b.shape[1:]).to(points_B.dtype).contiguous()

    masks = (interleave(masks_B if masks_B is not None else torch.ones_like(targets_B),
                        masks_A if masks_A is not None else torch.ones_like(targets_A))
             if masks_B is not None or masks_A is not None else points_B.new_zeros(0))
    return (interleave(points_B, points_A), interleave(targets_B, targets_A), masks, moving.contiguous(),
            fixed.contiguous(), maps.matrices.to(points_B.dtype).contiguous(),
            maps.offsets.to(points_B.dtype).contiguous())


def _extents(points: torch.Tensor, extent_A, extent_B) -> torch.Tensor:
    """``(2, d)``: the physical extent per axis of A's and of B's domain (1 when not given)."""
    dim = points.shape[-1]
    return torch.tensor([list(extent_A) if extent_A is not None else [1.0] * dim,
                         list(extent_B) if extent_B is not None else [1.0] * dim], dtype=points.dtype)


def fused_loss(maps, moving: torch.Tensor, fixed: torch.Tensor, points_B: torch.Tensor, targets_B: torch.Tensor,
               points_A: torch.Tensor, targets_A: torch.Tensor, penalty_points: torch.Tensor, penalty_weight: float,
               *, masks_B: torch.Tensor | None = None, masks_A: torch.Tensor | None = None,
               extent_A: Sequence[float] | None = None, extent_B: Sequence[float] | None = None,
               level_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fit_pair``'s loss of the ``B`` pairs, ``(loss, similarity, penalty)``, each ``(B,)``:
    ``loss = similarity + penalty_weight * penalty`` with the similarity of
    :func:`similarity_ssd_fused` and the penalty of :func:`gradient_icon_fused` (same arguments).

    Only ``loss`` is differentiable (``similarity`` and ``penalty`` are for logging); its
    gradient is the sum of the two Functions' gradients, computed in one set of buffers (no second
    table gradient to allocate and add)."""
    return _FusedLoss.apply(*_loss_call(maps, moving, fixed, points_B, targets_B, points_A, targets_A,
                                        penalty_points, penalty_weight, masks_B, masks_A, extent_A, extent_B,
                                        level_weights))


_LOSS_TABLE = 10       # the table's place in _loss_call's inputs (the MLP's parameters follow it)


def _loss_call(maps, moving, fixed, points_B, targets_B, points_A, targets_A, penalty_points, penalty_weight,
               masks_B, masks_A, extent_A, extent_B, level_weights) -> tuple:
    """``(kernel, *inputs)`` of fused_loss: the kernel of :func:`_loss_kernels`, then its inputs
    (ten tensors, the table, the MLP's weights and biases)."""
    if penalty_points.dim() != 3 or penalty_points.shape[::2] != points_B.shape[::2]:
        raise ValueError(f"penalty_points: expected (B, M, d) points with B and d of points_B "
                         f"{tuple(points_B.shape)}, got {tuple(penalty_points.shape)}")
    fields = maps.fields
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points_B)
    kernel = _loss_kernels(module, geometry, float(fields.output_scale), len(fields.weights), float(penalty_weight))
    inputs = (*_similarity_inputs(maps, moving, fixed, points_B, targets_B, points_A, targets_A, masks_B, masks_A),
              level_weights, penalty_points.contiguous(), _extents(penalty_points, extent_A, extent_B), table,
              *fields.weights, *fields.biases)
    return (kernel, *inputs)


def fused_loss_gradients(maps, moving: torch.Tensor, fixed: torch.Tensor, points_B: torch.Tensor,
                         targets_B: torch.Tensor, points_A: torch.Tensor, targets_A: torch.Tensor,
                         penalty_points: torch.Tensor, penalty_weight: float, *, masks_B: torch.Tensor | None = None,
                         masks_A: torch.Tensor | None = None, extent_A: Sequence[float] | None = None,
                         extent_B: Sequence[float] | None = None, level_weights: torch.Tensor | None = None):
    """:func:`fused_loss` without autograd: ``(loss, similarity, penalty, gradients)``, where
    ``gradients`` are the gradients of ``loss.sum()`` with respect to ``maps.fields.parameters()``
    (in that order), as the kernels computed them with the loss. ``fit_pair`` assigns them to the
    parameters' ``.grad`` and skips the autograd graph, its backward pass and its bookkeeping."""
    kernel, *inputs = _loss_call(maps, moving, fixed, points_B, targets_B, points_A, targets_A, penalty_points,
                                 penalty_weight, masks_B, masks_A, extent_A, extent_B, level_weights)
    with torch.no_grad():
        loss, similarity, penalty, *gradients = kernel(*inputs)
    return loss, similarity, penalty, list(_in_parameter_order(gradients, inputs[_LOSS_TABLE].shape))


def gradient_icon_fused(maps, points: torch.Tensor, *, extent_A: Sequence[float] | None = None,
                        extent_B: Sequence[float] | None = None,
                        level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient-ICON penalty of the ``B`` pairs of a ``MapPairs`` (native encoding), ``(B,)``,
    at ``(B, N, d)`` points.

    Field ``2 p`` is pair ``p``'s ``phi_AB`` and ``2 p + 1`` its ``phi_BA``, each
    ``phi(x) = matrices[t] x + offsets[t] + u_t(x)``. The value is that of
    :func:`~neuralfield_reg.losses.inverse_consistency_terms` ``["gradient_icon"]``.
    """
    fields = maps.fields
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points)
    return _FusedGradientIcon.apply(points.contiguous(), _extents(points, extent_A, extent_B),
                                    maps.matrices.to(points.dtype).contiguous(),
                                    maps.offsets.to(points.dtype).contiguous(), level_weights, module, geometry,
                                    float(fields.output_scale), len(fields.weights), table, *fields.weights,
                                    *fields.biases)


def similarity_ssd_fused(maps, moving: torch.Tensor, fixed: torch.Tensor, points_B: torch.Tensor,
                         targets_B: torch.Tensor, points_A: torch.Tensor, targets_A: torch.Tensor, *,
                         masks_B: torch.Tensor | None = None, masks_A: torch.Tensor | None = None,
                         level_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The fit's SSD similarity of the ``B`` pairs of a ``MapPairs`` (native encoding), ``(B,)``:
    ``SSD(moving o phi_AB, fixed)`` at ``points_B`` plus ``SSD(fixed o phi_BA, moving)`` at ``points_A``.

    Args:
        moving, fixed: ``(B, *shape_A)`` and ``(B, *shape_B)`` images.
        points_B, points_A: ``(B, N, d)`` voxels of B's and A's grids (equal counts ``N``).
        targets_B, targets_A: ``(B, N)`` the fixed image's values at ``points_B`` and the moving
            image's at ``points_A``.
        masks_B, masks_A: optional ``(B, N)`` 0/1 weights (the fixed and moving masks there).
    Points mapped outside the other image's domain do not count (all count when fewer than 16
    land inside, or when the mask leaves none), as in ``fit_pair``'s similarity term.
    """
    fields = maps.fields
    module, table, geometry, level_weights = _kernel_args(fields.encoding, level_weights, points_B)
    return _FusedSimilarity.apply(*_similarity_inputs(maps, moving, fixed, points_B, targets_B, points_A, targets_A,
                                                      masks_B, masks_A),
                                  level_weights, module, geometry, float(fields.output_scale), len(fields.weights),
                                  table, *fields.weights, *fields.biases)
