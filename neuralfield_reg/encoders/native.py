"""Compiled hash-grid backend: the C++ (CPU) and CUDA kernels of ``cuda_ext/``.

Same function, same parameter layout and same ``state_dict`` as the torch backend (its reference;
the parity tests compare them). Each direction of the autograd graph is one kernel call:

    ==================  ============================================  =========================
    Function            forward computes                              backward computes
    ==================  ============================================  =========================
    _Encode             features = enc(x; table)                      _EncodeBackward
    _EncodeBackward     dL/dx, dL/dtable                              double_backward kernel:
                                                                      d/d grad_out, d/d table,
                                                                      d/d x
    ==================  ============================================  =========================

The double backward covers every second-order term (incoming gradients for both dL/dx and
dL/dtable). It is a Function of its own whose backward raises: third derivatives fail loudly
instead of being silently zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import HashGridConfig, HashGridEncoding


def _kernels():
    """The compiled module; raises ``NativeBuildError`` (a RuntimeError) with the reason."""
    from .._cuda_ext import load
    return load()


def native_unavailable_reason() -> str | None:
    """None when the compiled kernels load, else why not (building them on first call)."""
    try:
        _kernels()
    except RuntimeError as error:
        return str(error)
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded kernels include the CUDA ones."""
    return bool(getattr(_kernels(), "with_cuda", False))


@dataclass(frozen=True)
class _Setup:
    """Everything the kernels need besides tensors."""

    module: object
    geometry: torch.Tensor        # (L, 5) float64 on the CPU: scale, resolution, size, offset, hashed
    n_features: int
    smoothstep: bool
    rows_per_table: int
    default_table: int

    def args(self):
        return self.geometry, self.n_features, self.smoothstep, self.rows_per_table


def _present(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An incoming gradient, or an empty tensor standing for zero."""
    if tensor is None:
        return like.new_empty(0)           # made on the device: no host copy (CUDA graphs)
    return tensor.contiguous()


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, table, table_index, setup):
        ctx.save_for_backward(points, table, table_index)
        ctx.setup = setup
        return setup.module.forward(points, table, table_index, setup.default_table, *setup.args())

    @staticmethod
    def backward(ctx, grad_out):
        points, table, table_index = ctx.saved_tensors
        need_points, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_points, grad_table = _EncodeBackward.apply(grad_out.contiguous(), points, table, table_index,
                                                        ctx.setup, need_points, need_table)
        return (grad_points if need_points else None), (grad_table if need_table else None), None, None


class _EncodeBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, points, table, table_index, setup, need_points, need_table):
        ctx.save_for_backward(grad_out, points, table, table_index)
        ctx.setup = setup
        grad_points, grad_table = setup.module.backward(grad_out, points, table, table_index, setup.default_table,
                                                        *setup.args(), need_points, need_table)
        # Outputs that were not asked for come back as empty placeholders.
        return (grad_points if need_points else _present(None, points),
                grad_table if need_table else _present(None, table))

    @staticmethod
    def backward(ctx, gg_points, gg_table):
        grad_out, points, table, table_index = ctx.saved_tensors
        gg_points = None if gg_points is None or gg_points.numel() == 0 else gg_points
        gg_table = None if gg_table is None or gg_table.numel() == 0 else gg_table
        need = ctx.needs_input_grad[:3]
        d_grad_out, d_points, d_table = _EncodeDoubleBackward.apply(
            _present(gg_points, points), _present(gg_table, table), grad_out, points, table, table_index,
            ctx.setup, *need)
        return ((d_grad_out if need[0] else None), (d_points if need[1] else None),
                (d_table if need[2] else None), None, None, None, None)


class _EncodeDoubleBackward(torch.autograd.Function):
    """The double-backward kernel as a Function of its own, so that its outputs keep a graph
    node: differentiating them once more raises instead of silently giving zero."""

    @staticmethod
    def forward(ctx, gg_points, gg_table, grad_out, points, table, table_index, setup, need_grad_out,
                need_points, need_table):
        d_grad_out, d_points, d_table = setup.module.double_backward(
            gg_points, gg_table, grad_out, points, table, table_index, setup.default_table, *setup.args(),
            need_grad_out, need_points, need_table)
        return (d_grad_out if need_grad_out else _present(None, grad_out),
                d_points if need_points else _present(None, points),
                d_table if need_table else _present(None, table))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the native hash-grid backend provides derivatives up to second order; "
                           "third derivatives need backend='torch'")


class NativeHashGridEncoding(HashGridEncoding):
    backend = "native"

    def __init__(self, dim: int, config: HashGridConfig = HashGridConfig(), n_tables: int = 1):
        super().__init__(dim, config, n_tables)
        self._module = _kernels()
        layout = self.layout
        self._geometry = torch.tensor([[s, r, n, o, float(h)] for s, r, n, o, h in zip(
            layout.scales, layout.resolutions, layout.table_sizes, layout.offsets, layout.hashed)],
            dtype=torch.float64)

    def kernel_setup(self) -> tuple:
        """``(module, geometry)`` for the fused kernels that evaluate fields on this encoding
        (``neuralfield_reg.encoders.fused``): the compiled module, and the table geometry they take
        (per-level scales, resolutions, sizes, offsets and hashing; features per level;
        smoothstep interpolation; rows of one table)."""
        config = self.config
        return self._module, (self._geometry, config.n_features_per_level, config.interpolation == "Smoothstep",
                              self.layout.total_rows)

    def forward(self, points: torch.Tensor, table_index: int | torch.Tensor = 0) -> torch.Tensor:
        """Encode ``(N, dim)`` points -> ``(N, n_levels * n_features_per_level)``."""
        self.check_points(points, table_index)
        if points.shape[0] == 0:                      # no points: no features (and no kernel launch)
            return points.new_zeros(0, self.n_output_dims)
        if points.is_cuda and not has_cuda_kernels():
            raise RuntimeError("the native hash-grid kernels were built without CUDA; use backend='torch' on "
                               "this device or rebuild with a CUDA toolkit")
        table = self.params.to(points.dtype).reshape(-1, self.config.n_features_per_level)
        if isinstance(table_index, int):
            index, default = torch.empty(0, dtype=torch.long, device=points.device), table_index
        else:
            index, default = table_index.to(points.device, torch.long).contiguous(), 0
        setup = _Setup(self._module, self._geometry, self.config.n_features_per_level,
                       self.config.interpolation == "Smoothstep", self.layout.total_rows, default)
        return _Encode.apply(points.contiguous(), table, index, setup)
