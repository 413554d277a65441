"""neuralfield_reg: deformable image registration with implicit neural fields.

Convention (the ICON family's, used throughout):

* an image of shape ``(N_0, ..., N_{d-1})`` (d = 2 or 3) covers the unit cube ``[0, 1]^d``;
  coordinate component ``k`` runs along array axis ``k`` and voxel ``i`` has its centre at
  ``i / (N_k - 1)``;
* a map is a function of such coordinates, ``(N, d) -> (N, d)``;
* for a moving image A and a fixed image B, ``phi_AB`` takes B's coordinates to A's, so that
  ``A o phi_AB ~ B``: warping samples A at ``phi_AB(x)`` for every voxel ``x`` of B's grid;
* scans carry a header: an :class:`Image` is an array on a :class:`Grid` (shape + voxel-to-world
  matrix, RAS+ mm), and a fit of two Images starts from their world alignment, so registration is
  right in millimetres whatever the orientation, origin, field of view or spacing of each file.

The three-line path::

    result = fit_pair(moving, fixed)
    warped_labels = result.warp(moving_labels, mode="nearest")
    result.save("pair.pt")
"""

from ._version import __version__
from .config import (AffineConfig, FitConfig, ModelConfig, ObjectiveConfig, RuntimeConfig, SamplingConfig,
                     ScheduleConfig)
from .encoders import BackendUnavailableError, HashGridConfig
from .registration.fit import FitDivergedError, fit_pair, fit_pairs
from .geometry import Grid, Image
from .io.images import read_image, write_image
from .registration.result import RegistrationResult

__all__ = ["AffineConfig", "BackendUnavailableError", "FitConfig", "FitDivergedError", "Grid", "HashGridConfig",
           "Image", "ModelConfig", "ObjectiveConfig", "RegistrationResult", "RuntimeConfig", "SamplingConfig",
           "ScheduleConfig", "__version__", "fit_pair", "fit_pairs", "read_image", "write_image"]
