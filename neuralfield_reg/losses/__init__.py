"""Losses: image similarity and inverse consistency, as plain functions."""

from .inverse_consistency import (as_pair, diffusion, gradient_icon_autograd, gradient_icon_fd, icon,
                                  inverse_consistency_residual, inverse_consistency_terms, map_jacobians,
                                  residual_jacobians)
from .similarity import SIMILARITIES, lncc, mi, ncc, ssd

__all__ = ["SIMILARITIES", "as_pair", "diffusion", "gradient_icon_autograd", "gradient_icon_fd", "icon",
           "inverse_consistency_residual", "inverse_consistency_terms", "lncc", "map_jacobians", "mi", "ncc",
           "residual_jacobians", "ssd"]
