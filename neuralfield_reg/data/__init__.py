"""Synthetic data generators."""

from .shapes import Shape, ShapePair, ShapePairDataset, shape_pair, shape_pairs

__all__ = ["Shape", "ShapePair", "ShapePairDataset", "shape_pair", "shape_pairs"]
