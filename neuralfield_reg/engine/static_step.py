"""A fit step over fixed buffers, captured once as a CUDA graph and replayed.

On a GPU an eager step of the autograd objective is launch-bound: a few hundred small kernels
(the maps, their Jacobians by double backward, the similarity, Adam), each launched from Python,
for about a millisecond of GPU work. :class:`StaticStep` runs the whole step (objective, backward
and Adam update) on tensors that keep their addresses from step to step: the step's inputs (the
blurred images, the level weights, the drawn points) are copied into its buffers, and its terms
come out in one. That makes the step capturable: on CUDA it is run by a
:class:`~neuralfield_reg._graphs.CapturedStep` (eager warm-up steps, one capture, then one replay
per step). The points are still drawn eagerly, outside the graph, so a fit draws the same points
either way.

The optimiser must be a capturable :class:`~neuralfield_reg._optim.Adam` (step counts and learning
rate in device tensors, its state restored in place): a rollback then restores the state the
graph reads, and the graph stays valid. On the CPU (``capture=False``) it runs the same step
eagerly, which is how the tests compare it with the plain loop.
"""

from __future__ import annotations

import torch

from .._graphs import CapturedStep
from .objective import Objective
from .sampler import Draw, Points


def _draw_tensors(draw: Draw) -> list[torch.Tensor | None]:
    return [draw.B.points, draw.B.index, draw.A.points, draw.A.index, draw.penalty]


def _copy_draw(draw: Draw) -> Draw:
    B_points, B_index, A_points, A_index, penalty = [None if t is None else t.clone() for t in _draw_tensors(draw)]
    return Draw(B=Points(B_points, B_index), A=Points(A_points, A_index), penalty=penalty)


class StaticStep:
    """Calls of ``step(images, weights, draw, learning_rate)`` run one fit step (the objective
    at the drawn points, its gradients, the optimiser's update) and return the terms of the step
    (``(B, len(objective.names))`` floats), computed before the update.

    Args:
        objective: the fit's autograd objective (its :meth:`Objective.__call__` and
            :meth:`Step.backward` must launch only device work: no host reads, no host-to-device
            copies).
        optimizer: a capturable :class:`~neuralfield_reg._optim.Adam` over ``parameters``.
        parameters: the field parameters, in the objective's gradient order.
        capture: capture the step as a CUDA graph (the tensors must be on a CUDA device).
    """

    def __init__(self, objective: Objective, optimizer, parameters: list[torch.Tensor], capture: bool):
        if not getattr(optimizer, "capturable", False):
            raise ValueError("optimizer: expected a capturable Adam (neuralfield_reg._optim.Adam(capturable=True))")
        self.objective, self.optimizer, self.parameters = objective, optimizer, parameters
        self.inputs: tuple | None = None           # (moving, fixed, weights, draw): the step's buffers
        self.sources: tuple | None = None          # the images last copied into the buffers
        device = parameters[0].device if parameters else torch.device("cpu")
        self.runner = CapturedStep(self._step, lambda: optimizer.zero_grad(set_to_none=True), device, capture,
                                   "fit: the field stage's step")

    def _step(self) -> torch.Tensor:
        moving, fixed, weights, draw = self.inputs
        step = self.objective((moving, fixed), weights, draw)
        step.backward(self.parameters)
        self.optimizer.step()
        return torch.stack([step.terms[name].detach() for name in self.objective.names], dim=1)

    def _load(self, images, weights: torch.Tensor, draw: Draw) -> None:
        if self.inputs is None:
            self.inputs = (images[0].clone(), images[1].clone(), weights.clone(), _copy_draw(draw))
            self.sources = tuple(images)
            return
        moving, fixed, static_weights, static_draw = self.inputs
        if any(a is not b for a, b in zip(images, self.sources)):     # a new blur stage
            moving.copy_(images[0])
            fixed.copy_(images[1])
            self.sources = tuple(images)
        static_weights.copy_(weights)
        for mine, theirs in zip(_draw_tensors(static_draw), _draw_tensors(draw), strict=True):
            if (mine is None) != (theirs is None) or (mine is not None and mine.shape != theirs.shape):
                raise ValueError("draw: expected the same kind of points at every step")
            if mine is not None:
                mine.copy_(theirs)

    def __call__(self, images, weights: torch.Tensor, draw: Draw, learning_rate: float) -> list[list[float]]:
        self._load(images, weights, draw)
        self.optimizer.set_learning_rate(learning_rate)
        return self.runner().tolist()
