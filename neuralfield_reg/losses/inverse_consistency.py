"""Inverse-consistency penalties for a pair of maps ``phi_AB`` (B -> A) and ``phi_BA`` (A -> B).

The residual on A's domain is ``r(x) = phi_AB(phi_BA(x)) - x``; on B's domain it is
``phi_BA(phi_AB(y)) - y``. Every penalty here is symmetric: the mean of the two directions,
evaluated at the same unit-cube points.

Anisotropy: pass each domain's physical ``extent`` (``(N_k - 1) * spacing_k`` per axis) and the
residual and its Jacobian are measured in physical units (the Jacobian becomes
``S J S^-1`` with ``S = diag(extent)``, which is dimensionless; the residual of ``icon`` is
divided by the largest extent so that it stays a fraction of the domain).

Normalisation: both gradient penalties return the mean over points of the squared Frobenius
norm of ``dr/dx``. (The GradICON reference code sums, over axes, the mean over points *and
components* of the squared difference quotient, which is this value divided by ``d``.)

:func:`diffusion` is not an inverse-consistency term: it penalises the spatial gradient of each
map's displacement from its affine part (``J_phi - M``, in physical units), the diffusion
regulariser of classical registration, computed with autograd at the same kind of points.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Map = Callable[[torch.Tensor], torch.Tensor]
# Both maps at once: (points for phi_AB, points for phi_BA) -> (phi_AB(.), phi_BA(.)).
PairMap = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def as_pair(phi_AB: Map, phi_BA: Map) -> PairMap:
    """Two one-direction maps as a :data:`PairMap`."""
    return lambda points_AB, points_BA: (phi_AB(points_AB), phi_BA(points_BA))


def _scales(extent: Sequence[float] | None, like: torch.Tensor) -> torch.Tensor | None:
    if extent is None:
        return None
    return torch.as_tensor(extent, dtype=like.dtype, device=like.device)


def inverse_consistency_residual(phi_AB: Map, phi_BA: Map, points: torch.Tensor) -> torch.Tensor:
    """``phi_AB(phi_BA(x)) - x`` at ``(N, d)`` points of A's domain, unit coordinates."""
    return phi_AB(phi_BA(points)) - points


def _physical_jacobian(jacobian: torch.Tensor, extent: Sequence[float] | None) -> torch.Tensor:
    """``S J S^-1`` for ``(N, d, d)`` Jacobians ``J[n, k, j] = d r_k / d x_j``."""
    scale = _scales(extent, jacobian)
    if scale is None:
        return jacobian
    return jacobian * scale[:, None] / scale[None, :]


def _jacobians(pair: PairMap, points: torch.Tensor, *, residuals: bool, maps: bool, create_graph: bool) -> dict:
    """One evaluation of both maps at ``(..., N, d)`` points and, by ``torch.autograd.grad``, the
    ``(..., N, d, d)`` Jacobians ``J[n, k, j] = d f_k / d x_j`` asked for: with ``residuals``, the
    residuals ``residual_A``/``residual_B`` and their Jacobians ``jacobian_A``/``jacobian_B``; with
    ``maps``, the maps' own Jacobians ``jacobian_AB`` (at the points as B's) and ``jacobian_BA``
    (as A's), from the same evaluation.

    The ``d`` rows of every Jacobian come from one backward pass: the points are repeated ``d``
    times and block ``k`` back-propagates the unit vector ``e_k`` (points are independent, so the
    blocks do not mix)."""
    *batch, n, dim = points.shape
    repeats = [1] * len(batch) + [dim, 1]
    x = points.detach().repeat(*repeats).requires_grad_(True)     # A's domain
    y = points.detach().repeat(*repeats).requires_grad_(True)     # B's domain
    select = torch.eye(dim, dtype=points.dtype, device=points.device).repeat_interleave(n, dim=0)
    select = select.expand(*batch, n * dim, dim)

    def rows(outputs, inputs, retain_graph):
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=[select] * len(outputs),
                                    create_graph=create_graph, retain_graph=retain_graph or create_graph)
        return [g.reshape(*batch, dim, n, dim).transpose(-3, -2) for g in grads]

    out = {}
    with torch.enable_grad():
        phi_AB_y, phi_BA_x = pair(y, x)
        if residuals:
            back_A, back_B = pair(phi_BA_x, phi_AB_y)
            residual_A, residual_B = back_A - x, back_B - y
            out["residual_A"], out["residual_B"] = residual_A[..., :n, :], residual_B[..., :n, :]
            out["jacobian_A"], out["jacobian_B"] = rows([residual_A, residual_B], [x, y], retain_graph=maps)
        if maps:
            out["jacobian_AB"], out["jacobian_BA"] = rows([phi_AB_y, phi_BA_x], [y, x], retain_graph=False)
    return out


def residual_jacobians(pair: PairMap, points: torch.Tensor, *, create_graph: bool = True):
    """Residuals and their Jacobians in both directions, by ``torch.autograd.grad``.

    Returns ``(residual_A, residual_B, jacobian_A, jacobian_B)``: ``(..., N, d)`` residuals
    ``phi_AB(phi_BA(x)) - x`` and ``phi_BA(phi_AB(x)) - x``, and their ``(..., N, d, d)``
    Jacobians ``J[n, k, j] = d r_k / d x_j`` at the same ``(..., N, d)`` unit-cube points (leading
    axes index independent pairs of maps, e.g. the pairs of a batched fit).

    The ``d`` rows of every Jacobian come from one backward pass (see :func:`_jacobians`). With
    ``create_graph=True`` (the default) the Jacobians can be differentiated again, e.g. with
    respect to the maps' parameters: the double backward the penalty needs.
    """
    out = _jacobians(pair, points, residuals=True, maps=False, create_graph=create_graph)
    return out["residual_A"], out["residual_B"], out["jacobian_A"], out["jacobian_B"]


def map_jacobians(pair: PairMap, points: torch.Tensor, *, create_graph: bool = True):
    """``(jacobian_AB, jacobian_BA)``: the ``(..., N, d, d)`` Jacobians ``J[n, k, j] = d phi_k / d x_j``
    of ``phi_AB`` and ``phi_BA`` at the same ``(..., N, d)`` unit-cube points (as B's and as A's
    points), by ``torch.autograd.grad`` (rows in one backward pass, as in :func:`residual_jacobians`)."""
    out = _jacobians(pair, points, residuals=False, maps=True, create_graph=create_graph)
    return out["jacobian_AB"], out["jacobian_BA"]


def _diffusion_of(jacobian_AB: torch.Tensor, jacobian_BA: torch.Tensor, linear_AB: torch.Tensor,
                  linear_BA: torch.Tensor, extent_A: Sequence[float] | None,
                  extent_B: Sequence[float] | None) -> torch.Tensor:
    """:func:`diffusion` from the maps' Jacobians."""
    ones = jacobian_AB.new_ones(jacobian_AB.shape[-1])
    scale_A = _scales(extent_A, jacobian_AB) if extent_A is not None else ones
    scale_B = _scales(extent_B, jacobian_AB) if extent_B is not None else ones
    total = 0.0
    for jacobian, linear, out, into in ((jacobian_AB, linear_AB, scale_A, scale_B),
                                        (jacobian_BA, linear_BA, scale_B, scale_A)):
        gradient = (jacobian - linear.to(jacobian.dtype).unsqueeze(-3)) * out[:, None] / into[None, :]
        total = total + (gradient ** 2).sum((-2, -1)).mean(-1)
    return 0.5 * total


def diffusion(pair: PairMap, points: torch.Tensor, linear_AB: torch.Tensor, linear_BA: torch.Tensor, *,
              extent_A: Sequence[float] | None = None, extent_B: Sequence[float] | None = None) -> torch.Tensor:
    """The diffusion regulariser of both maps: ``0.5 * sum_maps mean_n ||S_out (J - M) S_in^-1||_F^2``.

    ``J`` is a map's Jacobian at the ``(..., N, d)`` points (:func:`map_jacobians`), ``M`` its
    linear part (``linear_AB``, ``linear_BA``: ``(..., d, d)``, e.g. the affine stage's matrices),
    so only the displacement's gradient is penalised; ``S_in`` and ``S_out`` are the extents of the
    map's input and output domains (``phi_AB`` maps B's to A's). Differentiable in the maps'
    parameters (autograd double backward). Returns ``(...)``: one value per pair of maps.
    """
    return _diffusion_of(*map_jacobians(pair, points), linear_AB, linear_BA, extent_A, extent_B)


def inverse_consistency_terms(pair: PairMap, points: torch.Tensor, *,
                              extent_A: Sequence[float] | None = None,
                              extent_B: Sequence[float] | None = None,
                              linear_AB: torch.Tensor | None = None,
                              linear_BA: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"gradient_icon": ..., "icon": ...}`` from one evaluation of both maps (see below), and
    ``"diffusion"`` (:func:`diffusion`) from the same evaluation when the maps' linear parts
    ``linear_AB`` and ``linear_BA`` are given.

    For ``(N, d)`` points the terms are scalars; for ``(..., N, d)`` points (independent pairs of
    maps) they have shape ``(...)``: one mean over the points per pair.
    """
    with_maps = linear_AB is not None and linear_BA is not None
    out = _jacobians(pair, points, residuals=True, maps=with_maps, create_graph=True)
    gradient = 0.5 * sum((_physical_jacobian(j, e) ** 2).sum((-2, -1)).mean(-1)
                         for j, e in ((out["jacobian_A"], extent_A), (out["jacobian_B"], extent_B)))
    terms = {"gradient_icon": gradient, "icon": 0.5 * (_icon_one(out["residual_A"], extent_A)
                                                       + _icon_one(out["residual_B"], extent_B))}
    if with_maps:
        terms["diffusion"] = _diffusion_of(out["jacobian_AB"], out["jacobian_BA"], linear_AB, linear_BA,
                                           extent_A, extent_B)
    return terms


def _icon_one(residual: torch.Tensor, extent: Sequence[float] | None) -> torch.Tensor:
    scale = _scales(extent, residual)
    if scale is not None:
        residual = residual * (scale / scale.max())
    return (residual ** 2).sum(-1).mean(-1)


def icon(phi_AB: Map, phi_BA: Map, points: torch.Tensor, *, extent_A: Sequence[float] | None = None,
         extent_B: Sequence[float] | None = None) -> torch.Tensor:
    """Plain ICON: mean squared residual, averaged over both directions."""
    return 0.5 * (_icon_one_all(inverse_consistency_residual(phi_AB, phi_BA, points), extent_A)
                  + _icon_one_all(inverse_consistency_residual(phi_BA, phi_AB, points), extent_B))


def _icon_one_all(residual: torch.Tensor, extent: Sequence[float] | None) -> torch.Tensor:
    return _icon_one(residual, extent).mean()


def gradient_icon_autograd(phi_AB: Map, phi_BA: Map, points: torch.Tensor, *,
                           extent_A: Sequence[float] | None = None,
                           extent_B: Sequence[float] | None = None) -> torch.Tensor:
    """Gradient inverse consistency with exact Jacobians: mean ``||d r / d x||_F^2``, both directions.

    Each sample pins a neighbourhood of the residual (its first-order behaviour), not only its
    value, in the spirit of a gradient penalty. Differentiable in the maps' parameters.
    """
    return inverse_consistency_terms(as_pair(phi_AB, phi_BA), points, extent_A=extent_A,
                                     extent_B=extent_B)["gradient_icon"]


def gradient_icon_fd(phi_AB: Map, phi_BA: Map, points: torch.Tensor, *, step: float = 1e-3,
                     extent_A: Sequence[float] | None = None,
                     extent_B: Sequence[float] | None = None) -> torch.Tensor:
    """Finite-difference GradICON: forward differences of the residual, ``step`` per axis.

    Same normalisation as :func:`gradient_icon_autograd` (mean squared Frobenius norm of the
    difference-quotient Jacobian), so the two agree on smooth maps.
    """
    if not step > 0:
        raise ValueError(f"step: expected a positive number, got {step!r}")
    dim = points.shape[-1]

    def one(f, g, extent):
        base = inverse_consistency_residual(f, g, points)
        columns = []
        for k in range(dim):
            shifted = points.clone()
            shifted[..., k] += step
            columns.append((inverse_consistency_residual(f, g, shifted) - base) / step)
        jacobian = _physical_jacobian(torch.stack(columns, dim=-1), extent)
        return (jacobian ** 2).sum((-2, -1)).mean()
    return 0.5 * (one(phi_AB, phi_BA, extent_A) + one(phi_BA, phi_AB, extent_B))
