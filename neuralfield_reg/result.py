"""RegistrationResult: what a fit returns, and everything a pipeline does with it.

Convention: ``phi_AB`` maps unit coordinates of the fixed image B's domain to the moving image
A's domain (``A o phi_AB ~ B``); warping samples the moving image at ``phi_AB(x)`` for every
voxel ``x`` of the fixed grid. ``phi_BA`` is the inverse map. Dense outputs are evaluated in
chunks of points, so memory stays bounded by the chunk size, not the image size.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from ._files import atomic_save, safe_load
from ._version import RESULT_FORMAT_VERSION, __version__
from .config import FitConfig
from .coords import identity_grid, sample
from .encoders import HashGridConfig, resolve_backend
from .fields import DirectionalMap, MapPair
from .fused import fields_jacobian
from .grid_maps import GridMapPair
from . import metrics
from .validation import as_tensor, check_choice, describe, to_output

CHUNK_POINTS = 1 << 16
_FORMAT = "neuralfield_reg.RegistrationResult"


class RegistrationResult:
    """A fitted pair of maps between a moving image A and a fixed image B.

    Attributes:
        phi_AB, phi_BA: callables ``(N, d) -> (N, d)`` on unit coordinates (torch modules).
        moving_shape, fixed_shape: the grids of A and B.
        moving_spacing, fixed_spacing: voxel sizes per axis (physical units).
        config: the :class:`FitConfig` used (with the encoding resolved); None for a result of
            the convolutional companion (``metadata["method"]`` says which method made it).
        backend: the hash-grid backend that ran ("torch" for a convolutional network).
        history: loss terms per iteration, ``{name: [float, ...]}``.
        elapsed_s: wall-clock seconds of the fit.
    """

    def __init__(self, maps: MapPair | GridMapPair, *, moving_shape, fixed_shape, moving_spacing, fixed_spacing,
                 config: FitConfig | None, backend: str, history: dict | None = None, elapsed_s: float = 0.0,
                 metadata: dict | None = None):
        self.maps = maps
        self.moving_shape = tuple(int(n) for n in moving_shape)
        self.fixed_shape = tuple(int(n) for n in fixed_shape)
        self.moving_spacing = tuple(float(s) for s in moving_spacing)
        self.fixed_spacing = tuple(float(s) for s in fixed_spacing)
        self.config = config
        self.backend = backend
        self.history = history if history is not None else {}
        self.elapsed_s = float(elapsed_s)
        self.metadata = dict(metadata or {})

    # -- maps ---------------------------------------------------------------------------------
    @property
    def phi_AB(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.maps.phi_AB

    @property
    def phi_BA(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.maps.phi_BA

    @property
    def dim(self) -> int:
        return len(self.fixed_shape)

    @property
    def device(self) -> torch.device:
        return next(self.maps.buffers()).device

    def _direction(self, direction: str):
        """(map, source shape, source spacing, target shape, target spacing) of a direction.

        "AB" evaluates phi_AB on the fixed grid (target) and lands in the moving image (source).
        """
        check_choice("direction", direction, ("AB", "BA"))
        if direction == "AB":
            return self.phi_AB, self.moving_shape, self.moving_spacing, self.fixed_shape, self.fixed_spacing
        return self.phi_BA, self.fixed_shape, self.fixed_spacing, self.moving_shape, self.moving_spacing

    def _map_grid(self, map_, shape) -> torch.Tensor:
        """Evaluate a map on every voxel of ``shape``, in chunks: ``(*shape, d)``."""
        grid = identity_grid(shape, device=self.device).reshape(-1, self.dim)
        with torch.no_grad():
            out = torch.cat([map_(chunk) for chunk in grid.split(CHUNK_POINTS)])
        return out.reshape(*shape, self.dim)

    # -- warping ------------------------------------------------------------------------------
    def warp(self, image, mode: str = "linear"):
        """Resample a moving-space image onto the fixed grid: ``image o phi_AB``.

        Args:
            image: numpy array or tensor with the moving image's shape.
            mode: ``"linear"`` for intensities, ``"nearest"`` for label maps (dtype kept).
        Returns:
            The warped image on the fixed grid, the same kind (numpy/torch) that came in.
        """
        return self._warp(image, mode, "AB")

    def warp_inverse(self, image, mode: str = "linear"):
        """Resample a fixed-space image onto the moving grid: ``image o phi_BA``."""
        return self._warp(image, mode, "BA")

    def _warp(self, image, mode: str, direction: str):
        check_choice("mode", mode, ("linear", "nearest"))
        map_, source_shape, _, target_shape, _ = self._direction(direction)
        tensor, was_numpy = as_tensor("image", image)
        which = "moving" if direction == "AB" else "fixed"
        if tuple(tensor.shape) != source_shape:
            raise ValueError(f"image: expected the {which} image's shape {source_shape}, got {describe(image)}")
        if tensor.is_complex():
            raise TypeError(f"image: expected a real-valued image, got dtype {tensor.dtype}")
        if mode == "linear" and not tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError("image: the image contains NaN or Inf values")
        source_device = tensor.device
        points = self._map_grid(map_, target_shape)
        warped = sample(tensor.to(self.device), points.to(tensor.dtype) if tensor.is_floating_point()
                        else points, mode=mode)
        return to_output(warped.to(source_device), was_numpy)

    # -- dense outputs ------------------------------------------------------------------------
    def displacement(self, direction: str = "AB") -> np.ndarray:
        """Dense displacement in voxels, ``(d, *target grid)``.

        For ``"AB"``: at fixed voxel ``i`` the vector ``phi_AB(x_i)`` in moving-voxel indices
        minus ``i``, i.e. where to read the moving image relative to the voxel being filled.
        """
        map_, source_shape, _, target_shape, _ = self._direction(direction)
        mapped = self._map_grid(map_, target_shape)
        source_voxels = mapped * torch.tensor([n - 1 for n in source_shape], device=self.device)
        target_voxels = identity_grid(target_shape, device=self.device) * \
            torch.tensor([n - 1 for n in target_shape], device=self.device)
        return (source_voxels - target_voxels).movedim(-1, 0).cpu().numpy()

    def jacobian_determinant(self, direction: str = "AB") -> np.ndarray:
        """Determinant of the map's physical Jacobian on the target grid, ``(*target grid)``.

        1 means volume preserved; ``<= 0`` means the map folds there. Computed with autograd, or
        with the native backend on the CPU by the fused ``fields_jacobian`` kernel (the same
        numbers, about 5x faster on large volumes).
        """
        map_, source_shape, source_spacing, target_shape, target_spacing = self._direction(direction)
        source_extent = torch.tensor([(n - 1) * s for n, s in zip(source_shape, source_spacing)],
                                     device=self.device)
        target_extent = torch.tensor([(n - 1) * s for n, s in zip(target_shape, target_spacing)],
                                     device=self.device)
        grid = identity_grid(target_shape, device=self.device).reshape(-1, self.dim)
        dets = []
        for chunk in grid.split(CHUNK_POINTS):
            if isinstance(map_, DirectionalMap) and map_.pair.fields.fused_for(chunk):
                pair, field = map_.pair, map_.direction          # field 0 is phi_AB, 1 phi_BA
                jacobian = pair.matrices[field] + fields_jacobian(pair.fields, chunk, field)
            else:
                x = chunk.clone().requires_grad_(True)
                with torch.enable_grad():
                    y = map_(x)
                    rows = [torch.autograd.grad(y[:, k].sum(), x, retain_graph=k < self.dim - 1)[0]
                            for k in range(self.dim)]
                jacobian = torch.stack(rows, dim=1)
            jacobian = jacobian * source_extent[:, None] / target_extent[None, :]
            dets.append(torch.linalg.det(jacobian.double()).float())
        return torch.cat(dets).reshape(target_shape).cpu().numpy()

    def inverse_consistency_error(self) -> float:
        """Mean inverse-consistency residual in voxels, both directions averaged.

        Over the moving grid: ``|phi_AB(phi_BA(x)) - x|`` in moving voxels, over the voxels ``x``
        where the composition is defined, i.e. ``phi_BA(x)`` lies inside the fixed image's
        domain (outside it ``phi_AB`` is only an extrapolation); likewise
        ``|phi_BA(phi_AB(y)) - y|`` over the fixed grid. NaN if no voxel qualifies.
        """
        errors = []
        for outer, inner, shape in ((self.phi_AB, self.phi_BA, self.moving_shape),
                                    (self.phi_BA, self.phi_AB, self.fixed_shape)):
            grid = identity_grid(shape, device=self.device).reshape(-1, self.dim)
            scale = torch.tensor([n - 1 for n in shape], device=self.device)
            total, count = 0.0, 0
            with torch.no_grad():
                for chunk in grid.split(CHUNK_POINTS):
                    middle = inner(chunk)
                    inside = ((middle >= 0) & (middle <= 1)).all(-1)
                    if bool(inside.any()):
                        residual = (outer(middle[inside]) - chunk[inside]) * scale
                        total += metrics.inverse_consistency_error(residual) * residual.shape[0]
                        count += residual.shape[0]
            errors.append(total / count if count else float("nan"))
        return float(np.mean(errors))

    def map_points(self, points, direction: str = "AB"):
        """Map ``(K, d)`` voxel coordinates of the target grid to voxel coordinates of the source.

        ``"AB"`` takes fixed-image voxels to moving-image voxels (use it for landmark TRE).
        """
        map_, source_shape, _, target_shape, _ = self._direction(direction)
        tensor, was_numpy = as_tensor("points", points)
        if tensor.ndim != 2 or tensor.shape[1] != self.dim:
            raise ValueError(f"points: expected shape (K, {self.dim}), got {describe(points)}")
        tensor = tensor.to(self.device, torch.float32)
        unit = tensor / torch.tensor([n - 1 for n in target_shape], device=self.device)
        with torch.no_grad():
            mapped = map_(unit) * torch.tensor([n - 1 for n in source_shape], device=self.device)
        return to_output(mapped, was_numpy)

    # -- files --------------------------------------------------------------------------------
    def to(self, device) -> "RegistrationResult":
        self.maps.to(device)
        return self

    def _state(self) -> dict:
        if isinstance(self.maps, GridMapPair):
            architecture = {"kind": "displacement_grids", "shapes_AB": self.maps.shapes("AB"),
                            "shapes_BA": self.maps.shapes("BA")}
        else:
            fields = self.maps.fields
            architecture = {"kind": "hash_fields", "encoding": asdict(fields.encoding.config),
                            "hidden_widths": list(fields.hidden_widths), "output_scale": fields.output_scale}
        return {
            "format": _FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "library_version": __version__,
            "dim": self.dim,
            "architecture": architecture,
            "maps": {k: v.detach().cpu() for k, v in self.maps.state_dict().items()},
            "moving_shape": list(self.moving_shape),
            "fixed_shape": list(self.fixed_shape),
            "moving_spacing": list(self.moving_spacing),
            "fixed_spacing": list(self.fixed_spacing),
            "config": None if self.config is None else self.config.to_dict(),
            "backend": self.backend,
            "history": {k: [float(v) for v in values] for k, values in self.history.items()},
            "elapsed_s": self.elapsed_s,
            "metadata": self.metadata,
        }

    def save(self, path) -> None:
        """Write the result to ``path`` atomically (a temporary file renamed into place), so an
        existing file is never left half-written."""
        atomic_save(self._state(), path)

    @classmethod
    def load(cls, path, *, backend: str = "auto", device=None) -> "RegistrationResult":
        """Read a saved result. Only tensors and plain values are read (``weights_only=True``).

        Args:
            backend: hash-grid backend to rebuild neural-field maps with (parameters are the same
                for all); unused for the grid maps of the convolutional companion.
        """
        state = safe_load(path, format_name=_FORMAT, what="neuralfield_reg result")
        if state.get("format_version") != RESULT_FORMAT_VERSION:
            raise ValueError(f"path: {str(path)!r} has result format {state.get('format_version')!r} "
                             f"(written by neuralfield_reg {state.get('library_version')}); this version "
                             f"({__version__}) reads format {RESULT_FORMAT_VERSION}")
        architecture = state["architecture"]
        if architecture.get("kind", "hash_fields") == "displacement_grids":
            maps = GridMapPair.empty(state["dim"], architecture["shapes_AB"], architecture["shapes_BA"])
            backend = state["backend"]
        else:
            backend = resolve_backend(backend, device)
            maps = MapPair(state["dim"], encoding=HashGridConfig(**architecture["encoding"]),
                           hidden_widths=tuple(architecture["hidden_widths"]),
                           output_scale=architecture["output_scale"], backend=backend)
            backend = maps.backend
        maps.load_state_dict(state["maps"])
        config = None if state["config"] is None else FitConfig.from_dict(state["config"])
        result = cls(maps, moving_shape=state["moving_shape"], fixed_shape=state["fixed_shape"],
                     moving_spacing=state["moving_spacing"], fixed_spacing=state["fixed_spacing"],
                     config=config, backend=backend,
                     history=state["history"], elapsed_s=state["elapsed_s"], metadata=state["metadata"])
        return result.to(device) if device is not None else result
