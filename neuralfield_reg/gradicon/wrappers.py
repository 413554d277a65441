"""Registration networks as maps: ``network(moving, fixed)`` returns a :class:`GridMap`.

Convention: images are ``(B, 1, *shape)`` on grids covering the unit cube; the returned map
``phi_AB`` takes fixed-image coordinates ``(B, *S, d)`` to moving-image coordinates, so that
``moving o phi_AB ~ fixed``. Because maps are functions of unit coordinates, a network that
ran on a half-resolution grid returns a map that is valid at full resolution as it is, and
two maps compose exactly (:meth:`GridMap.compose`). The three wrappers below assemble the
multiscale model of GradICON in a few lines (:func:`default_model`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.coords import identity_grid, sample_batch
from ..transforms.grid_maps import GridMap
from .networks import UNet


def batch_grid(shape: Sequence[int], batch: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity grid repeated over a batch: ``(B, *shape, d)`` (a view, no copy)."""
    grid = identity_grid(shape, device=device, dtype=dtype)
    return grid.expand(batch, *grid.shape)


def warp(images: torch.Tensor, phi: GridMap, shape: Sequence[int] | None = None) -> torch.Tensor:
    """``images o phi`` sampled on a grid of ``shape`` (default: the images' own grid)."""
    shape = tuple(images.shape[2:]) if shape is None else tuple(shape)
    return sample_batch(images, phi(batch_grid(shape, images.shape[0], device=images.device,
                                                dtype=images.dtype)))


def downsample(images: torch.Tensor) -> torch.Tensor:
    """Halve a ``(B, C, *shape)`` grid: a [1, 2, 1]/4 smoothing per axis, then linear resampling
    onto ``(N - 1) // 2 + 1`` voxels per axis. The new grid covers the same unit cube (its
    first and last voxel centres stay on the faces), unlike a plain 2x2 average pool, which would
    shift and shrink the coordinates of a half-resolution map by half a voxel."""
    dim = images.ndim - 2
    channels = images.shape[1]
    smoothed = images
    for axis in range(dim):
        shape = [1] * dim
        shape[axis] = 3
        kernel = torch.tensor([0.25, 0.5, 0.25], dtype=images.dtype, device=images.device)
        kernel = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        padding = [0] * (2 * dim)
        padding[2 * (dim - 1 - axis)] = padding[2 * (dim - 1 - axis) + 1] = 1
        smoothed = F.pad(smoothed, padding, mode="replicate")
        smoothed = (F.conv2d if dim == 2 else F.conv3d)(smoothed, kernel, groups=channels)
    size = [(n - 1) // 2 + 1 for n in images.shape[2:]]
    return F.interpolate(smoothed, size=size, mode="bilinear" if dim == 2 else "trilinear",
                         align_corners=True)


class RegistrationNetwork(nn.Module):
    """Base class: ``forward(moving, fixed) -> GridMap`` for ``(B, 1, *shape)`` image batches.

    ``input_shape`` (optional) is the grid the network was built and trained for;
    :func:`~neuralfield_reg.gradicon.register` resamples images onto it.
    """

    input_shape: tuple[int, ...] | None = None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> GridMap:  # pragma: no cover
        raise NotImplementedError


class DisplacementNet(RegistrationNetwork):
    """A U-Net's output read as a displacement grid: ``phi(x) = x + u(x)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> GridMap:
        return GridMap([self.unet(torch.cat([moving, fixed], dim=1))])


class Downsample(RegistrationNetwork):
    """Run ``network`` on both images halved (:func:`downsample`); its map is used as it is."""

    def __init__(self, network: RegistrationNetwork):
        super().__init__()
        self.network = network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> GridMap:
        return self.network(downsample(moving), downsample(fixed))


class TwoStep(RegistrationNetwork):
    """``first`` registers the pair, ``second`` registers the warped moving image to the fixed one;
    the result is ``phi o psi`` (``moving o phi o psi ~ fixed``)."""

    def __init__(self, first: RegistrationNetwork, second: RegistrationNetwork):
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> GridMap:
        phi = self.first(moving, fixed)
        psi = self.second(warp(moving, phi, fixed.shape[2:]), fixed)
        return phi.compose(psi)


def default_model(dim: int, shape: Sequence[int], *, levels: int = 3,
                  widths: Sequence[int] = (16, 32, 64, 128, 256)) -> RegistrationNetwork:
    """GradICON's multiscale network: a U-Net at ``1 / 2^(levels-1)`` resolution, refined by one
    more U-Net per level up to full resolution (``levels=3``: quarter, half, full).

    Args:
        dim: 2 or 3.
        shape: the image grid the model is for (recorded as ``input_shape``).
        levels: resolution levels (1 = a single full-resolution U-Net).
        widths: channels per U-Net level (see :class:`UNet`).
    """
    if dim not in (2, 3):
        raise ValueError(f"dim: expected 2 or 3, got {dim!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != dim or min(shape) < 2:
        raise ValueError(f"shape: expected {dim} axes of at least 2 voxels, got {shape!r}")
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels: expected a positive integer, got {levels!r}")
    if min(shape) >> (levels - 1) < 2:
        raise ValueError(f"levels: {levels} levels halve {shape} below 2 voxels; use fewer levels")
    network: RegistrationNetwork = DisplacementNet(UNet(dim, widths=widths))
    for _ in range(levels - 1):
        network = TwoStep(Downsample(network), DisplacementNet(UNet(dim, widths=widths)))
    network.input_shape = shape
    return network
