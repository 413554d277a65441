"""Image similarity losses (lower is better) on tensors of equal shape.

``ssd`` and ``ncc`` take values at any set of points (grids or flat samples); ``lncc`` needs
images on a grid, ``(*spatial)`` with 2 or 3 spatial axes, because it uses neighbourhoods.
With ``batched=True`` the first axis indexes independent image pairs: the loss is computed per
pair and averaged (what network training needs; NCC statistics never mix two pairs).
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


def ssd(warped: torch.Tensor, target: torch.Tensor, *, batched: bool = False) -> torch.Tensor:
    """Mean squared difference (with equal-sized pairs the batched mean is the same number)."""
    _check_pair(warped, target)
    return ((warped - target) ** 2).mean()


def ncc(warped: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, *, batched: bool = False) -> torch.Tensor:
    """``1 - `` global normalised cross-correlation (0 for images equal up to gain and offset)."""
    _check_pair(warped, target)
    a = warped.reshape(warped.shape[0] if batched else 1, -1)
    b = target.reshape(a.shape)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    correlation = (a * b).mean(1) / torch.sqrt((a * a).mean(1) * (b * b).mean(1) + eps)
    return 1.0 - correlation.mean()


def lncc(warped: torch.Tensor, target: torch.Tensor, window: int = 9, eps: float = 1e-5, *,
         batched: bool = False) -> torch.Tensor:
    """``1 - `` mean local normalised cross-correlation over ``window``-wide cubic neighbourhoods.

    Args:
        warped, target: ``(*spatial)`` images on the same grid, 2 or 3 spatial axes
            (``(B, *spatial)`` with ``batched=True``).
        window: odd neighbourhood width in voxels (clipped to the largest odd width that fits
            an axis shorter than it).
    """
    _check_pair(warped, target)
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
    return 1.0 - correlation.mean()


SIMILARITIES = {"ssd": ssd, "ncc": ncc, "lncc": lncc}
