"""fit_pair(): the per-pair optimisation of a forward and an inverse neural field.

Loss per iteration, on images blurred by the current stage of a coarse-to-fine schedule:

    sim(A o phi_AB, B) + sim(B o phi_BA, A) + lambda * gradient_icon_autograd(phi_AB, phi_BA)

with the hash-grid levels switched on coarse to fine over the first ``level_ramp`` of the
iterations. Both maps start from the affine stage (``phi = affine + u``, ``u = 0`` at start).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._optim import make_adam
from .affine import AffineTransform, fit_affine, moments_start
from .config import FitConfig
from .coords import identity_grid, sample_batch
from .encoders import resolve_backend
from .fields import MapPair, MapPairs
from .filters import gaussian_blur, gaussian_blur_batch
from .fused import fused_loss_gradients, gradient_icon_fused, similarity_ssd_fused
from .geometry import Grid, Image
from .io import as_image
from .losses import SIMILARITIES, inverse_consistency_terms
from .result import RegistrationResult
from .transforms.world import INIT_NAMES, initial_world, orientation, world_to_local
from .validation import as_tensor, check_image, check_spacing, describe


# With on_divergence="rollback", the state is kept every this many iterations.
_GOOD_STATE_EVERY = 10


class FitDivergedError(RuntimeError):
    """The optimisation diverged: a NaN or Inf, an exploding gradient-ICON penalty, or maps that
    left the image; the message names the iteration and what went wrong."""


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
    (e.g. ``(1, 99)`` for scans with a few very bright voxels).
    """
    image = image.double()
    if clip is not None:
        bounds = torch.quantile(image.reshape(-1)[:: max(1, image.numel() // 1_000_000)],
                                torch.tensor([clip[0] / 100, clip[1] / 100], dtype=torch.float64,
                                             device=image.device))
        image = image.clamp(float(bounds[0]), float(bounds[1]))
    low, high = image.min(), image.max()
    if not bool(high > low):
        raise ValueError(f"{name}: the image is constant ({float(low)}); there is nothing to register")
    if not bool(torch.isfinite(high - low)):
        raise ValueError(f"{name}: the intensity range [{float(low)}, {float(high)}] is too large to rescale")
    return ((image - low) / (high - low)).float()


def patch_shape(shape, patch_size: int) -> list[int]:
    """The patch grid of :func:`patch_indices`: ``patch_size`` voxels per axis, or the whole axis
    where it is shorter."""
    return [min(patch_size, n) for n in shape]


def patch_indices(shape, n_pairs: int, n_patches: int, patch_size: int, generator: torch.Generator,
                  centres: torch.Tensor | None = None) -> torch.Tensor:
    """Flat voxel indices ``(n_pairs, n_patches * p^d)`` of random cubic patches inside a grid of
    ``shape``: each run of ``p^d`` indices is one patch in C order, ``p = min(patch_size, axis)``
    per axis (so a patch never leaves the grid).

    Args:
        centres: optional flat voxel indices ``(n_pairs, n_patches)``; each patch then contains
            its centre voxel (centred on it, shifted only to stay inside the grid).
    """
    device = generator.device
    patch = patch_shape(shape, patch_size)
    if centres is None:
        corners = torch.stack([torch.randint(n - p + 1, (n_pairs, n_patches), generator=generator, device=device)
                               for n, p in zip(shape, patch)], dim=-1)                  # (B, P, d)
    else:
        voxels = torch.stack(torch.unravel_index(centres, tuple(shape)), dim=-1)
        corners = torch.stack([(voxels[..., a] - p // 2).clamp(0, n - p) for a, (n, p) in enumerate(zip(shape, patch))],
                              dim=-1)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(p, device=device) for p in patch], indexing="ij"),
                          dim=-1).reshape(-1, len(shape))                                # (p^d, d)
    strides = torch.tensor([math.prod(shape[a + 1:]) for a in range(len(shape))], device=device)
    return ((corners[:, :, None, :] + offsets) * strides).sum(-1).reshape(n_pairs, -1)


def level_weights(iteration: int, config: FitConfig, n_levels: int, device) -> torch.Tensor:
    """Weights in [0, 1] per hash-grid level: a ramp from ``start_levels`` to all levels."""
    ramp_iterations = config.level_ramp * config.iterations
    progress = 1.0 if ramp_iterations <= 0 else min(1.0, iteration / ramp_iterations)
    active = config.start_levels + progress * (n_levels - config.start_levels)
    return (active - torch.arange(n_levels, device=device, dtype=torch.float32)).clamp(0.0, 1.0)


def fit_pair(moving, fixed, config: FitConfig | None = None, *, spacing=None, init=None, device=None,
             seed: int = 0, progress: bool = True, moving_mask=None, fixed_mask=None) -> RegistrationResult:
    """Register a moving image A to a fixed image B with a pair of neural fields.

    Args:
        moving, fixed: :class:`~neuralfield_reg.geometry.Image` s, file paths (``.npy``, NIfTI),
            nibabel images, or bare numpy arrays / tensors, ``(H, W)`` or ``(D, H, W)``, same
            number of axes (grids may differ). Images and files carry their geometry (world
            space); bare arrays get identity geometry (voxel sizes ``spacing``, no orientation).
            Intensities are rescaled to [0, 1] internally.
        config: :class:`FitConfig`; None takes the preset of the images' dimensionality
            (``FitConfig.preset("2d")`` = ``FitConfig()``, or ``"3d"``), printed in the README.
        spacing: for bare arrays only: voxel size per axis for both images (None: 1), or
            ``(moving_spacing, fixed_spacing)``. The inverse-consistency penalty is measured in
            physical units.
        init: where the maps start, refined by the affine stage (``config.affine``; None keeps
            the start as it is): ``"world"`` (the identity in world mm, i.e. the headers'
            alignment; the default when both images carry geometry), ``"centers"`` (the grids'
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
        if tensor.is_complex() or (tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())):
            raise ValueError(f"{name}: expected a boolean or 0/1 mask, got {describe(mask)}")
        if tensor.dtype != torch.bool:
            other = tensor[(tensor != 0) & (tensor != 1)]
            if other.numel():
                raise ValueError(f"{name}: expected a boolean or 0/1 mask, got values such as "
                                 f"{sorted(set(other[:1000].tolist()))[:3]}")
        tensor = tensor != 0
        if not bool(tensor.any()):
            raise ValueError(f"{name}: the mask is empty; nothing would be compared")
        checked.append(tensor)
    return torch.stack(checked)


def foreground_mask(image: torch.Tensor, threshold: float = 0.05, dilation: int = 2) -> torch.Tensor:
    """Where an image (normalised to [0, 1], ``(*spatial)``) is not background: above
    ``threshold`` after a 1-voxel Gaussian blur (noise and isolated voxels do not count), dilated
    by ``dilation`` voxels so the borders of the object stay in. The whole image if that leaves
    fewer than 1 % of the voxels."""
    blurred = gaussian_blur(image.float(), 1.0)
    mask = (blurred > threshold).float()[None, None]
    pool = F.max_pool3d if image.ndim == 3 else F.max_pool2d
    mask = pool(mask, 2 * dilation + 1, stride=1, padding=dilation)[0, 0] > 0
    return mask if float(mask.float().mean()) >= 0.01 else torch.ones_like(mask)


def _padded_nonzero(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of each row's set voxels, ``(B, max count)`` padded with the row's first
    one, and the counts ``(B,)``."""
    counts = masks.sum(1)
    order = torch.argsort((~masks).to(torch.uint8), dim=1, stable=True)[:, :int(counts.max())]
    column = torch.arange(order.shape[1], device=masks.device)
    return torch.where(column < counts[:, None], order, order[:, :1]), counts


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
           native: bool, known: bool):
    """The pair's affine part: ``(affine_AB, affine_BA)`` in unit coordinates (None: identity),
    and the world transform it starts from (None when image-based)."""
    grid_A, grid_B = grids
    extent_A, extent_B = grid_A.extent, grid_B.extent
    frames = orientation(grid_A, grid_B) if known else None
    if init is None or (isinstance(init, str) and init == "moments"):
        if config.affine is not None:
            transform = fit_affine(moving, fixed, extent_A, extent_B, config.affine, native=native,
                                   orientation=frames)
        elif init is None:
            return (None, None), None          # bare arrays, no affine stage: the unit cubes' identity
        else:
            transform = moments_start(moving, fixed, extent_A, extent_B, frames)
        return (transform.unit_AB(), transform.unit_BA()), None
    world = initial_world(init, grid_A, grid_B)
    linear, translation = world_to_local(world, grid_A, grid_B)
    transform = AffineTransform(torch.from_numpy(linear), torch.from_numpy(translation), extent_A, extent_B)
    if config.affine is not None:
        transform = fit_affine(moving, fixed, extent_A, extent_B, config.affine, native=native, start=transform)
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


# A gradient-ICON penalty above this (the mean squared Frobenius norm of the residual's Jacobian,
# dimensionless; working fits stay below 0.1: at most 0.03 on 2D shapes, 0.001 on a brain pair)
# means the two maps no longer invert each other: the fit diverged although every number is finite.
_PENALTY_LIMIT = 10.0
# A displacement field longer than this (unit coordinates: image widths) has left the image by far.
# (A small pair with a weak affine start legitimately reached 1.04 widths in its background.)
_DISPLACEMENT_LIMIT = 4.0


def _divergence(values: list[list[float]], names: list[str], config: FitConfig, maps: MapPairs,
                level_weights: torch.Tensor | None, check_maps: bool) -> tuple[int, str, str] | None:
    """``(pair, what, how)`` of the first sign that the fit diverged, else None: a NaN/Inf term,
    an exploding gradient-ICON penalty, or (checked every few iterations, and always before a
    rollback snapshot) displacement fields longer than the image."""
    for p, row in enumerate(values):
        for name, value in zip(names, row):
            if not math.isfinite(value):
                return p, f"{name} term", f"became {value}"
        penalty = row[names.index("gradient_icon")]
        if config.gradient_icon_weight > 0 and penalty > _PENALTY_LIMIT:
            return p, "gradient_icon term", f"exploded to {penalty:.3g} (working fits stay below 0.1)"
    if check_maps:
        dim = maps.dim
        axis = torch.linspace(0.0, 1.0, 5, device=maps.matrices.device)
        lattice = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
        with torch.no_grad():
            fields = maps.fields.forward_batched(lattice.expand(maps.fields.n_fields, *lattice.shape).contiguous(),
                                                 level_weights)
        longest = fields.norm(dim=-1).amax(1)                                   # (2B,) unit coordinates
        field = int(torch.argmax(longest))
        if not bool(torch.isfinite(longest).all()) or float(longest[field]) > _DISPLACEMENT_LIMIT:
            return field // 2, "displacement", (f"reached {float(longest[field]):.3g} image widths "
                                                f"({'phi_AB' if field % 2 == 0 else 'phi_BA'})")
    return None


def _fit(movings: list, fixeds: list, config: FitConfig, *, spacing, init, device, seed: int, progress: bool,
         caller: str, moving_masks=None, fixed_masks=None) -> list[RegistrationResult]:
    """The optimisation behind fit_pair (B = 1) and fit_pairs."""
    if config is not None and not isinstance(config, FitConfig):
        raise TypeError(f"config: expected a FitConfig or None, got {type(config).__name__}")
    moving_images, fixed_images, known = _as_images(caller, movings, fixeds, spacing)
    if config is None:                  # the preset of the images' dimensionality
        config = FitConfig.for_images(moving_images[0].dim)
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
    if config.foreground == "auto":
        for key, images in (("A", moving_t), ("B", fixed_t)):
            if masks[key] is None:
                masks[key] = torch.stack([foreground_mask(image) for image in images])
    n_pairs, dim = moving_t.shape[0], moving_t.ndim - 1
    moving_shape, fixed_shape = tuple(moving_t.shape[1:]), tuple(fixed_t.shape[1:])
    config = config.resolved(fixed_shape)
    backend = resolve_backend(config.backend, device)

    start_time = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    extent_A, extent_B = moving_grids[0].extent, fixed_grids[0].extent

    pairs, starts = [], []
    for p in range(n_pairs):            # set-up only: the affine stage and the initialisation
        (affine_AB, affine_BA), world = _start(init, moving_t[p], fixed_t[p], (moving_grids[p], fixed_grids[p]),
                                               config, backend == "native" and config.fused_kernels, known)
        starts.append(world)
        with torch.random.fork_rng(devices=[]):      # the maps are initialised on the CPU, then moved
            torch.manual_seed(seed + p)
            pairs.append(MapPair(dim, encoding=config.encoding, hidden_widths=config.hidden_widths,
                                 output_scale=config.output_scale, backend=backend,
                                 affine_AB=affine_AB, affine_BA=affine_BA).to(device))
    overlaps = [None if world is None else _start_overlap(world, moving_grids[p], fixed_grids[p])
                for p, world in enumerate(starts)]
    for p, overlap in enumerate(overlaps):
        if overlap is not None and overlap < _LOW_OVERLAP:
            where = f" of pair {p}" if caller == "fit_pairs" else ""
            warnings.warn(f"{caller}: the start ({init if isinstance(init, str) else 'given transform'}) maps only "
                          f"{100 * overlap:.0f} % of the fixed image{where} inside the moving image; if the two "
                          "headers do not share a world frame, use init='centers' or init='moments'", stacklevel=3)
    maps = MapPairs.stack(pairs)
    maps.fields.use_fused = config.fused_kernels
    optimizer = make_adam(list(maps.parameters()), config.learning_rate)
    field_parameters = list(maps.fields.parameters())     # in fused_loss_gradients' order
    learning_rate_scale = 1.0          # lowered by each rollback

    def learning_rate(iteration: int) -> float:
        """Cosine from ``learning_rate`` to ``learning_rate * learning_rate_decay``."""
        cosine = 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, config.iterations - 1)))
        decay = config.learning_rate_decay
        return learning_rate_scale * config.learning_rate * (decay + (1.0 - decay) * cosine)

    grid_A = identity_grid(moving_shape, device=device).reshape(-1, dim)
    grid_B = identity_grid(fixed_shape, device=device).reshape(-1, dim)
    stages = [(gaussian_blur_batch(moving_t, config.blur_voxels(s, moving_grids[0].spacing))[:, None],
               gaussian_blur_batch(fixed_t, config.blur_voxels(s, fixed_grids[0].spacing))[:, None])
              for s in config.blur_sigmas]
    similarity = SIMILARITIES[config.similarity]
    n_levels = config.encoding.n_levels
    names = ["loss", "similarity", "gradient_icon"] + (["icon"] if config.icon_weight > 0 else [])
    history: list[dict[str, list[float]]] = [{name: [] for name in names} for _ in range(n_pairs)]

    # Random similarity points (and LNCC patch centres) are drawn inside the target image's mask
    # when it has one: the budget goes where the similarity counts (the brain, not the background).
    mask_voxels = {key: None if mask is None else _padded_nonzero(mask.reshape(n_pairs, -1))
                   for key, mask in masks.items()}

    def similarity_points(grid, shape, key):
        """All voxels, random voxels or random LNCC patches: ``(points (B, N, d), flat voxel
        indices (B, N) or None)`` (patches: see :func:`patch_indices`)."""
        def at_voxels(index):                      # grid[index], without advanced indexing's cost
            return grid.index_select(0, index.reshape(-1)).reshape(*index.shape, grid.shape[1])

        def in_mask(count):
            voxels, counts = mask_voxels[key]
            draw = torch.rand(n_pairs, count, generator=generator, device=device)
            return torch.gather(voxels, 1, (draw * counts[:, None]).long().clamp_max(voxels.shape[1] - 1))

        if config.similarity == "lncc":
            if config.lncc_patches is None:
                return grid.expand(n_pairs, *grid.shape), None     # whole images (neighbourhoods)
            centres = None if mask_voxels[key] is None else in_mask(config.lncc_patches)
            index = patch_indices(shape, n_pairs, config.lncc_patches, config.lncc_patch_size, generator, centres)
            return at_voxels(index), index
        if config.similarity_points is None or config.similarity_points >= grid.shape[0]:
            return grid.expand(n_pairs, *grid.shape), None
        if mask_voxels[key] is not None:
            index = in_mask(config.similarity_points)
        else:
            index = torch.randint(grid.shape[0], (n_pairs, config.similarity_points), generator=generator,
                                  device=device)
        # In voxel order, consecutive points read nearby hash-table rows (the fused CPU kernels
        # run about 10 % faster than on scattered points); the order does not change the mean.
        # (numpy's sort of a few thousand indices is ~2x faster than torch's on the CPU.)
        if index.device.type == "cpu":
            index = torch.from_numpy(np.sort(index.numpy(), axis=1))
        return at_voxels(index), index

    def at_points(values, index):
        """``(B, N)``: ``(B, ...)`` per-voxel values at the flat voxel indices (all when None)."""
        flat = values.reshape(n_pairs, -1)
        return flat if index is None else torch.gather(flat, 1, index)

    def similarity_term(sources, targets, mapped, index, mask):
        """Per pair ``(B,)``: ``sources`` sampled at ``mapped`` against ``targets`` (only where
        ``mask``, the target image's mask, is set, when there is one)."""
        warped = sample_batch(sources, mapped)[:, 0]                              # (B, N)
        target_values = at_points(targets, index)
        if config.similarity == "lncc":
            if index is None:
                return similarity(warped.reshape(n_pairs, *targets.shape[2:]), targets[:, 0],
                                  window=config.lncc_window, batched=True, weights=mask)
            patch = patch_shape(targets.shape[2:], config.lncc_patch_size)
            # With a mask, every patch holds its (masked) centre voxel, so no patch is all-zero.
            weights = None if mask is None else torch.gather(mask.reshape(n_pairs, -1), 1, index).reshape(-1, *patch)
            per_patch = similarity(warped.reshape(-1, *patch), target_values.reshape(-1, *patch),
                                   window=config.lncc_window, batched=True, weights=weights)
            return per_patch.reshape(n_pairs, -1).mean(1)
        # Only where the map lands inside the other image's domain: outside it there is nothing
        # to compare (padding would invent structure, e.g. streaks from a shape cut by the border).
        # A pair with fewer than 16 such points compares all of them. (similarity_ssd_fused
        # computes the same SSD in one native call.)
        inside = ((mapped >= 0) & (mapped <= 1)).all(-1)
        inside = inside | (inside.sum(1, keepdim=True) < 16)
        if mask is not None:
            inside = inside & at_points(mask, index)
            inside = inside | ~inside.any(1, keepdim=True)        # no point left: compare all
        return similarity(warped, target_values, batched=True, weights=inside)

    # With the native backend on the CPU, SSD runs as one fused kernel (maps, sampling, SSD and
    # its gradient) when both directions have as many points.
    fused_similarity = config.similarity == "ssd" and maps.fields.fused_for(grid_B)

    def fused_similarity_args(moving_s, fixed_s, drawn):
        """similarity_ssd_fused's (and fused_loss's) arguments for the drawn points."""
        (points_B, index_B), (points_A, index_A) = drawn

        def mask_at(key, index):
            return None if masks[key] is None else at_points(masks[key], index).to(points_B.dtype)

        return ((maps, moving_s[:, 0], fixed_s[:, 0], points_B, at_points(fixed_s, index_B), points_A,
                 at_points(moving_s, index_A)), {"masks_B": mask_at("B", index_B), "masks_A": mask_at("A", index_A)})

    def similarity_of_both(moving_s, fixed_s, weights, drawn):
        (points_B, index_B), (points_A, index_A) = drawn
        if fused_similarity and points_B.shape == points_A.shape:
            args, kwargs = fused_similarity_args(moving_s, fixed_s, drawn)
            return similarity_ssd_fused(*args, **kwargs, level_weights=weights)
        mapped_B, mapped_A = maps(points_B, points_A, weights)      # phi_AB on B's grid, phi_BA on A's
        return (similarity_term(moving_s, fixed_s, mapped_B, index_B, masks["B"])
                + similarity_term(fixed_s, moving_s, mapped_A, index_A, masks["A"]))

    good_state, rollbacks = None, []
    bar = tqdm(total=config.iterations, disable=not progress, desc=caller, leave=False)
    iteration = 0
    while iteration < config.iterations:
        stage = min(iteration * len(stages) // config.iterations, len(stages) - 1)
        moving_s, fixed_s = stages[stage]
        weights = level_weights(iteration, config, n_levels, device)

        optimizer.zero_grad(set_to_none=True)
        drawn = (similarity_points(grid_B, fixed_shape, "B"), similarity_points(grid_A, moving_shape, "A"))
        points = torch.rand(n_pairs, config.gradient_icon_points, dim, generator=generator, device=device)
        fused_penalty = config.icon_weight == 0 and maps.fields.fused_for(points)
        (points_B, _), (points_A, _) = drawn
        gradients = None               # or the parameters' gradients, computed with the loss
        if fused_penalty and fused_similarity and points_B.shape == points_A.shape:
            # both fused CPU kernels, their gradients summed in one set of buffers: no autograd graph
            args, kwargs = fused_similarity_args(moving_s, fixed_s, drawn)
            loss, similarity_value, penalty_value, gradients = fused_loss_gradients(
                *args, points, config.gradient_icon_weight, **kwargs, extent_A=extent_A, extent_B=extent_B,
                level_weights=weights)
            terms = {"similarity": similarity_value, "gradient_icon": penalty_value}
        else:
            terms = {"similarity": similarity_of_both(moving_s, fixed_s, weights, drawn)}
            if fused_penalty:
                # the fused CPU kernel: the same penalty, in one native call
                terms["gradient_icon"] = gradient_icon_fused(maps, points, extent_A=extent_A, extent_B=extent_B,
                                                             level_weights=weights)
            else:
                consistency = inverse_consistency_terms(lambda a, b: maps(a, b, weights), points,
                                                        extent_A=extent_A, extent_B=extent_B)
                terms["gradient_icon"] = consistency["gradient_icon"]
            loss = terms["similarity"] + config.gradient_icon_weight * terms["gradient_icon"]
        if config.icon_weight > 0:
            terms["icon"] = consistency["icon"]
            loss = loss + config.icon_weight * terms["icon"]
        terms["loss"] = loss
        values = torch.stack([terms[name].detach() for name in names], dim=1).tolist()   # (B, terms)
        bad = _divergence(values, names, config, maps, weights, check_maps=iteration % _GOOD_STATE_EVERY == 0)
        if bad:
            p, name, what = bad
            where = f" of pair {p}" if caller == "fit_pairs" else ""
            message = f"{caller}: the {name}{where} {what} at iteration {iteration}"
            if config.on_divergence != "rollback" or good_state is None or len(rollbacks) >= config.max_rollbacks:
                advice = (f" after {len(rollbacks)} rollbacks; lower FitConfig.learning_rate"
                          if config.on_divergence == "rollback" else
                          "; lower FitConfig.learning_rate (or set on_divergence='rollback')")
                raise FitDivergedError(f"{message}{advice} or check the images")
            iteration, state, optimizer_state, generator_state = good_state
            maps.load_state_dict(state)
            optimizer.load_state_dict(optimizer_state)
            generator.set_state(generator_state)
            learning_rate_scale *= config.rollback_factor
            rollbacks.append({"iteration": iteration, "term": name.split()[0], "learning_rate_scale": learning_rate_scale})
            for pair_history in history:
                for values_of_term in pair_history.values():
                    del values_of_term[iteration:]
            bar.n = iteration
            continue
        if config.on_divergence == "rollback" and iteration % _GOOD_STATE_EVERY == 0:
            good_state = (iteration, copy.deepcopy(maps.state_dict()), copy.deepcopy(optimizer.state_dict()),
                          generator.get_state())
        for pair_history, row in zip(history, values):
            for name, value in zip(names, row):
                pair_history[name].append(value)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration)
        if gradients is None:
            loss.sum().backward()        # pairs share no parameter: each gets its own gradient
        else:
            for parameter, gradient in zip(field_parameters, gradients, strict=True):
                parameter.grad = gradient
        optimizer.step()
        iteration += 1
        bar.update(1)
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([row[0] for row in values]):.4g}")
    bar.close()

    for name, parameter in maps.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise FitDivergedError(f"{caller}: parameter {name} became non-finite in the last step")
    bad = _divergence([], names, config, maps, None, check_maps=True)
    if bad:
        where = f" of pair {bad[0]}" if caller == "fit_pairs" else ""
        raise FitDivergedError(f"{caller}: the {bad[1]}{where} {bad[2]} at the end; lower FitConfig.learning_rate")
    elapsed = time.perf_counter() - start_time
    results = []
    for p, pair in enumerate(maps.unstack()):
        metadata = {"seed": seed + p, "device": str(device), "rollbacks": rollbacks,
                    "init": _init_name(init, config),
                    "start_overlap": overlaps[p]}
        if caller == "fit_pairs":
            metadata.update(batch_size=n_pairs, pair_index=p, batch_elapsed_s=elapsed)
        results.append(RegistrationResult(
            pair, moving_grid=moving_grids[p], fixed_grid=fixed_grids[p], config=config, backend=backend,
            history=history[p], elapsed_s=elapsed / n_pairs, metadata=metadata))
    return results
