"""GradICON and ICON training losses for registration networks.

For a batch of pairs the network runs both ways in one call, ``phi_AB = net(A, B)`` and
``phi_BA = net(B, A)``, and the loss is

    sim(A o phi_AB, B) + sim(B o phi_BA, A) + lam * inverse_consistency

with the inverse-consistency term evaluated on the identity grid plus Gaussian noise
(``noise`` voxels standard deviation, as in the GradICON reference) and averaged over both
directions (``phi_AB o phi_BA`` and ``phi_BA o phi_AB``):

* ``"gradicon"`` (:func:`gradient_inverse_consistency`): the forward-difference quotient of the
  residual ``r(x) = phi_AB(phi_BA(x)) - x`` with step ``1e-3`` along each axis, its squared
  norm averaged over the axes;
* ``"icon"`` (:func:`inverse_consistency`): the squared residual averaged over its components.

These are the normalisations of the ICON/GradICON reference code (mean over vector components),
so its published weights (e.g. ICON's historical ``lam = 2048``) mean the same thing here. In
terms of the library's per-point functions they are ``gradient_icon_fd / d`` and ``icon / d``.
"""

from __future__ import annotations

import torch

from ..geometry.coords import sample_batch
from ..transforms.grid_maps import GridMap
from ..losses import SIMILARITIES
from ..validation import check_choice
from .wrappers import RegistrationNetwork, batch_grid

LOSSES = ("gradicon", "icon")
DEFAULT_LAMBDA = {"gradicon": 1.0, "icon": 1.0}
FD_STEP = 1e-3


def _composed_residual(phi: GridMap, points: torch.Tensor) -> torch.Tensor:
    """For a batch ``phi = [phi_AB; phi_BA]``: ``[phi_AB(phi_BA(x)); phi_BA(phi_AB(x))] - x``."""
    return phi(phi.swap_halves()(points)) - points


def inverse_consistency(phi: GridMap, points: torch.Tensor) -> torch.Tensor:
    """ICON term for a batch ``[phi_AB; phi_BA]`` at ``(2B, *S, d)`` points: mean squared residual
    component."""
    return (_composed_residual(phi, points) ** 2).mean()


def gradient_inverse_consistency(phi: GridMap, points: torch.Tensor, step: float = FD_STEP) -> torch.Tensor:
    """GradICON term for a batch ``[phi_AB; phi_BA]`` at ``(2B, *S, d)`` points: forward
    differences of the residual along each axis, their squared norms averaged over points and
    axes (the reference code's sum over axes of the mean over components). The ``d + 1`` point
    sets go through the maps as one batch of points."""
    dim = points.shape[-1]
    shifts = torch.cat([torch.zeros(1, dim), torch.eye(dim) * step]).to(points)     # (d + 1, d)
    stacked = points.reshape(points.shape[0], 1, -1, dim) + shifts[None, :, None, :]
    residual = _composed_residual(phi, stacked.reshape(points.shape[0], -1, dim))
    residual = residual.reshape(points.shape[0], dim + 1, -1, dim)
    quotients = (residual[:, 1:] - residual[:, :1]) / step           # (2B, axis, N, component)
    return (quotients ** 2).sum(-1).mean()                           # |q_k|^2, mean over axes


def registration_loss(network: RegistrationNetwork, moving: torch.Tensor, fixed: torch.Tensor, *,
                      loss: str = "gradicon", similarity: str = "lncc", lam: float | None = None,
                      noise: float = 2.0, generator: torch.Generator | None = None,
                      noise_samples: torch.Tensor | None = None, lncc_window: int = 5) -> dict[str, torch.Tensor]:
    """Loss terms for a batch: ``{"loss", "similarity", "inverse_consistency"}`` (scalars).

    Args:
        network: maps ``(moving, fixed)`` batches to a :class:`~neuralfield_reg.transforms.grid_maps.GridMap`.
        moving, fixed: ``(B, 1, *shape)`` image batches on the same grid.
        loss: ``"gradicon"`` or ``"icon"``.
        similarity: ``"ssd"``, ``"ncc"`` or ``"lncc"`` (per pair, then averaged).
        lam: weight of the inverse-consistency term (default :data:`DEFAULT_LAMBDA`).
        noise: standard deviation of the noise added to the identity grid, in voxels.
        generator: random source for the noise (CPU generator; reproducible training).
        noise_samples: standard-normal samples ``(2B, *shape, d)`` to use instead of drawing them
            (rows ``0..B-1`` for ``phi_AB``, ``B..2B-1`` for ``phi_BA``).
        lncc_window: LNCC window width in voxels.
    """
    check_choice("loss", loss, LOSSES)
    check_choice("similarity", similarity, tuple(SIMILARITIES))
    lam = DEFAULT_LAMBDA[loss] if lam is None else float(lam)
    if not lam >= 0:
        raise ValueError(f"lam: expected a non-negative weight, got {lam!r}")
    if moving.shape != fixed.shape or moving.ndim not in (4, 5) or moving.shape[1] != 1:
        raise ValueError(f"moving and fixed: expected equal (B, 1, *shape) batches with 2 or 3 spatial "
                         f"axes, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
    shape = tuple(moving.shape[2:])
    sources = torch.cat([moving, fixed])          # both directions in one network call
    targets = torch.cat([fixed, moving])
    phi = network(sources, targets)               # [phi_AB; phi_BA]

    grid = batch_grid(shape, sources.shape[0], device=moving.device, dtype=moving.dtype)
    options = {"window": lncc_window} if similarity == "lncc" else {}
    warped = sample_batch(sources, phi(grid))[:, 0]
    # Mean over the 2B pairs, times 2: the sum of the two directions' similarities.
    similarity_term = 2.0 * SIMILARITIES[similarity](warped, targets[:, 0], batched=True, **options).mean()

    spread = torch.tensor([noise / (n - 1) for n in shape], dtype=moving.dtype, device=moving.device)
    if noise_samples is None:
        noise_samples = torch.randn(grid.shape, generator=generator, dtype=moving.dtype)
    elif tuple(noise_samples.shape) != tuple(grid.shape):
        raise ValueError(f"noise_samples: expected shape {tuple(grid.shape)}, got {tuple(noise_samples.shape)}")
    points = grid + noise_samples.to(moving.device, moving.dtype) * spread
    if loss == "gradicon":
        consistency = gradient_inverse_consistency(phi, points)
    else:
        consistency = inverse_consistency(phi, points)
    return {"loss": similarity_term + lam * consistency, "similarity": similarity_term,
            "inverse_consistency": consistency}
