"""The field stage's loop: draw points, evaluate the objective, check, record, step."""

from __future__ import annotations

import numpy as np
import torch
from torch.optim.swa_utils import get_swa_multi_avg_fn
from tqdm.auto import tqdm

from .guard import Guard
from .objective import Objective
from .sampler import Sampler
from .schedule import Schedule
from .static_step import StaticStep


class History:
    """Every term of every step, per pair: ``per_pair[p][name]`` is a list of floats."""

    def __init__(self, names: list[str], n_pairs: int):
        self.names = names
        self.per_pair: list[dict[str, list[float]]] = [{name: [] for name in names} for _ in range(n_pairs)]

    def append(self, values: list[list[float]]) -> None:
        for pair_history, row in zip(self.per_pair, values):
            for name, value in zip(self.names, row):
                pair_history[name].append(value)

    def rewind(self, iteration: int) -> None:
        """Forget the steps from ``iteration`` on (after a rollback)."""
        for pair_history in self.per_pair:
            for values in pair_history.values():
                del values[iteration:]


class WeightAverage:
    """The running mean of ``parameters`` over the steps after ``start`` (stochastic weight
    averaging, updated by torch's ``swa_utils``); :meth:`apply` writes it into the parameters."""

    def __init__(self, parameters: list, start: int):
        self.parameters, self.start = parameters, start
        self.means: list[torch.Tensor] | None = None
        self.count = 0                              # steps in the mean
        self._update = get_swa_multi_avg_fn()

    def add(self, steps_done: int) -> None:
        if steps_done <= self.start:
            return
        current = [p.detach() for p in self.parameters]
        if self.means is None:
            self.means = [p.clone() for p in current]
        else:
            self._update(self.means, current, self.count)
        self.count += 1

    def reset(self) -> None:
        """Forget the steps taken so far (after a rollback)."""
        self.means, self.count = None, 0

    def apply(self) -> None:
        if self.means is not None:
            with torch.no_grad():
                for mean, p in zip(self.means, self.parameters):
                    p.copy_(mean)


def optimise(iterations: int, sampler: Sampler, schedule: Schedule, objective: Objective, guard: Guard, optimizer,
             parameters: list, *, progress: bool = True, desc: str = "fit",
             static_step: StaticStep | None = None) -> History:
    """Run ``iterations`` Adam steps of ``objective`` and return the history of its terms.
    ``parameters`` are the field parameters in the order of the objective's fused gradients; with
    ``average_last`` in the schedule's config they end as the mean of the last steps' values.
    With ``static_step`` (a :class:`StaticStep` of the same objective and optimiser) each step
    runs there, in one piece, and its terms are checked after the update (a snapshot for
    rollback is then taken before the step and kept if the step was sound)."""
    history = History(objective.names, sampler.n_pairs)
    share = schedule.config.average_last
    average = WeightAverage(parameters, iterations - max(1, round(share * iterations))) if share > 0 else None
    bar = tqdm(total=iterations, disable=not progress, desc=desc, leave=False)
    iteration = 0
    while iteration < iterations:
        weights = schedule.level_weights(iteration)
        step, snapshot = None, None
        if static_step is not None:
            draw = sampler.draw()
            snapshot = guard.state(iteration) if guard.keeps(iteration) else None
            values = static_step(schedule.images(iteration), weights, draw, schedule.learning_rate(iteration))
        else:
            optimizer.zero_grad(set_to_none=True)
            step = objective(schedule.images(iteration), weights, sampler.draw())
            values = step.values(objective.names)
        rolled_back_to = guard.check(iteration, values, weights, snapshot=snapshot)
        if rolled_back_to is not None:
            iteration = bar.n = rolled_back_to
            history.rewind(iteration)
            if average is not None:
                average.reset()
            continue
        history.append(values)
        if step is not None:
            optimizer.set_learning_rate(schedule.learning_rate(iteration))
            step.backward(parameters)
            optimizer.step()
        iteration += 1
        if average is not None:
            average.add(iteration)
        bar.update(1)
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([row[0] for row in values]):.4g}")
    bar.close()
    if average is not None:
        average.apply()
    guard.check_end()
    return history
