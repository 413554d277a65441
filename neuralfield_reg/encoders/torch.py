"""Pure-PyTorch hash-grid backend: the reference every compiled backend is tested against.

All levels and all ``2^d`` corners are evaluated in one batch of tensor operations (no Python
loop over points, levels or corners). Work is laid out corner-major, ``(corners, levels,
points)``, so that every elementwise operation runs over a long contiguous axis.

The per-corner weights are ordinary autograd operations. The table lookup
``out[f, m] = sum_c weights[c, m] * table[rows[c, m], f]`` (``m`` = level and point) belongs to a
family of three bilinear operations whose derivatives are each other. Each is a
``torch.autograd.Function`` whose backward calls the others, so derivatives of any order
(``create_graph=True``, double backward) are available without ever materialising
``(corners, levels, points, features)`` tensors:

    ============================  ==========================  ==========================
    operation                     d / d(first argument)       d / d(second argument)
    ============================  ==========================  ==========================
    interpolate(weights, table)   corner_dot(grad, table)     scatter(weights, grad)
    scatter(weights, grad)        corner_dot(grad, H)         interpolate(weights, H)
    corner_dot(grad, table)       interpolate(K, table)       scatter(K, grad)
    ============================  ==========================  ==========================

(``H`` and ``K`` are the incoming gradients of ``scatter`` and ``corner_dot``.)
"""

from __future__ import annotations

import torch

from .base import HASH_PRIMES, HashGridConfig, HashGridEncoding

_UINT32 = 0xFFFFFFFF


def _mul_uint32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """``(values * constant) mod 2^32`` for values in [0, 2^32) without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (values * low + (((values * high) & 0xFFFF) << 16)) & _UINT32


def _columns(table: torch.Tensor) -> torch.Tensor:
    """``(R, F)`` table -> ``(F, R)`` contiguous, so each feature is one 1D gather."""
    return table.t().contiguous()


class _Interpolate(torch.autograd.Function):
    """``out[f, m] = sum_c weights[c, m] * table[rows[c, m], f]`` -> ``(F, M)``."""

    @staticmethod
    def forward(ctx, weights, table, rows):
        ctx.save_for_backward(weights, table, rows)
        return torch.stack([(column.take(rows) * weights).sum(0) for column in _columns(table)])

    @staticmethod
    def backward(ctx, grad):
        weights, table, rows = ctx.saved_tensors
        grad_weights = corner_dot(grad, table, rows) if ctx.needs_input_grad[0] else None
        grad_table = scatter(weights, grad, rows, table.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_weights, grad_table, None


class _Scatter(torch.autograd.Function):
    """``out[r, f] = sum_{c, m: rows[c, m] = r} weights[c, m] * grad[f, m]`` -> ``(R, F)``."""

    @staticmethod
    def forward(ctx, weights, grad, rows, n_rows):
        ctx.save_for_backward(weights, grad, rows)
        flat_rows = rows.reshape(-1)
        columns = [torch.zeros(n_rows, dtype=grad.dtype, device=grad.device)
                   .index_add_(0, flat_rows, (weights * g).reshape(-1)) for g in grad]
        return torch.stack(columns, dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        weights, grad, rows = ctx.saved_tensors
        grad_weights = corner_dot(grad, grad_out, rows) if ctx.needs_input_grad[0] else None
        grad_grad = interpolate(weights, grad_out, rows) if ctx.needs_input_grad[1] else None
        return grad_weights, grad_grad, None, None


class _CornerDot(torch.autograd.Function):
    """``out[c, m] = sum_f grad[f, m] * table[rows[c, m], f]`` -> ``(C, M)``."""

    @staticmethod
    def forward(ctx, grad, table, rows):
        ctx.save_for_backward(grad, table, rows)
        columns = _columns(table)
        out = columns[0].take(rows) * grad[0]
        for f in range(1, columns.shape[0]):                 # loop over features (F <= 8)
            out = out + columns[f].take(rows) * grad[f]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, table, rows = ctx.saved_tensors
        grad_grad = interpolate(grad_out, table, rows) if ctx.needs_input_grad[0] else None
        grad_table = scatter(grad_out, grad, rows, table.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_grad, grad_table, None


def interpolate(weights: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return _Interpolate.apply(weights, table, rows)


def scatter(weights: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return _Scatter.apply(weights, grad, rows, n_rows)


def corner_dot(grad: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return _CornerDot.apply(grad, table, rows)


class TorchHashGridEncoding(HashGridEncoding):
    backend = "torch"

    def __init__(self, dim: int, config: HashGridConfig = HashGridConfig(), n_tables: int = 1):
        super().__init__(dim, config, n_tables)
        layout = self.layout
        # Levels grow finer, so the densely indexed ones come first: levels [0, n_dense) are
        # dense and [n_dense, L) hashed. Geometry lives in buffers so that it follows
        # .to(device); they are not persistent: the state_dict holds only `params`.
        self.n_dense = sum(not h for h in layout.hashed)
        strides = [[r ** k for r in layout.resolutions[:self.n_dense]] for k in range(dim)]
        self.register_buffer("scales", torch.tensor(layout.scales, dtype=torch.float32), persistent=False)
        self.register_buffer("dense_strides", torch.tensor(strides, dtype=torch.long).reshape(dim, -1),
                             persistent=False)
        self.register_buffer("table_sizes", torch.tensor(layout.table_sizes), persistent=False)
        self.register_buffer("offsets", torch.tensor(layout.offsets), persistent=False)

    def _rows(self, cell: torch.Tensor) -> torch.Tensor:
        """Table rows of the ``2^d`` corners of integer cells ``(d, L, N)`` -> ``(2^d, L, N)``.

        Corner ``c`` is offset by bit ``k`` of ``c`` along axis ``k``. Both indices separate
        over axes (dense: a sum, hash: an XOR of per-axis terms), so each axis contributes a
        pair of terms (vertex, vertex + 1), combined by broadcasting over the leading axis.
        """
        n = cell.shape[-1]
        pairs = torch.stack([cell, cell + 1], dim=1) & _UINT32            # (d, 2, L, N); uint32 wrap
        groups = []
        if self.n_dense:
            dense = pairs[:, :, :self.n_dense] * self.dense_strides[:, None, :, None]
            rows = dense[0]
            for k in range(1, self.dim):                                 # loop over axes, not corners
                rows = (dense[k][:, None] + rows[None]).reshape(-1, self.n_dense, n)
            groups.append(rows & _UINT32)
        if self.n_dense < pairs.shape[2]:
            hashed = pairs[:, :, self.n_dense:]
            rows = hashed[0]                                             # prime 1 on axis 0
            for k in range(1, self.dim):
                rows = (_mul_uint32(hashed[k], HASH_PRIMES[k])[:, None] ^ rows[None]).reshape(
                    -1, hashed.shape[2], n)
            groups.append(rows)
        rows = groups[0] if len(groups) == 1 else torch.cat(groups, dim=1)
        return rows % self.table_sizes[:, None] + self.offsets[:, None]

    def forward(self, points: torch.Tensor, table_index: int | torch.Tensor = 0) -> torch.Tensor:
        """Encode ``(N, dim)`` points -> ``(N, n_levels * n_features_per_level)``."""
        self.check_points(points, table_index)
        if points.shape[0] == 0:                      # no points: no features (and no kernel launch)
            return points.new_zeros(0, self.n_output_dims)
        n, levels = points.shape[0], self.config.n_levels
        position = points.t()[:, None, :] * self.scales.to(points.dtype)[:, None] + 0.5   # (d, L, N)
        cell = torch.floor(position.detach())
        t = position - cell                                              # d t / d x = scale
        if self.config.interpolation == "Smoothstep":
            t = t * t * (3.0 - 2.0 * t)
        rows = self._rows(cell.long())                                   # (C, L, N)
        if not isinstance(table_index, int) or table_index != 0:
            rows = rows + table_index * self.layout.total_rows           # the point's own table
        # Corner weight = prod_k (t_k if bit k of the corner is set else 1 - t_k), built by the
        # same broadcasting as the rows.
        factors = torch.stack([1.0 - t, t], dim=1)                       # (d, 2, L, N)
        weights = factors[0]
        for k in range(1, self.dim):
            weights = (factors[k][:, None] * weights[None]).reshape(-1, levels, n)
        table = self.params.to(points.dtype).reshape(-1, self.config.n_features_per_level)
        encoded = interpolate(weights.reshape(weights.shape[0], -1), table,
                              rows.reshape(rows.shape[0], -1))           # (F, L * N)
        return encoded.reshape(-1, levels, n).permute(2, 1, 0).reshape(n, -1)
