"""Synthetic data generators."""

from .shapes import Shape, ShapePair, shape_pair, shape_pairs

__all__ = ["Shape", "ShapePair", "shape_pair", "shape_pairs"]
