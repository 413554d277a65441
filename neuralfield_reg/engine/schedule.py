"""What changes with the iteration: the blur stage, the hash-grid level weights, the learning rate."""

from __future__ import annotations

import math

import torch

from ..config import FitConfig
from ..geometry.filters import gaussian_blur_batch


def level_weights(iteration: int, config: FitConfig, n_levels: int, device) -> torch.Tensor:
    """Weights in [0, 1] per hash-grid level: a ramp from ``start_levels`` to all levels."""
    ramp_iterations = config.level_ramp * config.iterations
    progress = 1.0 if ramp_iterations <= 0 else min(1.0, iteration / ramp_iterations)
    active = config.start_levels + progress * (n_levels - config.start_levels)
    return (active - torch.arange(n_levels, device=device, dtype=torch.float32)).clamp(0.0, 1.0)


class Schedule:
    """The coarse-to-fine schedule of a fit.

    Args:
        config: the fit's settings (``blur_sigmas``, ``level_ramp``, ``start_levels``,
            ``learning_rate``, ``learning_rate_decay``, ``iterations``).
        moving, fixed: ``(B, *shape)`` normalised images.
        spacings: the moving and the fixed grid's voxel sizes (mm), for blur sigmas in mm.
    """

    def __init__(self, config: FitConfig, moving: torch.Tensor, fixed: torch.Tensor,
                 spacings: tuple[tuple[float, ...], tuple[float, ...]]):
        self.config = config
        self.device = moving.device
        self.n_levels = config.encoding.n_levels
        self.stages = [(gaussian_blur_batch(moving, config.blur_voxels(s, spacings[0]))[:, None],
                        gaussian_blur_batch(fixed, config.blur_voxels(s, spacings[1]))[:, None])
                       for s in config.blur_sigmas]
        self.learning_rate_scale = 1.0          # lowered by each rollback

    def images(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blurred ``(B, 1, *shape)`` moving and fixed images of the iteration's stage (equal
        shares of the iterations, coarse to fine)."""
        count = len(self.stages)
        return self.stages[min(iteration * count // self.config.iterations, count - 1)]

    def level_weights(self, iteration: int) -> torch.Tensor:
        return level_weights(iteration, self.config, self.n_levels, self.device)

    def learning_rate(self, iteration: int) -> float:
        """Cosine from ``learning_rate`` to ``learning_rate * learning_rate_decay``, times the
        rollbacks' scale."""
        config = self.config
        cosine = 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, config.iterations - 1)))
        decay = config.learning_rate_decay
        return self.learning_rate_scale * config.learning_rate * (decay + (1.0 - decay) * cosine)
