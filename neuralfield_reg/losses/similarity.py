"""Image similarity losses (lower is better) on tensors of equal shape.

``ssd``, ``ncc`` and ``mi`` take values at any set of points (grids or flat samples); ``lncc``
needs images on a grid, ``(*spatial)`` with 2 or 3 spatial axes, because it uses neighbourhoods.
With ``batched=True`` the first axis indexes independent image pairs and the result has one
value per pair, shape ``(B,)`` (NCC and MI statistics never mix two pairs). ``ssd``, ``ncc`` and
``mi`` take optional ``weights`` (e.g. a 0/1 mask of the points that count), same shape as the
images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(warped: torch.Tensor, target: torch.Tensor) -> None:
    if warped.shape != target.shape:
        raise ValueError(f"warped and target: expected equal shapes, got {tuple(warped.shape)} "
                         f"and {tuple(target.shape)}")
    if warped.numel() == 0:
        raise ValueError("warped: expected a non-empty tensor")
    for name, value in (("warped", warped), ("target", target)):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got dtype {value.dtype}")


def _rows(value: torch.Tensor, batched: bool) -> torch.Tensor:
    return value.reshape(value.shape[0] if batched else 1, -1)


def _weighted_mean(value: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of each row of ``value`` (``(B, N)``), weighted by ``weights`` when given."""
    if weights is None:
        return value.mean(1)
    return (weights * value).sum(1) / weights.sum(1)


def _check_weights(weights: torch.Tensor | None, like: torch.Tensor, batched: bool) -> torch.Tensor | None:
    if weights is None:
        return None
    if weights.shape != like.shape:
        raise ValueError(f"weights: expected the images' shape {tuple(like.shape)}, got {tuple(weights.shape)}")
    return _rows(weights.to(like.dtype), batched)


def _finish(value: torch.Tensor, batched: bool) -> torch.Tensor:
    return value if batched else value[0]


def ssd(warped: torch.Tensor, target: torch.Tensor, *, batched: bool = False,
        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference."""
    _check_pair(warped, target)
    w = _check_weights(weights, warped, batched)
    return _finish(_weighted_mean(_rows((warped - target) ** 2, batched), w), batched)


NCC_EPS = 1e-8        # ncc's default: the fused kernels (encoders/fused.py) use the same


def ncc(warped: torch.Tensor, target: torch.Tensor, eps: float = NCC_EPS, *, batched: bool = False,
        weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - `` global normalised cross-correlation (0 for images equal up to gain and offset)."""
    _check_pair(warped, target)
    w = _check_weights(weights, warped, batched)
    a, b = _rows(warped, batched), _rows(target, batched)
    a = a - _weighted_mean(a, w)[:, None]
    b = b - _weighted_mean(b, w)[:, None]
    correlation = _weighted_mean(a * b, w) / torch.sqrt(_weighted_mean(a * a, w) * _weighted_mean(b * b, w) + eps)
    return _finish(1.0 - correlation, batched)


def lncc(warped: torch.Tensor, target: torch.Tensor, window: int = 9, eps: float = 1e-5, *,
         batched: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - `` mean local normalised cross-correlation over ``window``-wide cubic neighbourhoods.

    Args:
        warped, target: ``(*spatial)`` images on the same grid, 2 or 3 spatial axes
            (``(B, *spatial)`` with ``batched=True``).
        window: odd neighbourhood width in voxels (clipped to the largest odd width that fits
            an axis shorter than it).
    """
    _check_pair(warped, target)
    w = _check_weights(weights, warped, batched)         # which voxels' local correlations count
    spatial = warped.ndim - 1 if batched else warped.ndim
    if spatial not in (2, 3):
        raise ValueError(f"warped: lncc expects a 2D or 3D image grid{' after the batch axis' if batched else ''}, "
                         f"got shape {tuple(warped.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd positive integer, got {window!r}")
    pool = F.avg_pool2d if spatial == 2 else F.avg_pool3d
    if not batched:
        warped, target = warped[None], target[None]
    means = torch.stack([warped, target, warped * warped, target * target, warped * target], dim=1)
    for axis in range(spatial):          # separable box mean: one axis at a time (w, not w^d, reads)
        kernel = [1] * spatial
        size = warped.shape[axis + 1]
        kernel[axis] = min(window, size - 1 + size % 2)      # an axis shorter than the window: all of it
        padding = [k // 2 for k in kernel]
        means = pool(means, kernel, stride=1, padding=padding, count_include_pad=False)
    means = means.unbind(1)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = means
    covariance = mean_ab - mean_a * mean_b
    variance_a = (mean_aa - mean_a * mean_a).clamp_min(0.0)
    variance_b = (mean_bb - mean_b * mean_b).clamp_min(0.0)
    correlation = covariance * covariance / (variance_a * variance_b + eps)
    return _finish(1.0 - _weighted_mean(correlation.reshape(correlation.shape[0], -1), w), batched)


MI_BINS = 32          # mi's default number of intensity bins (the fit's ObjectiveConfig.mi_bins)


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel (support ``|t| < 2``, sums to 1 over integer shifts)."""
    t = t.abs()
    return torch.where(t < 1, (4 - 6 * t ** 2 + 3 * t ** 3) / 6, ((2 - t).clamp_min(0)) ** 3 / 6)


def _entropy_part(p: torch.Tensor, dims) -> torch.Tensor:
    """``sum p log p`` over ``dims`` (0 where p is 0, with a zero gradient there)."""
    return (p * torch.log(p.clamp_min(1e-30))).sum(dims)


def mi(warped: torch.Tensor, target: torch.Tensor, bins: int = MI_BINS, *, batched: bool = False,
       weights: torch.Tensor | None = None) -> torch.Tensor:
    """``-`` mutual information (nats) of two intensity samples in [0, 1] (values outside are
    clamped), from their joint histogram with cubic B-spline Parzen windows (Mattes et al.): a
    value ``v`` sits at ``v (bins - 1)`` on ``bins`` unit-spaced centres (plus two on each side
    for the windows' support), so the histogram and MI are smooth in ``warped``.

    ``MI = sum p_ab log p_ab - sum p_a log p_a - sum p_b log p_b`` with ``p_ab`` the weighted,
    normalised joint histogram and ``p_a``, ``p_b`` its marginals. MI does not assume a linear
    relation between the two intensities (it is the same for ``target`` and ``1 - target``), so
    it suits pairs of different contrast.
    """
    _check_pair(warped, target)
    if not isinstance(bins, int) or bins < 4:
        raise ValueError(f"bins: expected an integer >= 4, got {bins!r}")
    w = _check_weights(weights, warped, batched)
    a, b = _rows(warped, batched).clamp(0.0, 1.0), _rows(target, batched).clamp(0.0, 1.0)
    centres = torch.arange(-2, bins + 2, device=a.device, dtype=a.dtype)
    window_a = _cubic_bspline(a[..., None] * (bins - 1) - centres)              # (B, N, bins + 4)
    window_b = _cubic_bspline(b[..., None] * (bins - 1) - centres)
    if w is None:
        w = torch.ones_like(a)
    joint = torch.einsum("bn,bnk,bnl->bkl", w, window_a, window_b) / w.sum(1)[:, None, None]
    value = _entropy_part(joint, (1, 2)) - _entropy_part(joint.sum(2), 1) - _entropy_part(joint.sum(1), 1)
    return _finish(-value, batched)


SIMILARITIES = {"ssd": ssd, "ncc": ncc, "lncc": lncc, "mi": mi}
