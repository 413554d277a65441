"""Where images are: :class:`Grid` (shape + voxel-to-world matrix) and :class:`Image` (array + grid).

Spaces: voxel (array indices), unit (the maps' unit cube, voxel / (N - 1)) and world (RAS+ mm);
see :mod:`neuralfield_reg.geometry.grid`.
"""

from .grid import Grid, orientation_code, rotation_matrix
from .image import Image
from .resample import resample_to

__all__ = ["Grid", "Image", "orientation_code", "resample_to", "rotation_matrix"]
