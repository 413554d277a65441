"""The optimiser shared by the fits (the fields and the affine stage).

A small Adam of our own rather than ``torch.optim.Adam``: the same update (Kingma & Ba, with
torch's defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay, bias correction; the tests compare
it with torch's), but building one does not import torch's compiler stack, which
``torch.optim.Optimizer`` does on first use (2-3 s of a command-line fit on 2 cores), and a step
over a handful of tensors is a few in-place operations each. Given the compiled kernels
(``kernels=``, CPU tensors), a step is one native call that reads and writes every element once
(``cuda_ext/optim_cpu.cpp``) instead of five passes per tensor: the same update up to rounding.
With ``capturable=True`` the step counts and the learning rate live in tensors on the parameters'
device, so that a step can be captured in a CUDA graph and replayed (``_graphs.py``).
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
    writes into the existing tensors, so a captured step stays valid after a rollback.
    """

    def __init__(self, parameters, learning_rate: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, kernels=None, capturable: bool = False):
        self.parameters = list(parameters)
        cpu = all(p.device.type == "cpu" and p.is_contiguous() for p in self.parameters)
        self.kernels = kernels if cpu and not capturable else None
        self.capturable = capturable
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
                                   [self.steps[i] for i in stepped], learning_rate, beta1, beta2, self.eps)
            return
        if self.capturable:
            self._step_on_device()
            return
        for index, parameter in enumerate(self.parameters):
            gradient = parameter.grad
            if gradient is None:
                continue
            self.steps[index] += 1
            step = self.steps[index]
            first, second = self.first[index], self.second[index]
            first.lerp_(gradient, 1.0 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
            bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
            denominator = (second.sqrt() / math.sqrt(bias2)).add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-learning_rate / bias1)

    def _step_on_device(self) -> None:
        """The update with the step count and the learning rate read on the device."""
        beta1, beta2 = self.betas
        for index, parameter in enumerate(self.parameters):
            gradient = parameter.grad
            if gradient is None:
                continue
            step = self.steps[index].add_(1)
            first, second = self.first[index], self.second[index]
            first.lerp_(gradient, 1.0 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
            bias1, bias2 = 1.0 - torch.pow(beta1, step), 1.0 - torch.pow(beta2, step)
            denominator = (second.sqrt() / bias2.sqrt()).add_(self.eps)
            parameter.sub_(first / denominator * (self.learning_rate / bias1))

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


def make_adam(parameters: list[torch.Tensor], learning_rate: float, kernels=None, capturable: bool = False) -> Adam:
    """The fits' Adam (see :class:`Adam`; ``kernels``: the compiled module, for native steps on
    the CPU, or None; ``capturable``: for a step captured in a CUDA graph)."""
    return Adam(parameters, learning_rate, kernels=kernels, capturable=capturable)
