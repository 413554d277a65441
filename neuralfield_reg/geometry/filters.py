"""Image filters used by the coarse-to-fine schedules: Gaussian blur and resampling."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .coords import identity_grid, sample


def gaussian_kernel1d(sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` (voxels), radius ``ceil(3 sigma)``."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur with replicated edges.

    Args:
        image: ``(*spatial)`` with 2 or 3 spatial axes.
        sigma: standard deviation in voxels, one number or one per axis; 0 leaves an axis as is.
    Returns:
        The blurred image, same shape and dtype.
    """
    ndim = image.ndim
    sigmas = [float(sigma)] * ndim if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != ndim:
        raise ValueError(f"sigma: expected 1 or {ndim} values, got {len(sigmas)}")
    out = image
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        kernel = gaussian_kernel1d(s, dtype=image.dtype, device=image.device).tolist()
        radius, size = len(kernel) // 2, out.shape[axis]
        # Replicated edges, then the weighted sum of the kernel's shifted copies along the axis:
        # a few whole-volume multiply-adds (faster on the CPU than a one-channel convolution of
        # every row, which first copies the axis last; the same sums in the same order).
        index = torch.arange(-radius, size + radius, device=image.device).clamp_(0, size - 1)
        padded = out.index_select(axis, index)
        blurred = padded.narrow(axis, 0, size) * kernel[0]
        for shift in range(1, len(kernel)):
            blurred.add_(padded.narrow(axis, shift, size), alpha=kernel[shift])
        out = blurred
    return out


def gaussian_blur_batch(images: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """:func:`gaussian_blur` of every image of a ``(B, *spatial)`` batch."""
    return torch.stack([gaussian_blur(image, sigma) for image in images])


def resample(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear resampling of an image onto a grid of ``shape`` covering the same unit domain."""
    if tuple(shape) == tuple(image.shape):
        return image
    grid = identity_grid(shape, dtype=image.dtype, device=image.device)
    return sample(image, grid)
