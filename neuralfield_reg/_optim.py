"""The optimiser shared by the fits (the fields and the affine stage).

A small Adam of our own rather than ``torch.optim.Adam``: the same update (Kingma & Ba, with
torch's defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay, bias correction; the tests compare
it with torch's), but building one does not import torch's compiler stack, which
``torch.optim.Optimizer`` does on first use (2-3 s of a command-line fit on 2 cores), and a step
over a handful of tensors is a few in-place operations each. Given the compiled kernels
(``kernels=``, CPU tensors), a step is one native call that reads and writes every element once
(``cuda_ext/optim_cpu.cpp``) instead of five passes per tensor: the same update up to rounding.
With ``capturable=True`` the step counts and the learning rate live in tensors on the parameters'
device, so that a step can be captured in a CUDA graph and replayed (``_graphs.py``). With
``skip_zero=True`` an entry whose gradient is exactly 0 at a step is left alone, as Instant-NGP
treats its hash tables (a step's points touch a quarter of a 3D fit's table rows; the others get a
zero gradient): its value and moments stay, and the step costs less.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam over a list of tensors, with the parts of ``torch.optim.Optimizer``'s interface the
    fits use: ``param_groups[0]["lr"]`` (set before each step for a schedule), ``zero_grad``,
    ``step``, ``state_dict`` / ``load_state_dict``.

    Parameters whose ``.grad`` is None at a step are left alone (their moments do not decay), as
    torch's Adam does. With ``kernels`` (the compiled module, ``neuralfield_reg._cuda_ext.load()``)
    and parameters on the CPU, the step runs natively. With ``capturable``, the step counts and
    the learning rate are float64 tensors on the parameters' device and a step reads no number
    from them on the host (the same update, for CUDA graphs); :meth:`load_state_dict` then
    writes into the existing tensors, so a captured step stays valid after a rollback. With
    ``skip_zero``, entries whose gradient is exactly 0 keep their value and moments at that step
    (the step count is the parameter's, so the others' bias correction is torch's); an entry with a
    gradient at every step follows torch's Adam exactly.
    """

    def __init__(self, parameters, learning_rate: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, kernels=None, capturable: bool = False, skip_zero: bool = False):
        self.parameters = list(parameters)
        cpu = all(p.device.type == "cpu" and p.is_contiguous() for p in self.parameters)
        self.kernels = kernels if cpu and not capturable else None
        self.capturable, self.skip_zero = capturable, skip_zero
        self.param_groups = [{"lr": float(learning_rate), "params": self.parameters}]
        self.betas, self.eps = betas, eps
        self.steps: list = ([torch.zeros((), dtype=torch.float64, device=p.device) for p in self.parameters]
                            if capturable else [0] * len(self.parameters))
        device = self.parameters[0].device if self.parameters else None
        self.learning_rate = (torch.tensor(float(learning_rate), dtype=torch.float64, device=device)
                              if capturable else None)
        self.first = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.second = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]

    def set_learning_rate(self, learning_rate: float) -> None:
        """The learning rate of the next steps (a schedule sets it before each step)."""
        self.param_groups[0]["lr"] = float(learning_rate)
        if self.learning_rate is not None:
            self.learning_rate.fill_(float(learning_rate))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            if set_to_none:
                parameter.grad = None
            elif parameter.grad is not None:
                parameter.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        learning_rate = self.param_groups[0]["lr"]
        if self.kernels is not None:
            stepped = [i for i, p in enumerate(self.parameters) if p.grad is not None]
            for index in stepped:
                self.steps[index] += 1
            self.kernels.adam_step([self.parameters[i] for i in stepped],
                                   [self.parameters[i].grad.contiguous() for i in stepped],
                                   [self.first[i] for i in stepped], [self.second[i] for i in stepped],
                                   [self.steps[i] for i in stepped], learning_rate, beta1, beta2, self.eps,
                                   self.skip_zero)
            return
        for index, parameter in enumerate(self.parameters):
            gradient = parameter.grad
            if gradient is None:
                continue
            if self.capturable:         # counts and rate on the device: nothing read on the host
                step = self.steps[index].add_(1)
                bias1, bias2 = 1.0 - torch.pow(beta1, step), 1.0 - torch.pow(beta2, step)
                self._update(index, gradient, self.learning_rate / bias1, bias2.sqrt())
            else:
                self.steps[index] += 1
                step = self.steps[index]
                bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
                self._update(index, gradient, learning_rate / bias1, math.sqrt(bias2))

    def _update(self, index: int, gradient: torch.Tensor, step_size, root_bias2) -> None:
        """One entry-wise Adam update of parameter ``index``; ``step_size`` (learning rate over
        the first bias correction) and ``root_bias2`` are numbers or 0-d tensors."""
        beta1, beta2 = self.betas
        parameter, first, second = self.parameters[index], self.first[index], self.second[index]
        keep = (gradient == 0) if self.skip_zero else None
        if keep is not None:
            previous = (first.clone(), second.clone())
        first.lerp_(gradient, 1.0 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        update = first / (second.sqrt() / root_bias2).add_(self.eps) * step_size
        if keep is not None:
            update.masked_fill_(keep, 0.0)
            first.copy_(torch.where(keep, previous[0], first))
            second.copy_(torch.where(keep, previous[1], second))
        parameter.sub_(update)

    def state_dict(self) -> dict:
        steps = [t.clone() for t in self.steps] if self.capturable else list(self.steps)
        return {"lr": self.param_groups[0]["lr"], "steps": steps,
                "first": [t.clone() for t in self.first], "second": [t.clone() for t in self.second]}

    def load_state_dict(self, state: dict) -> None:
        self.set_learning_rate(state["lr"])
        if self.capturable:
            for mine, theirs in zip(self.steps, state["steps"], strict=True):
                mine.copy_(theirs)
        else:
            self.steps = list(state["steps"])
        for mine, theirs in zip(self.first + self.second, state["first"] + state["second"], strict=True):
            mine.copy_(theirs)


def make_adam(parameters: list[torch.Tensor], learning_rate: float, kernels=None, capturable: bool = False,
              skip_zero: bool = False) -> Adam:
    """The fits' Adam (see :class:`Adam`; ``kernels``: the compiled module, for native steps on
    the CPU, or None; ``capturable``: for a step captured in a CUDA graph; ``skip_zero``: leave
    entries with a zero gradient alone)."""
    return Adam(parameters, learning_rate, kernels=kernels, capturable=capturable, skip_zero=skip_zero)
