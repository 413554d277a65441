"""A training step run many times, captured once as a CUDA graph and replayed.

On a GPU a small optimisation step (a few hundred kernels launched from Python for a millisecond
of GPU work) is bound by the launches. :class:`CapturedStep` runs a zero-argument ``step()`` that
reads and writes only tensors that keep their addresses (parameters, optimiser state, buffers
refilled in place between calls): on CUDA the first ``WARMUP`` calls run eagerly on a side stream
(libraries initialise lazily), the next call captures the step in a :class:`torch.cuda.CUDAGraph`
and replays it, and every later call is one replay. Where the capture fails the step warns once and
runs eagerly from then on. On other devices every call runs eagerly.

The step must launch device work only: no reads of tensor values on the host (``.item()``, ``if
tensor:``), no tensors made from host data, no operations whose output size depends on values.
The optimiser inside must be capturable (:class:`neuralfield_reg._optim.Adam` with
``capturable=True``). Used by the field stage (``engine/static_step.py``) and the affine stage.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

# Eager calls before the capture (lazy initialisation of the libraries the step calls).
WARMUP = 3


class CapturedStep:
    """``runner()`` runs ``step()`` (see the module docstring) and returns its output.

    Args:
        step: the step; its output (a tensor or None) is what a replay updates in place.
        zero_grad: clears the gradients (set to None) before each eager call and the capture, so
            that the captured backward allocates them in the graph's memory.
        device: where the step runs; a graph is captured only on CUDA.
        capture: whether to capture at all.
        what: the step's name, for the warning when the capture fails.
    """

    def __init__(self, step: Callable[[], torch.Tensor | None], zero_grad: Callable[[], None],
                 device: torch.device, capture: bool, what: str = "step"):
        self.step, self.zero_grad, self.what = step, zero_grad, what
        self.device = torch.device(device)
        self.capture = capture and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.capture else None
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def _eager(self):
        self.zero_grad()
        if self.stream is None:
            return self.step()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            output = self.step()
        torch.cuda.current_stream().wait_stream(self.stream)
        return output

    def _capture(self) -> bool:
        """Capture the step and replay it once (the capture itself runs nothing); False (with a
        warning, and eager calls from then on) when the step cannot be captured."""
        graph = torch.cuda.CUDAGraph()
        self.zero_grad()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            # "thread_local": other threads of the process (file writers, a user's data loader) may
            # keep using CUDA while this thread captures; the captured work itself was checked
            # for host reads (tests/test_static_step.py).
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                output = self.step()
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager calls
            warnings.warn(f"{self.what}: could not be captured as a CUDA graph ({type(error).__name__}: {error}); "
                          "running it eagerly (FitConfig(cuda_graphs=False) skips the attempt)", RuntimeWarning,
                          stacklevel=4)
            self.capture = False
            torch.cuda.synchronize()
            return False
        self.graph, self.output = graph, output
        graph.replay()
        return True

    def __call__(self):
        self.calls += 1
        if self.stream is None:
            return self._eager()
        with torch.cuda.device(self.device):      # streams and replays on the step's GPU (cuda:1 too)
            if self.graph is not None:
                self.graph.replay()
                return self.output
            if self.capture and self.calls > WARMUP and self._capture():
                return self.output
            return self._eager()
