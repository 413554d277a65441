"""The field stage's optimisation, one part per job.

- :mod:`.sampler`: where a step compares the images (voxels, masks, LNCC patches) and where it
  pins the maps (gradient-ICON points).
- :mod:`.schedule`: what changes with the iteration: the blur stage, the hash-grid level
  weights, the learning rate.
- :mod:`.objective`: the loss of a step, its terms and its gradients, computed by the fused CPU
  kernels or by autograd, chosen once per fit.
- :mod:`.guard`: divergence checks, snapshots and rollback.
- :mod:`.static_step`: a whole step over fixed buffers, captured as a CUDA graph on a GPU.
- :mod:`.loop`: the loop that ties them together, and the history it records.
"""

from .guard import FitDivergedError, Guard
from .loop import History, optimise
from .objective import Objective, Step, make_objective
from .sampler import Draw, Points, Sampler, patch_indices, patch_shape
from .schedule import Schedule, level_weights
from .static_step import StaticStep

__all__ = ["Draw", "FitDivergedError", "Guard", "History", "Objective", "Points", "Sampler", "Schedule", "StaticStep",
           "Step", "level_weights", "make_objective", "optimise", "patch_indices", "patch_shape"]
