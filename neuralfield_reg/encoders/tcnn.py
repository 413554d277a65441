"""tiny-cuda-nn hash-grid backend: ``tinycudann.Encoding`` (HashGrid, float32) behind our interface.

tiny-cuda-nn is optional and not on PyPI; this module imports it only when an encoding is built.
Its ``HashGrid`` is the function every backend implements (``base.py``): the same levels, cell
positions ``x * s_l + 0.5`` for inputs in ``[0, 1]`` (our coordinates, so no remapping), the same
dense/hashed indexing and the same row-major ``(rows, features)`` layout. Our ``params`` keeps
its shape ``(n_tables, total_rows, n_features_per_level)``: table ``t`` is handed to tcnn as its
flat parameter vector with :func:`torch.func.functional_call`, so one ``state_dict`` still moves
between backends and gradients land in ``params``.

Derivatives: tcnn's grid encoding provides dL/dx and dL/dparams, and the second-order terms of
dL/dx (with respect to the incoming gradient, the parameters and x) that the gradient-ICON
penalty needs. tcnn's fused MLPs have no second-order support, so the MLP stays in torch
(``fields.py``). tcnn computes on CUDA tensors in float32 only.
"""

from __future__ import annotations

import torch

from .base import HashGridConfig, HashGridEncoding


class TcnnHashGridEncoding(HashGridEncoding):
    backend = "tcnn"

    def __init__(self, dim: int, config: HashGridConfig = HashGridConfig(), n_tables: int = 1):
        super().__init__(dim, config, n_tables)
        import tinycudann

        module = tinycudann.Encoding(dim, config.to_tcnn(), dtype=torch.float32)
        expected = self.layout.total_rows * config.n_features_per_level
        if module.params.numel() != expected or module.n_output_dims != config.n_output_dims:
            raise RuntimeError(
                f"tinycudann's HashGrid for {config} has {module.params.numel()} parameters and "
                f"{module.n_output_dims} outputs; this library's layout has {expected} and {config.n_output_dims}. "
                "This tinycudann version lays out its tables differently; use backend='native' or 'torch'")
        # Kept out of the module tree: its own parameter is never trained (ours is passed in).
        self._tcnn = (module,)

    def _encode(self, points: torch.Tensor, table: int) -> torch.Tensor:
        flat = self.params[table].reshape(-1)
        return torch.func.functional_call(self._tcnn[0], {"params": flat}, (points,))

    def forward(self, points: torch.Tensor, table_index: int | torch.Tensor = 0) -> torch.Tensor:
        """Encode ``(N, dim)`` points in ``[0, 1]`` -> ``(N, n_levels * n_features_per_level)``."""
        self.check_points(points, table_index)
        if points.dtype != torch.float32:
            raise ValueError(f"points: backend='tcnn' computes in float32, got {points.dtype}")
        if points.shape[0] == 0:
            return points.new_zeros(0, self.n_output_dims)
        if isinstance(table_index, int):
            return self._encode(points, table_index).float()
        table_index = table_index.to(points.device, torch.long)
        if table_index.shape != (points.shape[0],):
            raise ValueError(f"table_index: expected an int or one index per point ({points.shape[0]},), "
                             f"got shape {tuple(table_index.shape)}")
        if bool((table_index < 0).any()) or bool((table_index >= self.n_tables).any()):
            raise ValueError(f"table_index: expected indices in [0, {self.n_tables})")
        out = points.new_zeros(points.shape[0], self.n_output_dims)
        for table in range(self.n_tables):       # each table is one tcnn call on its own points
            rows = torch.nonzero(table_index == table).reshape(-1)
            if rows.numel() > 0:
                out = out.index_copy(0, rows, self._encode(points.index_select(0, rows), table).float())
        return out


__all__ = ["TcnnHashGridEncoding"]
