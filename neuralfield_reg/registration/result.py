"""RegistrationResult: what a fit returns, and everything a pipeline does with it.

Convention: ``phi_AB`` maps unit coordinates of the fixed image B's domain to the moving image
A's domain (``A o phi_AB ~ B``); warping samples the moving image at ``phi_AB(x)`` for every
voxel ``x`` of the fixed grid. ``phi_BA`` is the inverse map. The result keeps both images'
grids, so the same maps are also given in world coordinates (RAS+ mm: :meth:`~RegistrationResult.world_AB`,
:attr:`~RegistrationResult.affine_AB`) and images on any grid are warped by world position.
Dense outputs are evaluated in chunks of points, so memory stays bounded by the chunk size, not
the image size.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io.files import atomic_save, safe_load
from .._version import RESULT_FORMAT_VERSION, __version__
from ..config import FitConfig
from ..geometry.coords import identity_grid, sample
from .._cuda_ext.loader import NativeBuildError
from ..encoders import BackendUnavailableError, HashGridConfig, resolve_backend
from ..transforms.fields import DirectionalMap, MapPair
from ..encoders.fused import fields_jacobian
from ..geometry import Grid, Image
from ..transforms.grid_maps import GridMapPair
from .. import metrics
from ..transforms import world as world_maps
from ..transforms.itk import write_affine_itk, write_displacement_itk
from ..validation import as_tensor, check_choice, describe, to_output

CHUNK_POINTS = 1 << 16
_FORMAT = "neuralfield_reg.RegistrationResult"


class RegistrationResult:
    """A fitted pair of maps between a moving image A and a fixed image B.

    Attributes:
        phi_AB, phi_BA: callables ``(N, d) -> (N, d)`` on unit coordinates (torch modules).
        moving_grid, fixed_grid: the images' :class:`~neuralfield_reg.geometry.Grid` s (shape and
            voxel-to-world matrix); ``moving_shape``, ``moving_spacing`` etc. read from them.
        config: the :class:`FitConfig` used (with the encoding resolved); None for a result of
            the convolutional companion (``metadata["method"]`` says which method made it).
        backend: the hash-grid backend that ran ("torch" for a convolutional network).
        history: loss terms per iteration, ``{name: [float, ...]}``.
        elapsed_s: wall-clock seconds of the fit.
    """

    def __init__(self, maps: MapPair | GridMapPair, *, config: FitConfig | None, backend: str,
                 moving_grid: Grid | None = None, fixed_grid: Grid | None = None, moving_shape=None,
                 fixed_shape=None, moving_spacing=None, fixed_spacing=None, history: dict | None = None,
                 elapsed_s: float = 0.0, metadata: dict | None = None):
        """Give each image's grid, or its shape and voxel sizes (identity geometry)."""
        self.maps = maps
        self.moving_grid = moving_grid if moving_grid is not None else \
            Grid.from_spacing(tuple(moving_shape), moving_spacing, name="moving_grid")
        self.fixed_grid = fixed_grid if fixed_grid is not None else \
            Grid.from_spacing(tuple(fixed_shape), fixed_spacing, name="fixed_grid")
        self.config = config
        self.backend = backend
        self.history = history if history is not None else {}
        self.elapsed_s = float(elapsed_s)
        self.metadata = dict(metadata or {})
        self._dense: dict = {}           # dense maps and det J on the images' grids, see _cached

    def _cached(self, key, compute):
        """``compute()``, kept for the next call with the same ``key`` while the maps' parameters
        and device are unchanged (their version counters tell an in-place change): a pipeline's
        outputs (warped image and labels, det J, both ITK fields, the inverse-consistency error)
        then evaluate each map on its grid once. Two entries per direction at most."""
        state = (self.device, tuple(p._version for p in self.maps.parameters()),
                 tuple(b._version for b in self.maps.buffers()))
        entry = self._dense.get(key)
        if entry is not None and entry[0] == state:
            return entry[1]
        value = compute()
        self._dense[key] = (state, value)
        return value

    @property
    def moving_shape(self) -> tuple[int, ...]:
        return self.moving_grid.shape

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        return self.fixed_grid.shape

    @property
    def moving_spacing(self) -> tuple[float, ...]:
        return self.moving_grid.spacing

    @property
    def fixed_spacing(self) -> tuple[float, ...]:
        return self.fixed_grid.spacing

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
        """(map, source grid, target grid) of a direction.

        "AB" evaluates phi_AB on the fixed grid (target) and lands in the moving image (source).
        """
        check_choice("direction", direction, ("AB", "BA"))
        if direction == "AB":
            return self.phi_AB, self.moving_grid, self.fixed_grid
        return self.phi_BA, self.fixed_grid, self.moving_grid

    def _map_grid(self, map_, shape, direction: str | None = None) -> torch.Tensor:
        """Evaluate a map on every voxel of ``shape``, in chunks: ``(*shape, d)`` (cached when
        ``direction`` names the map and ``shape`` is its target grid's; not to be modified in
        place)."""
        def compute():
            grid = identity_grid(shape, device=self.device).reshape(-1, self.dim)
            with torch.no_grad():
                out = torch.cat([map_(chunk) for chunk in grid.split(CHUNK_POINTS)])
            return out.reshape(*shape, self.dim)

        if direction is not None and tuple(shape) == self._direction(direction)[2].shape:
            return self._cached(("map", direction), compute)
        return compute()

    # -- world coordinates ----------------------------------------------------------------------
    def _unit_affine(self, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix, offset)`` of a direction's affine part on the unit cubes (identity for
        the displacement grids of the convolutional companion)."""
        index = 0 if direction == "AB" else 1
        if isinstance(self.maps, MapPair):
            return (self.maps.matrices[index].detach().cpu().double().numpy(),
                    self.maps.offsets[index].detach().cpu().double().numpy())
        return np.eye(self.dim), np.zeros(self.dim)

    @property
    def affine_AB(self) -> np.ndarray:
        """The affine part of ``phi_AB`` in world coordinates: ``(d+1, d+1)`` homogeneous, RAS mm,
        taking fixed-image points to moving-image points (the direction of an ITK transform)."""
        return world_maps.unit_to_world(*self._unit_affine("AB"), self.moving_grid, self.fixed_grid)

    @property
    def affine_BA(self) -> np.ndarray:
        """The affine part of ``phi_BA`` in world coordinates (moving points -> fixed points)."""
        return world_maps.unit_to_world(*self._unit_affine("BA"), self.fixed_grid, self.moving_grid)

    def world_AB(self, points):
        """``phi_AB`` in world coordinates: ``(K, d)`` fixed-image points (RAS mm) -> the moving-
        image points (RAS mm) they correspond to. Numpy in, numpy out."""
        return self._world_map("AB", points)

    def world_BA(self, points):
        """``phi_BA`` in world coordinates: moving-image points (RAS mm) -> fixed-image points."""
        return self._world_map("BA", points)

    def _world_map(self, direction: str, points):
        map_, source, target = self._direction(direction)
        tensor, was_numpy = as_tensor("points", points)
        if tensor.ndim != 2 or tensor.shape[1] != self.dim:
            raise ValueError(f"points: expected shape (K, {self.dim}) in world mm, got {describe(points)}")
        if tensor.is_complex() or (tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())):
            raise ValueError("points: expected finite real world coordinates")
        unit = target.world_to_unit(tensor.to(self.device, torch.float64)).float()
        with torch.no_grad():
            mapped = torch.cat([map_(chunk) for chunk in unit.split(CHUNK_POINTS)]) if len(unit) else unit
        return to_output(source.unit_to_world(mapped.double()), was_numpy)

    def world_displacement(self, direction: str = "AB") -> np.ndarray:
        """Dense world displacement on the target grid, ``(*target grid, d)`` in RAS mm: at
        target voxel ``i`` the world position the map sends it to minus its own, so that
        ``p_source = p_target + u`` (``"AB"``: on the fixed grid, into the moving image)."""
        map_, source, target = self._direction(direction)
        mapped = self._map_grid(map_, target.shape, direction)          # cached: read, never written
        displacement = source.unit_to_world(mapped.double())            # (*target shape, d) world mm
        # minus each voxel's own world position, b + sum_k A[:, k] i_k, one voxel axis at a time
        # (in place and by broadcasting: no (N, d) index array on a 1 mm grid)
        matrix = torch.as_tensor(target.world_matrix, dtype=torch.float64, device=displacement.device)
        displacement -= matrix[:self.dim, self.dim]
        for axis, size in enumerate(target.shape):
            index = torch.arange(size, dtype=torch.float64, device=displacement.device)
            shape = [1] * self.dim + [1]
            shape[axis] = size
            displacement -= index.reshape(shape) * matrix[:self.dim, axis]
        return displacement.cpu().numpy()

    # -- warping ------------------------------------------------------------------------------
    def warp(self, image, mode: str = "linear", *, reference=None, padding: str | None = None):
        """Resample a moving-space image onto the fixed grid (or ``reference``): ``image o phi_AB``.

        Args:
            image: a bare numpy array or tensor on the moving image's grid (its shape), or an
                :class:`~neuralfield_reg.geometry.Image` / file path / nibabel image on any grid,
                read by world coordinates (another resolution, field of view or orientation of
                the moving scan, e.g. its labels at 1 mm).
            mode: ``"linear"`` for intensities, ``"nearest"`` for label maps (dtype kept).
            reference: the output grid: None (the fixed grid), a Grid, an Image or a file path;
                a grid other than the fixed one is placed by world coordinates.
            padding: what the image is outside its grid: ``"border"`` (its nearest edge value)
                or ``"zeros"``; None: zeros for label maps (``"label"``, ``"nearest"``: no label
                outside the scan, as ANTs and ITK warp them), the edge value for ``"linear"``.
        Returns:
            The warped image on the output grid: an Image for an Image (or path) input, else
            the same kind (numpy/torch) that came in.
        """
        return self._warp(image, mode, "AB", reference, padding)

    def warp_inverse(self, image, mode: str = "linear", *, reference=None, padding: str | None = None):
        """Resample a fixed-space image onto the moving grid (or ``reference``): ``image o phi_BA``;
        arguments as :meth:`warp`."""
        return self._warp(image, mode, "BA", reference, padding)

    def _warp(self, image, mode: str, direction: str, reference, padding: str):
        check_choice("mode", mode, ("linear", "nearest", "label"))
        if padding is None:
            padding = "border" if mode == "linear" else "zeros"
        check_choice("padding", padding, ("border", "zeros"))
        map_, source, target = self._direction(direction)
        which = "moving" if direction == "AB" else "fixed"
        given = None
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            from ..io.images import as_image
            given, _ = as_image("image", image)
            image, image_grid = given.data, given.grid
            if image_grid.dim != self.dim:
                raise ValueError(f"image: expected a {self.dim}D image, got grid {image_grid}")
            if image_grid.same_as(source, tolerance=1e-6):
                image_grid = source
        tensor, was_numpy = as_tensor("image", image)
        if given is None:
            if tuple(tensor.shape) != source.shape:
                raise ValueError(f"image: expected the {which} image's shape {source.shape}, got {describe(image)} "
                                 "(images on other grids: pass an Image, which carries its geometry)")
            image_grid = source
        if tensor.is_complex():
            raise TypeError(f"image: expected a real-valued image, got dtype {tensor.dtype}")
        if mode == "linear" and not tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError("image: the image contains NaN or Inf values")
        output_grid = _reference_grid(reference, target, self.dim)
        source_device = tensor.device
        if output_grid is target and image_grid is source:
            points = self._map_grid(map_, target.shape, direction)
        else:
            points = self._map_world(map_, output_grid, target, source, image_grid)
        warped = sample(tensor.to(self.device), points.to(tensor.dtype) if tensor.is_floating_point()
                        else points, mode=mode, padding=padding)
        warped = warped.to(source_device)
        if given is not None:
            return Image(to_output(warped, isinstance(given.data, np.ndarray)), output_grid)
        return to_output(warped, was_numpy)

    def _map_world(self, map_, output: Grid, target: Grid, source: Grid, image_grid: Grid) -> torch.Tensor:
        """Unit coordinates of ``image_grid`` to sample at every voxel of ``output``: the voxel's
        world position seen by the map's domain (``target``), mapped, and the landing point seen
        by the image's own grid (``(*output.shape, d)``)."""
        before = target.world_to_unit_matrix() @ output.unit_to_world_matrix()
        after = image_grid.world_to_unit_matrix() @ source.unit_to_world_matrix()
        d = self.dim
        grid = identity_grid(output.shape, dtype=torch.float64, device=self.device).reshape(-1, d)
        chunks = []
        with torch.no_grad():
            for chunk in grid.split(CHUNK_POINTS):
                inside = (chunk @ torch.as_tensor(before[:d, :d].T, device=self.device)
                          + torch.as_tensor(before[:d, d], device=self.device))
                mapped = map_(inside.float()).double()
                chunks.append(mapped @ torch.as_tensor(after[:d, :d].T, device=self.device)
                              + torch.as_tensor(after[:d, d], device=self.device))
        return torch.cat(chunks).float().reshape(*output.shape, d)

    # -- dense outputs ------------------------------------------------------------------------
    def displacement(self, direction: str = "AB") -> np.ndarray:
        """Dense displacement in voxels, ``(d, *target grid)``.

        For ``"AB"``: at fixed voxel ``i`` the vector ``phi_AB(x_i)`` in moving-voxel indices
        minus ``i``, i.e. where to read the moving image relative to the voxel being filled.
        """
        map_, source, target = self._direction(direction)
        source_shape, target_shape = source.shape, target.shape
        mapped = self._map_grid(map_, target_shape, direction)
        source_voxels = mapped * torch.tensor([n - 1 for n in source_shape], device=self.device)
        target_voxels = identity_grid(target_shape, device=self.device) * \
            torch.tensor([n - 1 for n in target_shape], device=self.device)
        return (source_voxels - target_voxels).movedim(-1, 0).cpu().numpy()

    def jacobian_determinant(self, direction: str = "AB") -> np.ndarray:
        """Determinant of the map's Jacobian in world coordinates on the target grid, ``(*target grid)``.

        1 means volume preserved; ``<= 0`` means the map folds there. Images stored with
        different handedness (RAS against LAS) are related by a flip of the arrays, not a fold:
        the world Jacobian counts the directions of both grids. Computed with autograd, or with
        the native backend on the CPU by the fused ``fields_jacobian`` kernel (the same numbers,
        about 5x faster on large volumes).
        """
        return self._cached(("det", direction), lambda: self._jacobian_determinant(direction)).copy()

    def _jacobian_determinant(self, direction: str) -> np.ndarray:
        map_, source, target = self._direction(direction)
        source_extent = torch.tensor(source.extent, device=self.device)
        target_extent = torch.tensor(target.extent, device=self.device)
        # world Jacobian = D_source (E_source J E_target^-1) D_target^-1 (D: direction cosines)
        orientation = float(np.linalg.det(source.direction) / np.linalg.det(target.direction))
        grid = identity_grid(target.shape, device=self.device).reshape(-1, self.dim)
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
            determinant = torch.linalg.det(jacobian.double())
            dets.append((determinant if orientation == 1.0 else determinant * orientation).float())
        return torch.cat(dets).reshape(target.shape).cpu().numpy()

    def inverse_consistency_error(self, every: int = 1) -> float:
        """Mean inverse-consistency residual in voxels, both directions averaged.

        Over the moving grid: ``|phi_AB(phi_BA(x)) - x|`` in moving voxels, over the voxels ``x``
        where the composition is defined, i.e. ``phi_BA(x)`` lies inside the fixed image's
        domain (outside it ``phi_AB`` is only an extrapolation); likewise
        ``|phi_BA(phi_AB(y)) - y|`` over the fixed grid. NaN if no voxel qualifies.

        ``every``: over every n-th voxel along each axis only (``nfreg fit`` and ``cohort``
        summaries use 2: a sample of an eighth of the voxels, a fraction of the time).
        """
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every: expected an integer >= 1, got {every!r}")
        errors = []
        for outer, inner, shape, direction in ((self.phi_AB, self.phi_BA, self.moving_shape, "BA"),
                                               (self.phi_BA, self.phi_AB, self.fixed_shape, "AB")):
            grid = identity_grid(shape, device=self.device)
            inner_on_grid = self._map_grid(inner, shape, direction)
            if every > 1:
                every_nth = (slice(None, None, every),) * self.dim
                grid, inner_on_grid = grid[every_nth], inner_on_grid[every_nth]
            grid, inner_on_grid = grid.reshape(-1, self.dim), inner_on_grid.reshape(-1, self.dim)
            scale = torch.tensor([n - 1 for n in shape], device=self.device)
            total, count = 0.0, 0
            with torch.no_grad():
                for chunk, middle in zip(grid.split(CHUNK_POINTS), inner_on_grid.split(CHUNK_POINTS)):
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
        map_, source, target = self._direction(direction)
        source_shape, target_shape = source.shape, target.shape
        tensor, was_numpy = as_tensor("points", points)
        if tensor.ndim != 2 or tensor.shape[1] != self.dim:
            raise ValueError(f"points: expected shape (K, {self.dim}), got {describe(points)}")
        tensor = tensor.to(self.device, torch.float32)
        unit = tensor / torch.tensor([n - 1 for n in target_shape], device=self.device)
        with torch.no_grad():
            mapped = map_(unit) * torch.tensor([n - 1 for n in source_shape], device=self.device)
        return to_output(mapped, was_numpy)

    def save_itk(self, folder) -> dict[str, Path]:
        """Write the maps as files that ITK, ANTs, SimpleITK and Slicer read, into ``folder``
        (LPS mm, fixed -> moving points; :mod:`~neuralfield_reg.transforms.itk`):

        * ``displacement_itk.nii.gz``: the whole of ``phi_AB`` on the fixed grid (bring the moving
          image onto the fixed grid with it alone: ``antsApplyTransforms -r fixed -t ...``);
        * ``inverse_displacement_itk.nii.gz``: ``phi_BA`` on the moving grid (fixed onto moving);
        * ``affine.mat`` (as ANTs writes) and ``affine.txt`` (ITK text): the affine part of
          ``phi_AB`` alone.

        Returns the paths by name. The displacement fields need nibabel; they are gzip files
        without compression (float vectors barely compress).
        """
        folder = Path(folder)
        paths = {"displacement": folder / "displacement_itk.nii.gz",
                 "inverse_displacement": folder / "inverse_displacement_itk.nii.gz",
                 "affine_mat": folder / "affine.mat", "affine_txt": folder / "affine.txt"}
        write_displacement_itk(paths["displacement"], self.world_displacement("AB"), self.fixed_grid)
        write_displacement_itk(paths["inverse_displacement"], self.world_displacement("BA"), self.moving_grid)
        write_affine_itk(paths["affine_mat"], self.affine_AB)
        write_affine_itk(paths["affine_txt"], self.affine_AB)
        return paths

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
            "moving_grid": self.moving_grid.to_dict(),
            "fixed_grid": self.fixed_grid.to_dict(),
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
        try:
            return cls._from_state(state, path, backend, device)
        except (BackendUnavailableError, NativeBuildError):
            raise
        except (KeyError, TypeError, AttributeError, RuntimeError) as error:      # RuntimeError: load_state_dict
            raise ValueError(f"path: {str(path)!r} is not a complete neuralfield_reg result "
                             f"({type(error).__name__}: {error})") from error

    @classmethod
    def _from_state(cls, state: dict, path, backend: str, device) -> "RegistrationResult":
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
        for key, value in state["maps"].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"path: {str(path)!r} holds non-finite values in its maps ({key}); it cannot be used")
        maps.load_state_dict(state["maps"])
        config = None if state["config"] is None else FitConfig.from_dict(state["config"])
        grids = {}
        for kind in ("moving", "fixed"):
            if state.get(f"{kind}_grid") is not None:         # older files: shapes and spacings only
                grids[f"{kind}_grid"] = Grid.from_dict(state[f"{kind}_grid"], name=f"path {str(path)!r}")
            else:
                grids[f"{kind}_grid"] = Grid.from_spacing(state[f"{kind}_shape"], state[f"{kind}_spacing"],
                                                          name=f"path {str(path)!r}")
        result = cls(maps, **grids, config=config, backend=backend,
                     history=state["history"], elapsed_s=state["elapsed_s"], metadata=state["metadata"])
        return result.to(device) if device is not None else result


def _reference_grid(reference, target: Grid, dim: int) -> Grid:
    """The output grid of a warp: ``target`` itself for None, else the Grid of a Grid, an Image or
    a file path."""
    if reference is None:
        return target
    if isinstance(reference, Image):
        grid = reference.grid
    elif isinstance(reference, Grid):
        grid = reference
    else:
        from ..io.images import as_image
        grid = as_image("reference", reference)[0].grid
    if grid.dim != dim:
        raise ValueError(f"reference: expected a {dim}D grid, got {grid}")
    return target if grid.same_as(target, tolerance=1e-6) else grid
