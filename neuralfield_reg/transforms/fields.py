"""Coordinate-network displacement fields and the forward/inverse pair of maps.

Convention: a map is a function of unit coordinates, ``(N, d) -> (N, d)``. ``phi_AB`` takes
points of the fixed image B's domain to the moving image A's domain, so that
``A o phi_AB ~ B``; ``phi_BA`` goes the other way. Each map is a global affine part (fixed
after the affine stage) plus a displacement field ``u(x) = output_scale * MLP(encoding(x))``:
``phi(x) = M x + b + u(x)``. The MLP's last layer starts at zero, so ``u = 0`` at the start.

Several fields are stored in one module with stacked parameters (one hash table and one MLP
each) and are evaluated together in one batch of operations: the two maps of a pair cost
about as much as one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..encoders import HashGridConfig, make_encoding
from ..encoders.fused import fields_displacement, fused_supported

Points = Sequence[torch.Tensor | None]


class DisplacementFields(nn.Module):
    """``n_fields`` independent fields ``u_t(x) = output_scale * MLP_t(encoding_t(clamp(x, 0, 1)))``.

    Points are clamped to the unit cube before encoding: outside the domain a field continues
    with its boundary value instead of reading wrapped (meaningless) table rows.
    """

    def __init__(self, dim: int, n_fields: int = 1, encoding: HashGridConfig = HashGridConfig(),
                 hidden_widths: Sequence[int] = (64, 64), output_scale: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.n_fields = n_fields
        self.hidden_widths = tuple(int(w) for w in hidden_widths)
        self.output_scale = float(output_scale)
        # With the native backend on the CPU, forward_batched runs the fused encoding + MLP kernel
        # when the points need no gradient; False keeps the per-operation autograd path.
        self.use_fused = True
        self.encoding = make_encoding(dim, encoding, backend, n_tables=n_fields)
        widths = [self.encoding.n_output_dims, *self.hidden_widths, dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = layer == len(widths) - 2
            bound = 0.0 if last else 1.0 / math.sqrt(fan_in)   # nn.Linear's default; last layer zero
            self.weights.append(nn.Parameter(torch.empty(n_fields, fan_in, fan_out).uniform_(-bound, bound)))
            # Biases start at zero. The hash features start near zero, so a unit's bias alone decided
            # whether it was active: with nn.Linear's random biases, units that were active for every
            # input took the same gradient and whole layers died together on some seeds (a constant
            # field; on a 3D brain pair Dice 0.785 for one seed in four, 0.874-0.877 with zeros).
            self.biases.append(nn.Parameter(torch.zeros(n_fields, fan_out)))

    @property
    def backend(self) -> str:
        return self.encoding.backend

    def _mlp(self, features: torch.Tensor, field: int | None) -> torch.Tensor:
        """``(n, F)`` features of one field, or ``(T, n, F)`` of all fields when ``field`` is None."""
        h = features
        last = len(self.weights) - 1
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if field is None:
                h = torch.baddbmm(bias[:, None, :], h, weight)
            else:
                h = torch.addmm(bias[field], h, weight[field])
            if layer < last:
                h = torch.relu(h)
        return h

    def forward(self, points: Points, level_weights: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Displacements of each field at its own points.

        Args:
            points: one entry per field, ``(N_t, d)`` unit coordinates or None to skip the field.
            level_weights: optional ``(n_levels,)`` weights in [0, 1] multiplying each level's
                features (coarse-to-fine activation of the hash-grid levels).
        Returns:
            One ``(N_t, d)`` displacement (unit coordinates) per field, None where skipped.
        """
        if len(points) != self.n_fields:
            raise ValueError(f"points: expected {self.n_fields} entries (one per field), got {len(points)}")
        used = [t for t, p in enumerate(points) if p is not None]
        if not used:
            return [None] * self.n_fields
        sizes = [points[t].shape[0] for t in used]
        if len(used) == 1:
            table_index = used[0]
            flat = points[used[0]]
        else:
            flat = torch.cat([points[t] for t in used])
            table_index = torch.repeat_interleave(torch.tensor(used, device=flat.device),
                                                  torch.tensor(sizes, device=flat.device))
        out: list[torch.Tensor | None] = [None] * self.n_fields
        if self.fused_for(flat):
            if isinstance(table_index, int):
                table_index = torch.full((flat.shape[0],), table_index, dtype=torch.long, device=flat.device)
            displacement = fields_displacement(self, flat, table_index, level_weights)
            for t, chunk in zip(used, displacement.split(sizes)):
                out[t] = chunk
            return out
        features = self.encoding(flat.clamp(0.0, 1.0), table_index)
        if level_weights is not None:
            per_feature = self.encoding.config.n_features_per_level
            features = features * level_weights.to(features.dtype).repeat_interleave(per_feature)
        if len(used) == self.n_fields and len(set(sizes)) == 1:
            batched = self._mlp(features.reshape(self.n_fields, sizes[0], -1), None)
            for t in range(self.n_fields):
                out[t] = self.output_scale * batched[t]
        else:
            for t, chunk in zip(used, features.split(sizes)):
                out[t] = self.output_scale * self._mlp(chunk, t)
        return out

    def fused_for(self, points: torch.Tensor) -> bool:
        """Whether the fused CPU kernels evaluate these points (native backend, CPU, points that
        need no gradient)."""
        return (self.use_fused and not (points.requires_grad and torch.is_grad_enabled())
                and fused_supported(self.encoding, points))

    def forward_batched(self, points: torch.Tensor, level_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Displacements ``(T, M, d)`` of all ``T = n_fields`` fields, field ``t`` at ``points[t]``.

        The same as :meth:`forward` with equal point counts, without a Python loop over fields:
        one encoding call (each point reads its field's table) and one batched MLP.
        """
        n_fields, count, dim = points.shape
        if n_fields != self.n_fields:
            raise ValueError(f"points: expected {self.n_fields} fields on the first axis, got {n_fields}")
        if count == 0:
            return points.new_zeros(points.shape)
        table_index = torch.arange(n_fields, device=points.device).repeat_interleave(count)
        if self.fused_for(points):
            return fields_displacement(self, points.reshape(-1, dim), table_index, level_weights).reshape(points.shape)
        features = self.encoding(points.reshape(-1, dim).clamp(0.0, 1.0), table_index)
        if level_weights is not None:
            per_feature = self.encoding.config.n_features_per_level
            features = features * level_weights.to(features.dtype).repeat_interleave(per_feature)
        return self.output_scale * self._mlp(features.reshape(n_fields, count, -1), None)


class MapPair(nn.Module):
    """The forward map ``phi_AB`` (fixed -> moving coordinates) and the inverse ``phi_BA``.

    ``phi(x) = matrix @ x + offset + u(x)`` per direction; index 0 is AB, 1 is BA. Call
    ``pair(points_AB, points_BA)`` to evaluate both maps in one batch, or use the
    ``phi_AB``/``phi_BA`` callables for one direction.
    """

    def __init__(self, dim: int, *, encoding: HashGridConfig = HashGridConfig(),
                 hidden_widths: Sequence[int] = (64, 64), output_scale: float = 0.1,
                 backend: str = "auto", affine_AB: tuple[torch.Tensor, torch.Tensor] | None = None,
                 affine_BA: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.dim = dim
        self.fields = DisplacementFields(dim, 2, encoding, hidden_widths, output_scale, backend)
        matrices, offsets = [], []
        for affine in (affine_AB, affine_BA):
            matrix, offset = affine if affine is not None else (torch.eye(dim), torch.zeros(dim))
            matrices.append(matrix.detach().to(torch.float32))
            offsets.append(offset.detach().to(torch.float32))
        self.register_buffer("matrices", torch.stack(matrices))
        self.register_buffer("offsets", torch.stack(offsets))

    @property
    def backend(self) -> str:
        return self.fields.backend

    def affine(self, points: torch.Tensor, direction: int) -> torch.Tensor:
        return points @ self.matrices[direction].to(points.dtype).T + self.offsets[direction].to(points.dtype)

    def forward(self, points_AB: torch.Tensor | None, points_BA: torch.Tensor | None,
                level_weights: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(phi_AB(points_AB), phi_BA(points_BA))``; either input may be None."""
        points = [points_AB, points_BA]
        displacements = self.fields(points, level_weights)
        return tuple(None if p is None else self.affine(p, t) + u
                     for t, (p, u) in enumerate(zip(points, displacements)))

    @property
    def phi_AB(self) -> "DirectionalMap":
        return DirectionalMap(self, 0)

    @property
    def phi_BA(self) -> "DirectionalMap":
        return DirectionalMap(self, 1)


class DirectionalMap:
    """One direction of a :class:`MapPair` as a callable ``(N, d) -> (N, d)``."""

    def __init__(self, pair: MapPair, direction: int):
        self.pair = pair
        self.direction = direction

    def __call__(self, points: torch.Tensor, level_weights: torch.Tensor | None = None) -> torch.Tensor:
        args = [None, None]
        args[self.direction] = points
        return self.pair(*args, level_weights=level_weights)[self.direction]


class MapPairs(nn.Module):
    """``B`` independent :class:`MapPair` s in batched tensors, for fitting many pairs at once.

    Field ``2 p + direction`` belongs to pair ``p`` (direction 0 is AB, 1 is BA), which is the
    order that concatenating the pairs' stacked parameters gives: :meth:`stack` builds it from
    ``B`` pairs (each initialised with its own seed), :meth:`unstack` gives them back.
    """

    def __init__(self, dim: int, n_pairs: int, *, encoding: HashGridConfig = HashGridConfig(),
                 hidden_widths: Sequence[int] = (64, 64), output_scale: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.n_pairs = n_pairs
        self.pair_options = {"encoding": encoding, "hidden_widths": tuple(hidden_widths),
                             "output_scale": output_scale, "backend": backend}
        self.fields = DisplacementFields(dim, 2 * n_pairs, encoding, hidden_widths, output_scale, backend)
        self.register_buffer("matrices", torch.eye(dim).repeat(2 * n_pairs, 1, 1))
        self.register_buffer("offsets", torch.zeros(2 * n_pairs, dim))

    @property
    def backend(self) -> str:
        return self.fields.backend

    @classmethod
    def stack(cls, pairs: Sequence[MapPair]) -> "MapPairs":
        first = pairs[0]
        fields = first.fields
        stacked = cls(first.dim, len(pairs), encoding=fields.encoding.config, hidden_widths=fields.hidden_widths,
                      output_scale=fields.output_scale, backend=first.backend)
        states = [pair.state_dict() for pair in pairs]
        stacked.load_state_dict({key: torch.cat([state[key] for state in states]) for key in states[0]})
        return stacked.to(first.matrices.device)

    def unstack(self) -> list[MapPair]:
        state = self.state_dict()
        pairs = []
        for p in range(self.n_pairs):
            pair = MapPair(self.dim, **self.pair_options).to(self.matrices.device)
            pair.load_state_dict({key: value[2 * p:2 * p + 2].clone() for key, value in state.items()})
            pairs.append(pair)
        return pairs

    def forward(self, points_AB: torch.Tensor, points_BA: torch.Tensor,
                level_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi_AB(points_AB), phi_BA(points_BA))`` of every pair: ``(B, M, d)`` each."""
        if points_AB.shape == points_BA.shape:
            points = torch.stack([points_AB, points_BA], dim=1).reshape(2 * self.n_pairs, *points_AB.shape[1:])
            displacement = self.fields.forward_batched(points, level_weights)
        else:
            per_field = [points[p] for p in range(self.n_pairs) for points in (points_AB, points_BA)]
            displacement = self.fields(per_field, level_weights)
            points = None
        out = []
        for direction, own in enumerate((points_AB, points_BA)):
            index = slice(direction, None, 2)
            u = displacement[index] if points is not None else torch.stack(displacement[index])
            affine = torch.baddbmm(self.offsets[index, None, :].to(own.dtype), own,
                                   self.matrices[index].transpose(1, 2).to(own.dtype))
            out.append(affine + u)
        return out[0], out[1]
