"""Divergence checks of a fit, and rollback to the last good state.

A fit has diverged when a loss term is NaN or Inf, when the gradient-ICON penalty explodes (the
maps no longer invert each other although every number is finite), or when a displacement field
has left the image by far. With ``on_divergence="raise"`` that raises :class:`FitDivergedError`
naming the pair, the term and the iteration; with ``"rollback"`` the fit returns to the last
snapshot (taken every ``SNAPSHOT_EVERY`` iterations) with a lower learning rate, at most
``max_rollbacks`` times.
"""

from __future__ import annotations

import copy
import math

import torch

from ..config import FitConfig
from ..transforms.fields import MapPairs
from .schedule import Schedule

# With on_divergence="rollback", the state is kept every this many iterations (the maps are also
# checked for runaway displacements this often).
SNAPSHOT_EVERY = 10
# A gradient-ICON penalty above this (the mean squared Frobenius norm of the residual's Jacobian,
# dimensionless; working fits stay below 0.1: at most 0.03 on 2D shapes, 0.001 on a brain pair)
# means the two maps no longer invert each other: the fit diverged although every number is finite.
PENALTY_LIMIT = 10.0
# A displacement field longer than this (unit coordinates: image widths) has left the image by far.
# (A small pair with a weak affine start legitimately reached 1.04 widths in its background.)
DISPLACEMENT_LIMIT = 4.0


class FitDivergedError(RuntimeError):
    """The optimisation diverged: a NaN or Inf, an exploding gradient-ICON penalty, or maps that
    left the image; the message names the iteration and what went wrong."""


def divergence(values: list[list[float]], names: list[str], config: FitConfig, maps: MapPairs,
               level_weights: torch.Tensor | None, check_maps: bool) -> tuple[int, str, str] | None:
    """``(pair, what, how)`` of the first sign that the fit diverged, else None: a NaN/Inf term
    or an exploding penalty in ``values`` (``(B, len(names))``), or (with ``check_maps``)
    displacement fields longer than the image on a coarse lattice."""
    for p, row in enumerate(values):
        for name, value in zip(names, row):
            if not math.isfinite(value):
                return p, f"{name} term", f"became {value}"
        penalty = row[names.index("gradient_icon")]
        if config.gradient_icon_weight > 0 and penalty > PENALTY_LIMIT:
            return p, "gradient_icon term", f"exploded to {penalty:.3g} (working fits stay below 0.1)"
    if not check_maps:
        return None
    dim = maps.dim
    axis = torch.linspace(0.0, 1.0, 5, device=maps.matrices.device)
    lattice = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    with torch.no_grad():
        fields = maps.fields.forward_batched(lattice.expand(maps.fields.n_fields, *lattice.shape).contiguous(),
                                             level_weights)
    longest = fields.norm(dim=-1).amax(1)                                   # (2B,) unit coordinates
    field = int(torch.argmax(longest))
    if not bool(torch.isfinite(longest).all()) or float(longest[field]) > DISPLACEMENT_LIMIT:
        return field // 2, "displacement", (f"reached {float(longest[field]):.3g} image widths "
                                            f"({'phi_AB' if field % 2 == 0 else 'phi_BA'})")
    return None


class Guard:
    """Checks every step of a fit and keeps (or restores) its good state.

    Args:
        caller: ``"fit_pair"`` or ``"fit_pairs"``, for the messages (the latter names the pair).
        maps, optimizer, generator, schedule: the state a rollback restores (the schedule's
            learning-rate scale is lowered by ``config.rollback_factor`` each time).
    """

    def __init__(self, config: FitConfig, caller: str, names: list[str], maps: MapPairs, optimizer,
                 generator: torch.Generator, schedule: Schedule):
        self.config, self.caller, self.names = config, caller, names
        self.maps, self.optimizer, self.generator, self.schedule = maps, optimizer, generator, schedule
        self.snapshot = None
        self.rollbacks: list[dict] = []

    def _where(self, pair: int) -> str:
        return f" of pair {pair}" if self.caller == "fit_pairs" else ""

    def keeps(self, iteration: int) -> bool:
        """Whether a sound step at ``iteration`` leaves a snapshot."""
        return self.config.on_divergence == "rollback" and iteration % SNAPSHOT_EVERY == 0

    def state(self, iteration: int) -> tuple:
        """A snapshot of the fit now, to resume at ``iteration``."""
        return (iteration, copy.deepcopy(self.maps.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                self.generator.get_state())

    def check(self, iteration: int, values: list[list[float]], weights: torch.Tensor,
              snapshot: tuple | None = None) -> int | None:
        """None when the step at ``iteration`` is sound (a snapshot is kept every
        ``SNAPSHOT_EVERY`` iterations with rollback); else the iteration the fit was rolled back
        to. Raises :class:`FitDivergedError` when it cannot roll back.

        ``values`` are the step's terms, computed before its update. Without ``snapshot`` the
        update is not applied yet: the maps are checked too and the state now is kept. With
        ``snapshot`` (the state taken before an update that is already applied, by a
        :class:`StaticStep`) that state is kept when its terms are sound, and the maps checked
        are those after the update."""
        config = self.config
        on_snapshot = iteration % SNAPSHOT_EVERY == 0
        bad = divergence(values, self.names, config, self.maps, weights, check_maps=False)
        if bad is None and snapshot is not None and self.keeps(iteration):
            self.snapshot = snapshot
        if bad is None and on_snapshot:
            bad = divergence([], self.names, config, self.maps, weights, check_maps=True)
        if bad is None:
            if snapshot is None and self.keeps(iteration):
                self.snapshot = self.state(iteration)
            return None
        pair, name, what = bad
        message = f"{self.caller}: the {name}{self._where(pair)} {what} at iteration {iteration}"
        if config.on_divergence != "rollback" or self.snapshot is None or len(self.rollbacks) >= config.max_rollbacks:
            advice = (f" after {len(self.rollbacks)} rollbacks; lower FitConfig.learning_rate"
                      if config.on_divergence == "rollback" else
                      "; lower FitConfig.learning_rate (or set on_divergence='rollback')")
            raise FitDivergedError(f"{message}{advice} or check the images")
        iteration, maps_state, optimizer_state, generator_state = self.snapshot
        self.maps.load_state_dict(maps_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.generator.set_state(generator_state)
        self.schedule.learning_rate_scale *= config.rollback_factor
        self.rollbacks.append({"iteration": iteration, "term": name.split()[0],
                               "learning_rate_scale": self.schedule.learning_rate_scale})
        return iteration

    def check_end(self) -> None:
        """Raises :class:`FitDivergedError` if the last step left a non-finite parameter or a
        runaway displacement."""
        for name, parameter in self.maps.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise FitDivergedError(f"{self.caller}: parameter {name} became non-finite in the last step")
        bad = divergence([], self.names, self.config, self.maps, None, check_maps=True)
        if bad:
            raise FitDivergedError(f"{self.caller}: the {bad[1]}{self._where(bad[0])} {bad[2]} at the end; "
                                   "lower FitConfig.learning_rate")
