"""The multiresolution hash-grid encoding: configuration, parameter layout and interface.

Every backend implements the same function as tiny-cuda-nn's ``HashGrid`` encoding, with the
same parameter layout, so that one ``state_dict`` moves between backends:

* level ``l`` has scale ``s_l = base_resolution * per_level_scale**l - 1`` (float32 arithmetic)
  and ``R_l = ceil(s_l) + 1`` vertices per axis;
* a point ``x`` in ``[0, 1]^d`` sits at ``p = x * s_l + 0.5`` in level ``l``'s vertex units; its
  cell is ``floor(p)`` and its fraction ``t = p - floor(p)`` (or ``smoothstep(t)``);
* a level whose ``R_l^d`` vertices fit the table is indexed densely,
  ``sum_k v_k * R_l^k`` (array axis 0 fastest); otherwise by the spatial hash
  ``XOR_k v_k * pi_k`` with ``pi = (1, 2654435761, 805459861)`` in 32-bit unsigned arithmetic;
  either index is taken modulo the level's table size;
* the level's table holds ``min(next_multiple_of_8(R_l^d), 2**log2_hashmap_size)`` rows of
  ``n_features_per_level`` features; all levels' rows are stacked in one parameter ``params`` of
  shape ``(total_rows, n_features_per_level)``;
* the output is ``(N, n_levels * n_features_per_level)``, level-major.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)
INTERPOLATIONS = ("Linear", "Smoothstep")


# The allowed values of the numeric hash-grid settings: a test and what is expected, by name
# (FitConfig checks its own level settings against the same rules).
GRID_RULES = {
    "n_levels": (lambda v: 1 <= v <= 32, "an integer in [1, 32]"),
    "n_features_per_level": (lambda v: v in (1, 2, 4, 8), "1, 2, 4 or 8"),
    "log2_hashmap_size": (lambda v: 4 <= v <= 26, "an integer in [4, 26]"),
    "base_resolution": (lambda v: 2 <= v <= 4096, "an integer in [2, 4096]"),
    "per_level_scale": (lambda v: math.isfinite(v) and 1.0 <= v <= 8.0, "a number in [1, 8]"),
}


def check_grid_values(owner: str, values: dict) -> None:
    """Raise ``ValueError`` naming ``owner.setting`` for the first value that breaks :data:`GRID_RULES`."""
    for name, value in values.items():
        allowed, expected = GRID_RULES[name]
        if not allowed(value):
            raise ValueError(f"{owner}.{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class HashGridConfig:
    """Hash-grid settings, named as in tiny-cuda-nn's ``HashGrid`` encoding."""

    n_levels: int = 8
    n_features_per_level: int = 2
    log2_hashmap_size: int = 14
    base_resolution: int = 4
    per_level_scale: float = 1.64
    interpolation: str = "Linear"

    def __post_init__(self):
        from ..validation import check_fields
        check_fields(self, {"n_levels": "int", "n_features_per_level": "int", "log2_hashmap_size": "int",
                            "base_resolution": "int", "per_level_scale": "number", "interpolation": "str"})
        check_grid_values("HashGridConfig", {name: getattr(self, name) for name in GRID_RULES})
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"HashGridConfig.interpolation: expected one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")

    @classmethod
    def from_resolutions(cls, base_resolution: int, finest_resolution: int, n_levels: int,
                         **kwargs) -> "HashGridConfig":
        """A config whose levels grow geometrically from ``base`` to ``finest`` resolution."""
        scale = 1.0 if n_levels == 1 else (finest_resolution / base_resolution) ** (1.0 / (n_levels - 1))
        return cls(n_levels=n_levels, base_resolution=base_resolution, per_level_scale=scale, **kwargs)

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def to_tcnn(self) -> dict:
        """The equivalent tiny-cuda-nn encoding config."""
        return {"otype": "HashGrid", **asdict(self)}


@dataclass(frozen=True)
class GridLayout:
    """Per-level geometry of a hash grid in ``dim`` dimensions (see module docstring)."""

    scales: tuple[float, ...]
    resolutions: tuple[int, ...]
    table_sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    hashed: tuple[bool, ...]

    @property
    def total_rows(self) -> int:
        return self.offsets[-1] + self.table_sizes[-1]


def grid_layout(dim: int, config: HashGridConfig) -> GridLayout:
    """Compute each level's scale, resolution, table size, row offset and indexing mode."""
    if dim not in (2, 3):
        raise ValueError(f"dim: expected 2 or 3, got {dim!r}")
    # float32 arithmetic, as tiny-cuda-nn computes it, so that ceil() agrees at the boundaries.
    log2_scale = np.float32(np.log2(np.float32(config.per_level_scale)))
    max_rows = 1 << config.log2_hashmap_size
    scales, resolutions, sizes, offsets, hashed = [], [], [], [], []
    offset = 0
    for level in range(config.n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2_scale)) * np.float32(config.base_resolution) \
            - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        if resolution > (1 << 24):
            raise ValueError(f"HashGridConfig: level {level} has resolution {resolution}, more than "
                             f"2^24; lower per_level_scale, n_levels or base_resolution")
        dense_rows = resolution ** dim
        rows = min(-(-dense_rows // 8) * 8, max_rows)
        scales.append(float(scale))
        resolutions.append(resolution)
        sizes.append(rows)
        offsets.append(offset)
        hashed.append(dense_rows > rows)
        offset += rows
    return GridLayout(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(hashed))


class HashGridEncoding(nn.Module):
    """Interface of every backend: unit coordinates ``(N, dim)`` -> features ``(N, n_output_dims)``.

    An encoding holds ``n_tables`` independent grids of the same layout (one per field when
    several fields are fitted together); its only parameter is ``params``, shape
    ``(n_tables, total_rows, n_features_per_level)``, initialised uniformly in
    ``[-1e-4, 1e-4]`` as in Instant-NGP. ``forward(points, table_index)`` evaluates each point
    with the table named by ``table_index`` (an int for all points, or an ``(N,)`` tensor).
    First and second derivatives with respect to both the points and ``params`` must be
    available to ``torch.autograd`` (``create_graph=True``).
    """

    backend: str = "abstract"

    def __init__(self, dim: int, config: HashGridConfig = HashGridConfig(), n_tables: int = 1):
        super().__init__()
        if n_tables < 1:
            raise ValueError(f"n_tables: expected an integer >= 1, got {n_tables!r}")
        self.dim = dim
        self.config = config
        self.n_tables = n_tables
        self.layout = grid_layout(dim, config)
        self.params = nn.Parameter(torch.empty(n_tables, self.layout.total_rows, config.n_features_per_level)
                                   .uniform_(-1e-4, 1e-4))

    @property
    def n_output_dims(self) -> int:
        return self.config.n_output_dims

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_tables={self.n_tables}, backend={self.backend!r}, {self.config}"

    def check_points(self, points: torch.Tensor, table_index) -> None:
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points: expected shape (N, {self.dim}), got {tuple(points.shape)}")
        if isinstance(table_index, int) and not 0 <= table_index < self.n_tables:
            raise ValueError(f"table_index: expected 0 <= table_index < {self.n_tables}, got {table_index}")

    def forward(self, points: torch.Tensor, table_index: int | torch.Tensor = 0) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface
