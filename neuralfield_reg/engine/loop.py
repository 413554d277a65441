"""The field stage's loop: draw points, evaluate the objective, check, record, step."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .guard import Guard
from .objective import Objective
from .sampler import Sampler
from .schedule import Schedule


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


def optimise(iterations: int, sampler: Sampler, schedule: Schedule, objective: Objective, guard: Guard, optimizer,
             parameters: list, *, progress: bool = True, desc: str = "fit") -> History:
    """Run ``iterations`` Adam steps of ``objective`` and return the history of its terms.
    ``parameters`` are the field parameters in the order of the objective's fused gradients."""
    history = History(objective.names, sampler.n_pairs)
    bar = tqdm(total=iterations, disable=not progress, desc=desc, leave=False)
    iteration = 0
    while iteration < iterations:
        weights = schedule.level_weights(iteration)
        optimizer.zero_grad(set_to_none=True)
        step = objective(schedule.images(iteration), weights, sampler.draw())
        values = step.values(objective.names)
        rolled_back_to = guard.check(iteration, values, weights)
        if rolled_back_to is not None:
            iteration = bar.n = rolled_back_to
            history.rewind(iteration)
            continue
        history.append(values)
        optimizer.set_learning_rate(schedule.learning_rate(iteration))
        step.backward(parameters)
        optimizer.step()
        iteration += 1
        bar.update(1)
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([row[0] for row in values]):.4g}")
    bar.close()
    guard.check_end()
    return history
