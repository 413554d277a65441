"""The U-Net that maps a concatenated (moving, fixed) pair to a displacement grid.

Lean on purpose (the step time on a CPU is what users feel): every level halves the grid with
one strided convolution and comes back with one convolution after concatenating the skip, so
most of the arithmetic runs at coarse resolutions. The last convolution starts at zero, so a
fresh network is the identity map. Weights and activations are kept channels-last, which the
CPU convolution kernels run about 1.5x faster.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv(dim: int):
    return nn.Conv2d if dim == 2 else nn.Conv3d


class UNet(nn.Module):
    """``(B, in_channels, *shape) -> (B, out_channels, *shape)`` for any grid shape.

    Args:
        dim: 2 or 3 spatial axes.
        in_channels: input channels (2: moving and fixed).
        out_channels: output channels (default ``dim``: a displacement).
        widths: channels after each down-sampling step; ``len(widths)`` levels.
        slope: LeakyReLU negative slope.
    """

    def __init__(self, dim: int, *, in_channels: int = 2, out_channels: int | None = None,
                 widths: Sequence[int] = (16, 32, 64, 128, 256), slope: float = 0.2):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim: expected 2 or 3, got {dim!r}")
        widths = tuple(int(w) for w in widths)
        if len(widths) == 0 or min(widths) < 1:
            raise ValueError(f"widths: expected one or more positive channel counts, got {widths!r}")
        conv = _conv(dim)
        self.dim = dim
        self.widths = widths
        self.activation = nn.LeakyReLU(slope)
        channels = (in_channels, *widths)
        self.down = nn.ModuleList(conv(channels[i], channels[i + 1], 3, stride=2, padding=1)
                                  for i in range(len(widths)))
        # up[i] returns to level i: input = level i+1's output (upsampled) + level i's skip.
        self.up = nn.ModuleList(conv(widths[i + 1] + widths[i], widths[i], 3, padding=1)
                                for i in range(len(widths) - 1))
        self.head = conv(widths[0] + in_channels, out_channels or dim, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.memory_format = torch.channels_last if dim == 2 else torch.channels_last_3d
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        skips = [x]
        for down in self.down:
            x = self.activation(down(x))
            skips.append(x)
        x = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = self.activation(up(torch.cat([x, skip], dim=1)))
        skip = skips.pop()
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.head(torch.cat([x, skip], dim=1))
