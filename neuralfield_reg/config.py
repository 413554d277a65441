"""Settings of a fit, gathered in small frozen dataclasses with measured defaults.

``FitConfig`` gathers the settings of a fit in sections (schedule, objective, sampling, model,
affine, runtime); ``FitConfig.preset("2d")`` (= ``FitConfig()``), ``"2d-scan"`` and ``"3d"``
are what ``fit_pair`` uses when no config is given (``FitConfig.for_images``). Every setting can be changed by its name:
``dataclasses.replace(FitConfig(), iterations=1000)``. ``to_dict``/``from_dict`` turn a config
into plain Python values (for saving results) and back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Sequence

from .encoders.base import HashGridConfig, check_grid_values
from .losses.similarity import MI_BINS
from .validation import check_fields

SIMILARITY_NAMES = ("ssd", "ncc", "lncc", "mi")


def _require(condition: bool, name: str, expected: str, value) -> None:
    if not condition:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class AffineConfig:
    """Settings of the affine stage (see ``registration/affine.py``). Blur sigmas are in voxels of the grid
    they apply to: ``search_size`` for the search, ``working_size`` for the refinement (and the
    ``rigid_iterations`` rigid steps that refine a known start before it); a stage blurred by
    ``sigma`` voxels runs on a grid shrunk by the largest power of two <= ``min(sigma,
    max_shrink)`` (1: every stage at ``working_size``). The
    search ranks its candidates by 1 - NCC; ``refinement_cost`` (rigid and affine refinement) is
    ``"ncc"`` (1 - NCC), ``"ssd"`` (its measured trade-off is in docs/method.md) or ``"mi"``
    (minus the mutual information, 32 bins). The refinement compares the images inside their
    similarity masks (``fit_pair``'s masks, or the automatic foreground) when there are any."""

    iterations: int = 200
    learning_rate: float = 0.01
    working_size: int = 64
    blur_sigmas: tuple[float, ...] = (4.0, 2.0, 1.0)
    rotation_search: bool = True
    search_iterations: int = 40
    search_learning_rate: float = 0.05
    search_size: int = 32
    search_sigma: float = 2.0
    rotation_steps_2d: int = 36
    refinement_cost: str = "ncc"
    rigid_iterations: int = 100
    max_shrink: int = 4

    def __post_init__(self):
        check_fields(self, {"iterations": "int", "learning_rate": "number", "working_size": "int",
                            "blur_sigmas": "numbers", "rotation_search": "bool", "search_iterations": "int",
                            "search_learning_rate": "number", "search_size": "int", "search_sigma": "number",
                            "rotation_steps_2d": "int", "refinement_cost": "str", "rigid_iterations": "int",
                            "max_shrink": "int"})
        _require(self.iterations >= 0, "AffineConfig.iterations", "an integer >= 0", self.iterations)
        _require(self.learning_rate > 0, "AffineConfig.learning_rate", "a positive number", self.learning_rate)
        _require(self.working_size >= 4, "AffineConfig.working_size", "at least 4 voxels", self.working_size)
        _require(self.search_size >= 4, "AffineConfig.search_size", "at least 4 voxels", self.search_size)
        _require(len(self.blur_sigmas) > 0 and all(s >= 0 for s in self.blur_sigmas),
                 "AffineConfig.blur_sigmas", "one or more sigmas >= 0", self.blur_sigmas)
        _require(self.search_iterations >= 0, "AffineConfig.search_iterations", "an integer >= 0",
                 self.search_iterations)
        _require(self.search_learning_rate > 0, "AffineConfig.search_learning_rate", "a positive number",
                 self.search_learning_rate)
        _require(self.rotation_steps_2d >= 1, "AffineConfig.rotation_steps_2d", "an integer >= 1",
                 self.rotation_steps_2d)
        _require(self.refinement_cost in ("ssd", "ncc", "mi"), "AffineConfig.refinement_cost",
                 "'ssd', 'ncc' or 'mi'", self.refinement_cost)
        _require(self.rigid_iterations >= 0, "AffineConfig.rigid_iterations", "an integer >= 0",
                 self.rigid_iterations)
        _require(self.max_shrink >= 1, "AffineConfig.max_shrink", "an integer >= 1", self.max_shrink)


_NOT_GIVEN = object()


@dataclass(frozen=True)
class ScheduleConfig:
    """What changes over the field stage (see :class:`FitConfig` for each field)."""

    iterations: int = 500
    learning_rate: float = 1e-2
    learning_rate_decay: float = 0.01
    blur_sigmas: tuple[float, ...] = (6.0, 3.0, 1.5, 0.0)
    blur_in_mm: bool = False
    level_ramp: float = 0.5
    start_levels: int = 2
    average_last: float = 0.0
    sparse_adam: bool = True

    def __post_init__(self):
        check_fields(self, {"iterations": "int", "learning_rate": "number", "learning_rate_decay": "number",
                            "blur_sigmas": "numbers", "blur_in_mm": "bool", "level_ramp": "number",
                            "start_levels": "int", "average_last": "number", "sparse_adam": "bool"},
                     owner_name="FitConfig")
        _require(self.iterations >= 1, "FitConfig.iterations", "an integer >= 1", self.iterations)
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "FitConfig.learning_rate",
                 "a positive number", self.learning_rate)
        _require(0 < self.learning_rate_decay <= 1, "FitConfig.learning_rate_decay", "a fraction in (0, 1]",
                 self.learning_rate_decay)
        _require(len(self.blur_sigmas) > 0 and all(s >= 0 for s in self.blur_sigmas),
                 "FitConfig.blur_sigmas", "one or more sigmas >= 0", self.blur_sigmas)
        _require(0 <= self.level_ramp <= 1, "FitConfig.level_ramp", "a fraction in [0, 1]", self.level_ramp)
        _require(self.start_levels >= 1, "FitConfig.start_levels", "an integer >= 1", self.start_levels)
        _require(0 <= self.average_last < 1, "FitConfig.average_last", "a fraction in [0, 1)", self.average_last)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loss compares and how much each term weighs (see :class:`FitConfig`)."""

    similarity: str = "ssd"
    lncc_window: int = 9
    mi_bins: int = MI_BINS
    gradient_icon_weight: float = 0.5
    icon_weight: float = 0.0
    diffusion_weight: float = 0.0
    clip_percentiles: tuple[float, float] | None = None

    def __post_init__(self):
        check_fields(self, {"similarity": "str", "lncc_window": "int", "mi_bins": "int",
                            "gradient_icon_weight": "number", "icon_weight": "number", "diffusion_weight": "number",
                            "clip_percentiles": "numbers?"},
                     owner_name="FitConfig")
        _require(self.similarity in SIMILARITY_NAMES, "FitConfig.similarity",
                 f"one of {SIMILARITY_NAMES}", self.similarity)
        _require(self.lncc_window >= 1 and self.lncc_window % 2 == 1, "FitConfig.lncc_window",
                 "an odd integer >= 1", self.lncc_window)
        _require(self.mi_bins >= 4, "FitConfig.mi_bins", "an integer >= 4", self.mi_bins)
        for name in ("gradient_icon_weight", "icon_weight", "diffusion_weight"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"FitConfig.{name}", "a number >= 0", value)
        _require(self.clip_percentiles is None or (len(self.clip_percentiles) == 2
                                                   and 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100),
                 "FitConfig.clip_percentiles", "None or (low, high) with 0 <= low < high <= 100",
                 self.clip_percentiles)


@dataclass(frozen=True)
class SamplingConfig:
    """Where each step evaluates the loss (see :class:`FitConfig`)."""

    similarity_points: int | None = 2048
    similarity_fraction: float = 0.0
    gradient_icon_points: int = 512
    lncc_patches: int | None = None
    lncc_patch_size: int = 16
    foreground: str | None = None
    moving_at_fixed_resolution: bool = True

    def __post_init__(self):
        check_fields(self, {"similarity_points": "int?", "similarity_fraction": "number",
                            "gradient_icon_points": "int", "lncc_patches": "int?",
                            "lncc_patch_size": "int", "foreground": "str?", "moving_at_fixed_resolution": "bool"},
                     owner_name="FitConfig")
        _require(self.similarity_points is None or self.similarity_points >= 1,
                 "FitConfig.similarity_points", "None or an integer >= 1", self.similarity_points)
        _require(0 <= self.similarity_fraction <= 1, "FitConfig.similarity_fraction", "a fraction in [0, 1]",
                 self.similarity_fraction)
        _require(self.gradient_icon_points >= 1, "FitConfig.gradient_icon_points", "an integer >= 1",
                 self.gradient_icon_points)
        _require(self.lncc_patches is None or self.lncc_patches >= 1, "FitConfig.lncc_patches",
                 "None or an integer >= 1", self.lncc_patches)
        _require(self.lncc_patch_size >= 2, "FitConfig.lncc_patch_size", "an integer >= 2", self.lncc_patch_size)
        _require(self.foreground in (None, "auto"), "FitConfig.foreground", "None or 'auto'", self.foreground)


@dataclass(frozen=True)
class ModelConfig:
    """The two neural fields (see :class:`FitConfig`)."""

    encoding: HashGridConfig | None = None
    finest_cell_voxels: float | None = None
    n_levels: int = 8
    base_resolution: int = 4
    n_features_per_level: int = 2
    hidden_widths: tuple[int, ...] = (16,)
    output_scale: float = 0.1

    def __post_init__(self):
        check_fields(self, {"finest_cell_voxels": "number?", "n_levels": "int", "base_resolution": "int",
                            "n_features_per_level": "int", "hidden_widths": "ints", "output_scale": "number"},
                     owner_name="FitConfig")
        if self.encoding is not None and not isinstance(self.encoding, HashGridConfig):
            raise TypeError(f"FitConfig.encoding: expected a HashGridConfig or None, got {self.encoding!r}")
        _require(self.finest_cell_voxels is None or (math.isfinite(self.finest_cell_voxels)
                                                     and self.finest_cell_voxels > 0),
                 "FitConfig.finest_cell_voxels", "None or a positive number of voxels", self.finest_cell_voxels)
        check_grid_values("FitConfig", {"n_levels": self.n_levels, "base_resolution": self.base_resolution,
                                        "n_features_per_level": self.n_features_per_level})
        _require(len(self.hidden_widths) > 0 and all(w >= 1 for w in self.hidden_widths),
                 "FitConfig.hidden_widths", "one or more positive widths", self.hidden_widths)
        _require(math.isfinite(self.output_scale) and self.output_scale > 0, "FitConfig.output_scale",
                 "a positive number", self.output_scale)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the fit runs and what it does when it diverges (see :class:`FitConfig`)."""

    backend: str = "auto"
    fused_kernels: bool = True
    cuda_graphs: bool = True
    on_divergence: str = "raise"
    rollback_factor: float = 0.1
    max_rollbacks: int = 3

    def __post_init__(self):
        check_fields(self, {"backend": "str", "fused_kernels": "bool", "cuda_graphs": "bool", "on_divergence": "str",
                            "rollback_factor": "number", "max_rollbacks": "int"}, owner_name="FitConfig")
        _require(self.backend in ("auto", "torch", "native", "tcnn"), "FitConfig.backend",
                 "'auto', 'torch', 'native' or 'tcnn'", self.backend)
        _require(self.on_divergence in ("raise", "rollback"), "FitConfig.on_divergence",
                 "'raise' or 'rollback'", self.on_divergence)
        _require(0 < self.rollback_factor < 1, "FitConfig.rollback_factor", "a fraction in (0, 1)",
                 self.rollback_factor)
        _require(self.max_rollbacks >= 0, "FitConfig.max_rollbacks", "an integer >= 0", self.max_rollbacks)


SECTIONS = {"schedule": ScheduleConfig, "objective": ObjectiveConfig, "sampling": SamplingConfig,
            "model": ModelConfig, "runtime": RuntimeConfig}
# Each setting's section, by its (flat) name: FitConfig(iterations=...) and config.iterations.
SECTION_OF = {f.name: section for section, kind in SECTIONS.items() for f in fields(kind)}


@dataclass(frozen=True, init=False)
class FitConfig:
    """Settings of :func:`neuralfield_reg.fit_pair`, in sections: ``schedule``
    (:class:`ScheduleConfig`), ``objective`` (:class:`ObjectiveConfig`), ``sampling``
    (:class:`SamplingConfig`), ``model`` (:class:`ModelConfig`), ``affine``
    (:class:`AffineConfig` or None) and ``runtime`` (:class:`RuntimeConfig`).

    Every setting is also given and read by its own name: ``FitConfig(iterations=1000)``,
    ``config.iterations``, ``dataclasses.replace(config, iterations=1000)``; sections can be
    given whole (``FitConfig(schedule=ScheduleConfig(...))``).

    Schedule:
        iterations: Adam steps of the field stage.
        learning_rate: Adam learning rate for the hash tables and the MLPs.
        learning_rate_decay: the learning rate follows a cosine from ``learning_rate`` down to
            ``learning_rate * learning_rate_decay`` at the last iteration (1 keeps it constant).
        blur_sigmas: coarse-to-fine schedule: Gaussian blur of both images, one stage each,
            stages of equal length; in voxels, or in mm with ``blur_in_mm``.
        blur_in_mm: ``blur_sigmas`` are in mm (each image blurred by ``sigma / spacing`` voxels
            per axis), so a scan at 1 mm and at 2 mm gets the same physical schedule.
        level_ramp: fraction of the iterations over which the hash-grid levels are switched on,
            coarse to fine, starting from ``start_levels`` levels.
        average_last: the fields returned are the average of the parameters after each of the
            last ``average_last`` share of the iterations (stochastic weight averaging, Izmailov
            et al. 2018), which evens out the noise of the random points; 0 returns the last
            iterate. After a rollback the average restarts from the iteration rolled back to.
        sparse_adam: the field stage's Adam leaves an entry whose gradient is exactly 0 at a step
            alone (no update, its moments do not decay), as Instant-NGP does for hash tables: the
            table rows that none of a step's points touches (about three quarters in 3D) keep
            their values, and the step costs less. Same accuracy in our measurements; False gives
            the dense update of ``torch.optim.Adam``.
    Objective:
        similarity: ``"ssd"``, ``"ncc"`` (global), ``"lncc"`` (local, ``lncc_window`` voxels) or
            ``"mi"`` (``-`` mutual information in nats, ``mi_bins`` intensity bins; ``losses.mi``).
        gradient_icon_weight: lambda of the autograd gradient-ICON penalty.
        icon_weight: weight of an optional plain ICON term (mean squared residual).
        diffusion_weight: weight of a diffusion term on both maps (mean squared Frobenius norm of
            the displacement's Jacobian beyond the affine part, physical units, at the penalty's
            points; ``losses.diffusion``); 0 leaves it out.
        clip_percentiles: ``(low, high)`` percentiles to clip each image's intensities to before
            rescaling to [0, 1] (e.g. ``(1.0, 99.0)`` for scans); None rescales min..max.
    Sampling:
        similarity_points: random fixed/moving voxels per iteration for ``ssd``/``ncc``/``mi``;
            None uses every voxel.
        similarity_fraction: at least this share of the voxels the similarity compares (the
            foreground's, or the whole image's) per iteration, where that is more than
            ``similarity_points``: the same density of points at any resolution (the larger of the
            two images and of the pairs sets the count). 0 leaves ``similarity_points`` alone.
        gradient_icon_points: random points per iteration for the penalty.
        lncc_patches: None: ``lncc`` compares whole images every iteration; an integer: that many
            random cubic patches of ``lncc_patch_size`` voxels per axis (per image and pair), so an
            iteration costs the same for any volume size.
        foreground: ``"auto"``: where the caller gives no masks, the similarity counts (and draws
            its points) only inside each image's foreground (``registration.fit.foreground_mask``:
            above 0.05 of the range, or above twice the level of a noisy background);
            None uses the whole images.
        moving_at_fixed_resolution: the fit works at the fixed image's resolution: along each
            axis where the moving image's voxels are 1.5 times finer than the fixed image's finest
            spacing or more (a 1 mm scan against a 2 mm template), the moving image (and its mask)
            is smoothed and resampled to that spacing over its own field of view before the fit
            (``geometry.resample.coarser_grid``). The maps and every output stay on the original
            grids; the moving image's finer detail is more than the fixed grid can use, and sampling
            it costs time. False fits on the moving image as given.
    Model:
        encoding: hash-grid settings; None picks them from the image size: ``n_levels`` levels of
            ``n_features_per_level`` features from ``base_resolution`` cells per axis up to the
            image resolution, or to cells of ``finest_cell_voxels`` voxels of the fixed image (see
            :func:`default_encoding`). A given ``encoding`` overrides these four.
        hidden_widths, output_scale: the MLP and the scale of its output (unit coordinates).
    Affine:
        affine: settings of the global affine stage, or None to start from the identity.
    Runtime:
        backend: hash-grid backend, ``"auto" | "torch" | "native" | "tcnn"``.
        fused_kernels: with the native backend on the CPU, run the fields, the SSD or NCC
            similarity and the gradient-ICON penalty in the fused kernels (``encoders/fused.py``; the
            penalty's is not used with ``icon_weight > 0``) and the affine stage's cost in the
            compiled ``affine_ncc`` kernel; False uses the per-operation autograd path (same
            function, slower; for comparison).
        cuda_graphs: on a CUDA device, capture the fit's steps as CUDA graphs and replay them
            (``_graphs.py``): the field stage's step (objective, gradients, Adam; native or torch
            backend, ``engine/static_step.py``) and the affine stage's search and refinement
            steps, one launch per step instead of hundreds; where a capture fails the fit warns
            and steps eagerly. False always steps eagerly.
        on_divergence: what a diverging fit does: ``"raise"`` stops with
            :class:`~neuralfield_reg.FitDivergedError`; ``"rollback"`` returns to the last good
            state (kept every few iterations), multiplies the learning rate by
            ``rollback_factor`` and goes on, at most ``max_rollbacks`` times, then raises.
    """

    schedule: ScheduleConfig
    objective: ObjectiveConfig
    sampling: SamplingConfig
    model: ModelConfig
    affine: AffineConfig | None
    runtime: RuntimeConfig

    def __init__(self, schedule: ScheduleConfig | None = None, objective: ObjectiveConfig | None = None,
                 sampling: SamplingConfig | None = None, model: ModelConfig | None = None, affine=_NOT_GIVEN,
                 runtime: RuntimeConfig | None = None, **settings):
        unknown = sorted(set(settings) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"FitConfig: unknown settings {unknown}; expected sections {sorted(SECTIONS)}, "
                            f"'affine', or settings such as {sorted(SECTION_OF)[:4]}")
        given = {"schedule": schedule, "objective": objective, "sampling": sampling, "model": model,
                 "runtime": runtime}
        for name, kind in SECTIONS.items():
            section = given[name]
            if section is None:
                section = kind()
            elif not isinstance(section, kind):
                raise TypeError(f"FitConfig.{name}: expected a {kind.__name__}, got {section!r}")
            overrides = {key: value for key, value in settings.items() if SECTION_OF[key] == name}
            object.__setattr__(self, name, replace(section, **overrides) if overrides else section)
        affine = AffineConfig() if affine is _NOT_GIVEN else affine
        if affine is not None and not isinstance(affine, AffineConfig):
            raise TypeError(f"FitConfig.affine: expected a AffineConfig or None, got {affine!r}")
        object.__setattr__(self, "affine", affine)

    def __getattr__(self, name: str):
        """A setting by its own name (``config.iterations`` is ``config.schedule.iterations``)."""
        section = SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"FitConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    def resolved(self, shape: Sequence[int]) -> "FitConfig":
        """This config with ``encoding`` filled in for a fixed image of ``shape``."""
        if self.encoding is not None:
            return self
        return replace(self, encoding=default_encoding(shape, self.finest_cell_voxels, n_levels=self.n_levels,
                                                       base_resolution=self.base_resolution,
                                                       n_features_per_level=self.n_features_per_level))

    def blur_voxels(self, sigma: float, spacing: Sequence[float]) -> tuple[float, ...]:
        """One stage's blur in voxels per axis of an image with ``spacing`` (mm)."""
        return tuple(sigma / s if self.blur_in_mm else sigma for s in spacing)

    @classmethod
    def preset(cls, name: str) -> "FitConfig":
        """Named settings (printed in the README): ``"2d"`` is ``FitConfig()``, measured on 2D
        shape pairs; ``"3d"`` is measured on real 3D brain pairs (several pairs and preparations,
        ``benchmarks/real_peers.py``); ``"2d-scan"`` on 2D slices of real brain scans
        (``benchmarks/slices_2d.py``). ``fit_pair`` without a config picks one by
        :meth:`for_images`."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name]

    @classmethod
    def for_images(cls, dim: int, scans: bool = False) -> "FitConfig":
        """The preset for ``dim``-dimensional images: ``"3d"`` for volumes; in 2D ``"2d-scan"``
        for ``scans`` (images with a header: NIfTI files, ``Image``s), ``"2d"`` for bare arrays."""
        if dim == 3:
            return cls.preset("3d")
        return cls.preset("2d-scan" if scans else "2d")

    def to_dict(self) -> dict:
        """Plain values by section (JSON-ready once tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, base: "FitConfig | None" = None) -> "FitConfig":
        """A config from plain values: sections (as :meth:`to_dict` writes), settings by their own
        names (as results and ``--config`` files written before the sections hold), or both;
        what is not given keeps ``base``'s value (default ``FitConfig()``)."""
        if not isinstance(values, dict):
            raise ValueError(f"config: expected an object of FitConfig fields, got {values!r}")
        unknown = set(values) - set(SECTIONS) - set(SECTION_OF) - {"affine"}
        if unknown:
            raise ValueError(f"config: unknown FitConfig fields {sorted(unknown)}")
        settings = {}
        for key, value in values.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"config: {key}: expected an object of {SECTIONS[key].__name__} fields, "
                                     f"got {value!r}")
                extra = set(value) - {f.name for f in fields(SECTIONS[key])}
                if extra:
                    raise ValueError(f"config: unknown {SECTIONS[key].__name__} fields {sorted(extra)} in {key!r}")
                settings.update(value)
            elif key not in settings or key == "affine":
                settings[key] = value
        for key, kind in (("encoding", HashGridConfig), ("affine", AffineConfig)):
            section = settings.get(key)
            if section is None or isinstance(section, kind):
                continue
            if not isinstance(section, dict):
                raise ValueError(f"config: {key}: expected an object of {kind.__name__} fields or null, got {section!r}")
            unknown = set(section) - {f.name for f in fields(kind)}
            if unknown:
                raise ValueError(f"config: unknown {kind.__name__} fields {sorted(unknown)} in {key!r}")
            settings[key] = kind(**section)
        return replace(base if base is not None else cls(), **settings)


def default_encoding(shape: Sequence[int], finest_cell_voxels: float | None = None, *, n_levels: int = 8,
                     base_resolution: int = 4, n_features_per_level: int = 2) -> HashGridConfig:
    """``n_levels`` levels from ``base_resolution`` cells per axis up to the image's largest axis,
    table large enough to be dense at 128^2 and at most 2^19 rows (hashed on finer 3D levels).

    With ``finest_cell_voxels``, the finest level has cells of about that many voxels instead
    (at least 8 cells and at most the image's largest axis); its table then holds every vertex
    of the finest level (dense, up to 2^19 rows)."""
    finest = max(8, max(shape))
    if finest_cell_voxels is None:
        dense_rows = finest ** len(shape)
    else:
        finest = int(min(finest, max(8, round((max(shape) - 1) / finest_cell_voxels))))
        dense_rows = (finest + 1) ** len(shape)
    log2_size = int(min(19, max(14, math.ceil(math.log2(dense_rows)))))
    return HashGridConfig.from_resolutions(base_resolution, max(finest, base_resolution), n_levels,
                                           n_features_per_level=n_features_per_level, log2_hashmap_size=log2_size)


# The 3D preset, measured against Greedy and ANTs SyN on real brain pairs at 2 mm and 1 mm
# (benchmarks/real_peers.py):
# - mutual information (32 bins), which leaves the contrast and bias differences between subjects
#   and templates alone and needs no linear relation between them: mean Dice over five 2 mm pairs
#   and 1 mm, three seeds each, 0.8944 against 0.8905 with global NCC, higher on every pair. Its
#   weights are in nats, whose gradients are about 14 times global NCC's: hence penalty weights of
#   3.5 rather than NCC's 0.5 / 0.2 (gradient-ICON 7 with diffusion 2.8 was no better);
# - a diffusion term beside gradient-ICON (with NCC: mean Dice over five 2 mm pairs 0.882 against
#   0.871 with gradient-ICON alone, 0.930 against 0.913 at 1 mm, no folds);
# - a light blur schedule in mm (the same physical schedule at any voxel size); the similarity on
#   the images' foreground; two hidden layers of 32 (2D's one layer of 16 is not measured on
#   brains);
# - a hash grid of 6 levels of 4 features from 8 cells per axis to cells of 2.5 voxels (5 mm at
#   2 mm), 300 iterations: mean Dice over five 2 mm pairs 0.8899 against 0.8859 with 2D's 8 levels
#   of 2 features from 4 cells (cells of 3.5 voxels, 400 iterations), better on each pair; at 1 mm
#   0.9388 (two seeds) against 0.932, in the same time. 4 features per level alone gained 0.003,
#   coarsest cells of 8 alone 0.003; 400 iterations, 8192 points, 8 features, wider layers,
#   cells of 2-3 voxels were within 0.001; cells of 4.5 voxels, or 4 levels, were lower (0.932-0.933
#   against 0.938 on the 1 mm labels of fits on the 2 mm copies);
# - at least 1/128 of the foreground's voxels per step (17k points at 1 mm, 2.3-3k for 2 mm
#   brains, Colin27 with its skull 4.8k) and the fields averaged over the last half of the steps
#   (stochastic weight averaging): at 1 mm 0.9401 over six seeds (lowest 0.9393) against 0.9382
#   (lowest 0.9364); 16384 points alone 0.9397; fit_pair takes 15 s there instead of 9 s. More
#   points at 2 mm, or more iterations at 1 mm, gained nothing (600 iterations: 0.9381); the
#   averaging alone is within 0.001 on the 2 mm pairs (mean over five pairs and two seeds 0.8891
#   against 0.8892) and evens out the seeds. The floor of 2048 points per step (2D's) instead of
#   4096: on ten 2 mm pairs, three seeds, fit_pair 11 % faster (2.41 s against 2.71 s) at a mean
#   Dice of 0.8416 against 0.8422; the 1 mm pair and the skull pairs, above the floor, unchanged;
# - intensities clipped to their 0.5-99.5 percentiles first, as ANTs winsorizes them: MI bins the
#   [0, 1] range, and 30 voxels at 10 times the maximum put the whole brain into a few bins (Dice
#   0.854 against 0.913 on the packaged pair; clipped 0.913, clean pairs within 0.002);
# - a shorter affine stage than 2D's (50 rigid and 100 affine steps: the same Dice on five 2 mm
#   pairs and at 1 mm as 100 and 200, in half the time), refined by MI inside each image's
#   foreground like the fields' similarity: on whole images it scaled Colin27's head onto the
#   skull-stripped MNI152's brain (Dice 0.15 and 0.07 in the two directions, ANTs SyN 0.86 and
#   0.84; now 0.874 and 0.859); with a contrast-inverted fixed image 0.891 (NCC: 0.887); the clean
#   pairs within 0.001.
# "2d-scan" (benchmarks/slices_2d.py: axial, coronal and sagittal slices of the brain pairs at 1 and
#   2 mm, of the deformed pairs, and of Colin27 with its skull against the stripped MNI152): the
#   3D preset's objective, foreground and MI-refined affine stage on the 2D network. The 2D
#   defaults scored 0.734 / 0.736 on the clean slices at 1 / 2 mm against 0.760 / 0.756 (ANTs
#   SyN 0.773 / 0.747), and on the skull slices fell from the start's 0.700 to 0.344 (SyN 0.762;
#   now 0.780); the 3D preset's network and schedule as well gave the same Dice. On the shape
#   pairs the MI affine stage inside thin outlines is misled (one pair of 20: 0.685), hence two
#   2D presets.
# The 2D defaults (benchmarks/shapes_2d.py, 20 pairs each of two seeds of the generator): one hidden
# layer of 16 and 2048 points per direction give the Dice of two layers of 32 and 4096 points
# (0.9862 / 0.9864 against 0.9859 / 0.9869) in about half the time.
PRESETS = {
    "2d": FitConfig(),
    "2d-scan": FitConfig(average_last=0.5, similarity="mi", gradient_icon_weight=3.5, diffusion_weight=3.5,
                         foreground="auto", clip_percentiles=(0.5, 99.5),
                         affine=AffineConfig(refinement_cost="mi")),
    "3d": FitConfig(iterations=300, average_last=0.5, similarity="mi", blur_sigmas=(4.0, 2.0, 1.0, 0.0),
                    blur_in_mm=True, finest_cell_voxels=2.5, n_levels=6, base_resolution=8, n_features_per_level=4,
                    gradient_icon_weight=3.5, diffusion_weight=3.5, foreground="auto",
                    clip_percentiles=(0.5, 99.5), hidden_widths=(32, 32), similarity_fraction=1 / 128,
                    affine=AffineConfig(iterations=100, rigid_iterations=50, working_size=48,
                                        refinement_cost="mi")),
}
