"""fit_pair(): the per-pair optimisation of a forward and an inverse neural field.

Loss per iteration, on images blurred by the current stage of a coarse-to-fine schedule:

    sim(A o phi_AB, B) + sim(B o phi_BA, A) + lambda * gradient_icon_autograd(phi_AB, phi_BA)

with the hash-grid levels switched on coarse to fine over the first ``level_ramp`` of the
iterations. Both maps start from the affine stage (``phi = affine + u``, ``u = 0`` at start).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._cuda_ext import load as load_kernels
from .._optim import make_adam
from .affine import AffineTransform, fit_affine, moments_start
from ..config import FitConfig
from ..encoders import resolve_backend
from ..engine import FitDivergedError, Guard, Sampler, Schedule, StaticStep, make_objective, optimise
from ..transforms.fields import MapPair, MapPairs
from ..geometry.filters import gaussian_blur
from ..geometry import Grid, Image
from ..geometry.resample import coarsen, coarser_grid
from ..io.images import as_image
from .result import RegistrationResult
from ..transforms.world import INIT_NAMES, initial_world, orientation, world_to_local
from ..validation import as_tensor, check_image, check_mask, check_spacing, describe

__all__ = ["FitDivergedError", "fit_pair", "fit_pairs", "foreground_mask", "normalize_intensity"]


def _split_spacing(spacing, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``spacing`` is one voxel size for both images, or ``(moving_spacing, fixed_spacing)``."""
    if spacing is not None and not isinstance(spacing, (int, float)) and len(spacing) == 2 \
            and all(isinstance(s, (list, tuple, np.ndarray)) for s in spacing):
        return check_spacing("spacing[0]", spacing[0], ndim), check_spacing("spacing[1]", spacing[1], ndim)
    one = check_spacing("spacing", spacing, ndim)
    return one, one


def normalize_intensity(name: str, image: torch.Tensor, clip: tuple[float, float] | None = None) -> torch.Tensor:
    """Scale an image linearly to [0, 1] (computed in float64, returned as float32, so intensities
    near the float32 limits do not overflow); a constant image cannot be registered and raises.

    With ``clip = (low, high)`` percentiles, intensities are first clipped to those percentiles
    (e.g. ``(0.5, 99.5)`` for scans with a few very bright voxels), unless that would leave a
    constant image (an object in fewer voxels than the clipped tails): then the full range counts.
    """
    image = image.double()
    if clip is not None:
        bounds = torch.quantile(image.reshape(-1)[:: max(1, image.numel() // 1_000_000)],
                                torch.tensor([clip[0] / 100, clip[1] / 100], dtype=torch.float64,
                                             device=image.device))
        if bool(bounds[1] > bounds[0]):
            image = image.clamp(float(bounds[0]), float(bounds[1]))
    low, high = image.min(), image.max()
    if not bool(high > low):
        raise ValueError(f"{name}: the image is constant ({float(low)}); there is nothing to register")
    if not bool(torch.isfinite(high - low)):
        raise ValueError(f"{name}: the intensity range [{float(low)}, {float(high)}] is too large to rescale")
    return ((image - low) / (high - low)).float()


def fit_pair(moving, fixed, config: FitConfig | None = None, *, spacing=None, init=None, device=None,
             seed: int = 0, progress: bool = True, moving_mask=None, fixed_mask=None) -> RegistrationResult:
    """Register a moving image A to a fixed image B with a pair of neural fields.

    Args:
        moving, fixed: :class:`~neuralfield_reg.geometry.Image` s, file paths (``.npy``, NIfTI),
            nibabel images, or bare numpy arrays / tensors, ``(H, W)`` or ``(D, H, W)``, same
            number of axes (grids may differ). Images and files carry their geometry (world
            space); bare arrays get identity geometry (voxel sizes ``spacing``, no orientation).
            Intensities are rescaled to [0, 1] internally.
        config: :class:`FitConfig`; None takes the images' preset (:meth:`FitConfig.for_images`):
            ``"3d"`` for volumes, ``"2d-scan"`` for 2D images with a header, ``"2d"`` (=
            ``FitConfig()``) for bare 2D arrays; printed in the README.
        spacing: for bare arrays only: voxel size per axis for both images (None: 1), or
            ``(moving_spacing, fixed_spacing)``. The inverse-consistency penalty is measured in
            physical units.
        init: where the maps start, refined by the affine stage (``config.affine``; None keeps
            the start as it is): ``"world"`` (the identity in world mm, i.e. the headers'
            alignment; the default when both images carry geometry, except that when the headers
            put (almost) no part of the fixed image inside the moving image the default start is
            ``"moments"``, with a warning), ``"centers"`` (the grids'
            centres aligned, the orientation from the headers), ``"moments"`` (intensity moments
            and a rotation search: the default for bare arrays, where without an affine stage
            the maps start at the identity between the unit cubes), a world matrix
            (``(d+1, d+1)`` homogeneous, RAS mm, fixed -> moving points), or the path of an ITK
            affine file (``.mat``/``.txt``, as ANTs writes).
        device: where to fit; default the moving tensor's device, else CPU.
        seed: seeds the network initialisation and the random points (same seed and inputs give
            the same result on the CPU).
        progress: show a tqdm progress bar.
        moving_mask, fixed_mask: optional boolean (or 0/1) arrays of the images' shapes: the
            similarity counts only fixed voxels inside ``fixed_mask`` (direction AB) and moving
            voxels inside ``moving_mask`` (direction BA), e.g. brain masks.
    Returns:
        A :class:`RegistrationResult`.
    Raises:
        FitDivergedError: a loss term became NaN or Inf (the message says when and which).
    """
    return _fit([moving], [fixed], config, spacing=spacing, init=init, device=device, seed=seed, progress=progress,
                caller="fit_pair", moving_masks=None if moving_mask is None else [moving_mask],
                fixed_masks=None if fixed_mask is None else [fixed_mask])[0]


def fit_pairs(movings, fixeds, config: FitConfig | None = None, *, spacing=None, init=None, device=None,
              seed: int = 0, progress: bool = True, moving_masks=None, fixed_masks=None) -> list[RegistrationResult]:
    """Fit ``B`` pairs in one optimisation: each pair has its own hash tables and MLPs, stored in
    batched tensors, and every step evaluates all pairs together (no loop over pairs).

    Pairs are independent (disjoint parameters, a sum of per-pair losses, element-wise Adam), so
    each gets the fit it would get alone, with other random points. Pair ``p`` is initialised
    as ``fit_pair(..., seed=seed + p)`` would initialise it; ``fit_pairs([a], [b])`` is
    ``[fit_pair(a, b)]`` exactly.

    Args:
        movings, fixeds: sequences of ``B`` images; all moving images share one grid shape and
            all fixed images share one (fit groups of equal shapes, or use :func:`fit_pair`).
        config, spacing, init, device, progress: as for :func:`fit_pair` (one spacing and one
            init for all pairs; each pair starts from its own headers).
        moving_masks, fixed_masks: optional lists of masks, one per pair (see :func:`fit_pair`).
        seed: pair ``p`` uses ``seed + p`` for its initialisation; one generator seeded with
            ``seed`` draws the random points of all pairs.
    Returns:
        One :class:`RegistrationResult` per pair, in order. ``elapsed_s`` is the batch's time
        divided by ``B``; ``metadata`` holds ``batch_size``, ``pair_index`` and
        ``batch_elapsed_s``.
    Raises:
        FitDivergedError: a loss term of some pair became NaN or Inf (names the pair); with
            ``on_divergence="rollback"`` all pairs roll back together.
    """
    for name, value in (("movings", movings), ("fixeds", fixeds)):
        if isinstance(value, (np.ndarray, torch.Tensor)) or not hasattr(value, "__len__"):
            raise TypeError(f"{name}: expected a list of images, got {describe(value)}")
    if len(movings) != len(fixeds) or len(movings) == 0:
        raise ValueError(f"movings and fixeds: expected two non-empty lists of equal length, got "
                         f"{len(movings)} and {len(fixeds)}")
    return _fit(list(movings), list(fixeds), config, spacing=spacing, init=init, device=device, seed=seed,
                progress=progress, caller="fit_pairs", moving_masks=moving_masks, fixed_masks=fixed_masks)


def _check_masks(caller: str, kind: str, masks, images: torch.Tensor, grids: list[Grid]) -> torch.Tensor | None:
    """Masks as a boolean ``(B, *shape)`` tensor, checked against the images (and, for masks that
    carry geometry, against the images' grids)."""
    if masks is None:
        return None
    many = caller == "fit_pairs"
    if isinstance(masks, (np.ndarray, torch.Tensor, str, Path)) or not hasattr(masks, "__len__") \
            or len(masks) != images.shape[0]:
        raise ValueError(f"{kind}_masks: expected a list of {images.shape[0]} masks, one per pair")
    checked = []
    for p, mask in enumerate(masks):
        name = f"{kind}_masks[{p}]" if many else f"{kind}_mask"
        if not isinstance(mask, (np.ndarray, torch.Tensor)):
            image, _ = as_image(name, mask)
            if not image.grid.same_as(grids[p]):
                raise ValueError(f"{name}: the mask's grid {image.grid} is not the {kind} image's {grids[p]}")
            mask = image.data
        tensor, _ = as_tensor(name, mask, device=images.device)
        if tuple(tensor.shape) != tuple(images.shape[1:]):
            raise ValueError(f"{name}: expected the {kind} image's shape {tuple(images.shape[1:])}, "
                             f"got {describe(mask)}")
        checked.append(check_mask(name, tensor, mask))
    return torch.stack(checked)


BACKGROUND_FACTOR, BACKGROUND_NOISE = 2.0, 0.1


def foreground_mask(image: torch.Tensor, threshold: float = 0.05, dilation: int = 2) -> torch.Tensor:
    """Where an image (normalised to [0, 1], ``(*spatial)``) is not background: above
    ``threshold`` after a 1-voxel Gaussian blur (noise and isolated voxels do not count), dilated
    by ``dilation`` voxels so the borders of the object stay in. The whole image if that leaves
    fewer than 1 % of the voxels.

    Where the background is noise rather than dark (the air around a head in a raw MR scan, whose
    noise averages 5-10 % of the range), the threshold is twice its level: the median of the
    blurred image on the faces of the box, when that lies between ``threshold / 2`` and
    ``BACKGROUND_NOISE`` (0.1). Images with a dark background (stripped brains, CT) keep
    ``threshold``, and so do those whose faces are brighter (an object that fills the box, a
    bright background), as the whole image passes it there."""
    blurred = gaussian_blur(image.float(), 1.0)
    faces = torch.cat([blurred.select(axis, index).reshape(-1) for axis in range(image.ndim) for index in (0, -1)])
    background = float(faces.median())
    cut = BACKGROUND_FACTOR * background if background <= BACKGROUND_NOISE else threshold
    cut = max(threshold, cut)
    mask = (blurred > cut).float()[None, None]
    pool = F.max_pool3d if image.ndim == 3 else F.max_pool2d
    for axis in range(image.ndim):       # the box dilation, one axis at a time (the same mask, faster)
        size = [1] * image.ndim
        size[axis] = 2 * dilation + 1
        mask = pool(mask, size, stride=1, padding=[n // 2 for n in size])
    mask = mask[0, 0] > 0
    return mask if float(mask.float().mean()) >= 0.01 else torch.ones_like(mask)


def _check_images(caller: str, movings: list, fixeds: list, device,
                  clip: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, [0, 1]-normalised images stacked as ``(B, *shape)`` (moving, fixed)."""
    many = caller == "fit_pairs"
    checked = {"moving": [], "fixed": []}
    for kind, images in (("moving", movings), ("fixed", fixeds)):
        for p, image in enumerate(images):
            checked[kind].append(check_image(f"{kind}s[{p}]" if many else kind, image, device=device)[0])
    for p, (moving, fixed) in enumerate(zip(checked["moving"], checked["fixed"])):
        if moving.ndim != fixed.ndim:
            which = f"movings[{p}] and fixeds[{p}]" if many else "moving and fixed"
            raise ValueError(f"{which}: expected the same number of axes, got shapes "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
    for kind, tensors in checked.items():
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise ValueError(f"{kind}s: every {kind} image of one fit_pairs call must have the same shape, "
                             f"got {shapes}; fit groups of equal shapes")
    return tuple(torch.stack([normalize_intensity(f"{kind}s[{p}]" if many else kind, t, clip)
                              for p, t in enumerate(checked[kind])]) for kind in ("moving", "fixed"))


def _as_images(caller: str, movings: list, fixeds: list, spacing) -> tuple[list, list, bool]:
    """The inputs as Images, and whether all of them carry geometry (world coordinates)."""
    many = caller == "fit_pairs"
    images, known = {}, []
    for kind, values in (("moving", movings), ("fixed", fixeds)):
        images[kind] = []
        for p, value in enumerate(values):
            name = f"{kind}s[{p}]" if many else kind
            if isinstance(value, (np.ndarray, torch.Tensor)):
                check_image(name, value)            # the array checks first, with their messages
            image, has_geometry = as_image(name, value)
            images[kind].append(image)
            known.append(has_geometry)
    if any(known) and not all(known):
        raise ValueError(f"{'movings and fixeds' if many else 'moving and fixed'}: some inputs carry a header "
                         "(Images, NIfTI files) and some do not (arrays, .npy files), so they share no world "
                         "frame; give both as Images (e.g. Image(array, affine=...)) or both as arrays")
    if spacing is not None:
        if any(known):
            raise ValueError("spacing: the images carry their own geometry (Images, files); spacing= is for "
                             "bare arrays only")
        dim = images["moving"][0].dim
        moving_spacing, fixed_spacing = _split_spacing(spacing, dim)
        for kind, one in (("moving", moving_spacing), ("fixed", fixed_spacing)):
            images[kind] = [Image(image.data, Grid.from_spacing(image.shape, one, name=kind))
                            if image.dim == dim else image for image in images[kind]]
    return images["moving"], images["fixed"], all(known)


def _check_init(init, known: bool):
    """The initialisation by name (validated), a matrix, or a path; None picks the default."""
    if init is None:
        return "world" if known else None
    if isinstance(init, str) and init in INIT_NAMES:
        return init
    if isinstance(init, (str, Path)):
        if not Path(init).is_file():
            raise ValueError(f"init: expected one of {', '.join(map(repr, INIT_NAMES))}, a world matrix or an "
                             f"ITK affine file, got {str(init)!r} (no such file)")
        return Path(init)
    return init


def _start(init, moving: torch.Tensor, fixed: torch.Tensor, grids: tuple[Grid, Grid], config: FitConfig,
           native: bool, known: bool, masks=(None, None)):
    """The pair's affine part: ``(affine_AB, affine_BA)`` in unit coordinates (None: identity),
    and the world transform it starts from (None when image-based). ``masks``: the moving and
    fixed similarity masks (or None), which the affine stage's refinement respects too."""
    grid_A, grid_B = grids
    extent_A, extent_B = grid_A.extent, grid_B.extent
    frames = orientation(grid_A, grid_B) if known else None
    graphs = config.cuda_graphs and moving.device.type == "cuda"
    if init is None or (isinstance(init, str) and init == "moments"):
        if config.affine is not None:
            transform = fit_affine(moving, fixed, extent_A, extent_B, config.affine, native=native,
                                   orientation=frames, masks=masks, cuda_graphs=graphs)
        elif init is None:
            return (None, None), None          # bare arrays, no affine stage: the unit cubes' identity
        else:
            transform = moments_start(moving, fixed, extent_A, extent_B, frames)
        return (transform.unit_AB(), transform.unit_BA()), None
    world = initial_world(init, grid_A, grid_B)
    linear, translation = world_to_local(world, grid_A, grid_B)
    transform = AffineTransform(torch.from_numpy(linear), torch.from_numpy(translation), extent_A, extent_B)
    if config.affine is not None:
        transform = fit_affine(moving, fixed, extent_A, extent_B, config.affine, native=native, start=transform,
                               masks=masks, cuda_graphs=graphs)
    return (transform.unit_AB(), transform.unit_BA()), world


def _init_name(init, config: FitConfig) -> str:
    """What the fit started from, for the result's metadata."""
    if init is None:
        return "moments" if config.affine is not None else "identity"
    return init if isinstance(init, str) else str(init) if isinstance(init, Path) else "matrix"


def _start_overlap(world: np.ndarray, grid_A: Grid, grid_B: Grid) -> float:
    """Share of the fixed image's box that the start maps inside the moving image's box."""
    points = grid_B.world_points(32)
    mapped = points @ world[:-1, :-1].T + world[:-1, -1]
    return float(grid_A.contains(mapped, margin=0.5).mean())


# A start that maps less than this share of the fixed image into the moving image is reported.
_LOW_OVERLAP = 0.2
# With less than this share, the default start (the headers' alignment) gives way to the images'
# moments: nothing of the two images would meet. (Low, because a thin slab of the fixed image's
# box inside the moving image, or the reverse, is a real header alignment.)
_NO_OVERLAP = 0.01


@dataclass(frozen=True)
class _Inputs:
    """A fit's checked inputs: ``config`` resolved for the fixed grid, the normalised images
    ``(B, *shape)``, their grids (the moving images' as the fit samples them, and as given: the
    results' grids), the masks by direction (``"A"``: moving, ``"B"``: fixed), the
    initialisation, whether all inputs carry geometry, the device and the encoder backend."""

    config: FitConfig
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_grids: list[Grid]
    fixed_grids: list[Grid]
    given_moving_grids: list[Grid]
    masks: dict
    init: object
    init_given: bool
    known: bool
    device: torch.device
    backend: str


def _inputs(caller: str, movings: list, fixeds: list, config: FitConfig | None, spacing, init, device,
            moving_masks, fixed_masks) -> _Inputs:
    """The inputs of fit_pair / fit_pairs checked, with the preset of the images'
    dimensionality when ``config`` is None and the automatic foreground masks when asked for."""
    if config is not None and not isinstance(config, FitConfig):
        raise TypeError(f"config: expected a FitConfig or None, got {type(config).__name__}")
    moving_images, fixed_images, known = _as_images(caller, movings, fixeds, spacing)
    if config is None:                  # the preset of the images' dimensionality (and, in 2D, kind)
        config = FitConfig.for_images(moving_images[0].dim, scans=known)
    init_given = init is not None
    init = _check_init(init, known)
    if device is None:
        data = moving_images[0].data
        device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    moving_t, fixed_t = _check_images(caller, [image.data for image in moving_images],
                                      [image.data for image in fixed_images], device,
                                      config.clip_percentiles)  # (B, *shape)
    moving_grids = [image.grid for image in moving_images]
    fixed_grids = [image.grid for image in fixed_images]
    for kind, grids in (("moving", moving_grids), ("fixed", fixed_grids)):
        if len({tuple(round(e, 6) for e in grid.extent) for grid in grids}) > 1:
            raise ValueError(f"{kind}s: every {kind} image of one fit_pairs call must have the same voxel sizes, "
                             f"got {sorted({grid.spacing for grid in grids})}; fit groups of equal grids")
    masks = {"A": _check_masks(caller, "moving", moving_masks, moving_t, moving_grids),
             "B": _check_masks(caller, "fixed", fixed_masks, fixed_t, fixed_grids)}
    given_moving_grids = moving_grids
    if config.moving_at_fixed_resolution:
        moving_t, masks["A"], moving_grids = _at_fixed_resolution(moving_t, masks["A"], moving_grids,
                                                                  fixed_grids[0])
    if config.foreground == "auto":
        for key, images in (("A", moving_t), ("B", fixed_t)):
            if masks[key] is None:
                masks[key] = torch.stack([foreground_mask(image) for image in images])
    config = config.resolved(tuple(fixed_t.shape[1:]))
    return _Inputs(config, moving_t, fixed_t, moving_grids, fixed_grids, given_moving_grids, masks, init, init_given,
                   known, device, resolve_backend(config.backend, device))


def _at_fixed_resolution(moving: torch.Tensor, masks: torch.Tensor | None, grids: list[Grid],
                         fixed_grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None, list[Grid]]:
    """The ``(B, *shape)`` moving images (and masks) on grids no finer than the fixed image's
    finest spacing (``FitConfig.moving_at_fixed_resolution``; unchanged when no axis is 1.5 times
    finer), with those grids. A coarsened mask keeps the voxels at least half inside the given one
    (any overlap where that leaves none)."""
    coarse = [coarser_grid(grid, min(fixed_grid.spacing)) for grid in grids]
    if coarse[0] is grids[0]:
        return moving, masks, grids
    moving = torch.stack([coarsen(image, grids[0], coarse[0]) for image in moving])
    if masks is not None:
        shares = [coarsen(mask.float(), grids[0], coarse[0]) for mask in masks]
        masks = torch.stack([share >= 0.5 if bool((share >= 0.5).any()) else share > 0 for share in shares])
    return moving, masks, coarse


def _initial_maps(inputs: _Inputs, caller: str, seed: int) -> tuple[MapPairs, list[float | None], list]:
    """The pairs' maps at their start (the affine stage included), stacked, the share of each
    fixed image that its world start maps inside the moving image (None when image-based), and
    each pair's initialisation.

    With the default start (the headers' alignment), a pair whose headers put no part of the
    fixed image inside the moving image (under ``_NO_OVERLAP``: the headers do not share a world
    frame, e.g. an origin hundreds of mm off) starts from the images' moments instead, with a
    warning, as ANTs starts from the centres of mass; a start the user gave is kept."""
    config, dim = inputs.config, inputs.moving.ndim - 1
    native = inputs.backend == "native" and config.fused_kernels
    pairs, overlaps, inits = [], [], []
    where = (lambda p: f" of pair {p}") if caller == "fit_pairs" else (lambda p: "")
    for p in range(inputs.moving.shape[0]):
        grids = (inputs.moving_grids[p], inputs.fixed_grids[p])
        masks = tuple(None if inputs.masks[key] is None else inputs.masks[key][p] for key in ("A", "B"))
        init = inputs.init
        if not inputs.init_given and init == "world":
            overlap = _start_overlap(initial_world("world", *grids), *grids)
            if overlap < _NO_OVERLAP:
                warnings.warn(f"{caller}: the headers' alignment maps {100 * overlap:.1g} % of the fixed image"
                              f"{where(p)} inside the moving image (no shared world frame); starting from the "
                              "images' moments instead (init='moments'); pass init='world' to keep the headers' "
                              "alignment", stacklevel=4)
                init = "moments"
        (affine_AB, affine_BA), world = _start(init, inputs.moving[p], inputs.fixed[p], grids, config,
                                               native, inputs.known, masks)
        overlaps.append(None if world is None else _start_overlap(world, *grids))
        inits.append(init)
        with torch.random.fork_rng(devices=[]):      # the maps are initialised on the CPU, then moved
            torch.manual_seed(seed + p)
            pairs.append(MapPair(dim, encoding=config.encoding, hidden_widths=config.hidden_widths,
                                 output_scale=config.output_scale, backend=inputs.backend,
                                 affine_AB=affine_AB, affine_BA=affine_BA).to(inputs.device))
    for p, (overlap, init) in enumerate(zip(overlaps, inits)):
        if overlap is not None and overlap < _LOW_OVERLAP:
            start = init if isinstance(init, str) else "given transform"
            warnings.warn(f"{caller}: the start ({start}) maps only {100 * overlap:.0f} % of the fixed image{where(p)} "
                          "inside the moving image; if the two headers do not share a world frame, use "
                          "init='centers' or init='moments'", stacklevel=4)
    maps = MapPairs.stack(pairs)
    maps.fields.use_fused = config.fused_kernels
    return maps, overlaps, inits


def use_static_step(config: FitConfig, device: torch.device, backend: str) -> bool:
    """Whether the field stage's steps run as a :class:`StaticStep` captured in a CUDA graph: on
    CUDA, with our own encodings (tiny-cuda-nn manages its own memory and streams)."""
    return config.cuda_graphs and device.type == "cuda" and backend in ("native", "torch")


def _fit(movings: list, fixeds: list, config: FitConfig | None, *, spacing, init, device, seed: int,
         progress: bool, caller: str, moving_masks=None, fixed_masks=None) -> list[RegistrationResult]:
    """The optimisation behind fit_pair (B = 1) and fit_pairs: the inputs checked, the maps
    started, then the field stage (:mod:`neuralfield_reg.engine`)."""
    inputs = _inputs(caller, movings, fixeds, config, spacing, init, device, moving_masks, fixed_masks)
    config, n_pairs = inputs.config, inputs.moving.shape[0]
    start_time = time.perf_counter()
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    maps, overlaps, inits = _initial_maps(inputs, caller, seed)
    native = inputs.backend == "native" and config.fused_kernels and inputs.device.type == "cpu"
    static = use_static_step(config, inputs.device, inputs.backend)
    optimizer = make_adam(list(maps.parameters()), config.learning_rate, load_kernels() if native else None,
                          capturable=static, skip_zero=config.sparse_adam)
    sampler = Sampler(config, {"A": tuple(inputs.moving.shape[1:]), "B": tuple(inputs.fixed.shape[1:])},
                      inputs.masks, n_pairs, generator)
    schedule = Schedule(config, inputs.moving, inputs.fixed,
                        (inputs.moving_grids[0].spacing, inputs.fixed_grids[0].spacing))
    objective = make_objective(config, maps, sampler, inputs.masks,
                               (inputs.moving_grids[0].extent, inputs.fixed_grids[0].extent))
    guard = Guard(config, caller, objective.names, maps, optimizer, generator, schedule)
    parameters = list(maps.fields.parameters())
    static_step = (StaticStep(objective, optimizer, parameters, capture=inputs.device.type == "cuda")
                   if static else None)
    history = optimise(config.iterations, sampler, schedule, objective, guard, optimizer, parameters,
                       progress=progress, desc=caller, static_step=static_step)
    elapsed = time.perf_counter() - start_time
    results = []
    for p, pair in enumerate(maps.unstack()):
        metadata = {"seed": seed + p, "device": str(inputs.device), "rollbacks": guard.rollbacks,
                    "init": _init_name(inits[p], config), "start_overlap": overlaps[p],
                    "moving_fit_shape": tuple(inputs.moving.shape[1:])}
        if caller == "fit_pairs":
            metadata.update(batch_size=n_pairs, pair_index=p, batch_elapsed_s=elapsed)
        results.append(RegistrationResult(
            pair, moving_grid=inputs.given_moving_grids[p], fixed_grid=inputs.fixed_grids[p], config=config,
            backend=inputs.backend, history=history.per_pair[p], elapsed_s=elapsed / n_pairs, metadata=metadata))
    return results
