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

import numpy as np
import torch
from tqdm.auto import tqdm

from .affine import fit_affine
from .config import FitConfig
from .coords import identity_grid, physical_extent, sample
from .encoders import resolve_backend
from .fields import MapPair
from .filters import gaussian_blur
from .losses import SIMILARITIES, inverse_consistency_terms
from .result import RegistrationResult
from .validation import check_image, check_spacing


# With on_divergence="rollback", the state is kept every this many iterations.
_GOOD_STATE_EVERY = 10


class FitDivergedError(RuntimeError):
    """The optimisation produced a NaN or Inf; the message names the iteration and the term."""


def _split_spacing(spacing, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``spacing`` is one voxel size for both images, or ``(moving_spacing, fixed_spacing)``."""
    if spacing is not None and not isinstance(spacing, (int, float)) and len(spacing) == 2 \
            and all(isinstance(s, (list, tuple, np.ndarray)) for s in spacing):
        return check_spacing("spacing[0]", spacing[0], ndim), check_spacing("spacing[1]", spacing[1], ndim)
    one = check_spacing("spacing", spacing, ndim)
    return one, one


def normalize_intensity(name: str, image: torch.Tensor) -> torch.Tensor:
    """Scale an image linearly to [0, 1] (computed in float64, returned as float32, so intensities
    near the float32 limits do not overflow); a constant image cannot be registered and raises."""
    image = image.double()
    low, high = image.min(), image.max()
    if not bool(high > low):
        raise ValueError(f"{name}: the image is constant ({float(low)}); there is nothing to register")
    if not bool(torch.isfinite(high - low)):
        raise ValueError(f"{name}: the intensity range [{float(low)}, {float(high)}] is too large to rescale")
    return ((image - low) / (high - low)).float()


def level_weights(iteration: int, config: FitConfig, n_levels: int, device) -> torch.Tensor:
    """Weights in [0, 1] per hash-grid level: a ramp from ``start_levels`` to all levels."""
    ramp_iterations = config.level_ramp * config.iterations
    progress = 1.0 if ramp_iterations <= 0 else min(1.0, iteration / ramp_iterations)
    active = config.start_levels + progress * (n_levels - config.start_levels)
    return (active - torch.arange(n_levels, device=device, dtype=torch.float32)).clamp(0.0, 1.0)


def fit_pair(moving, fixed, config: FitConfig = FitConfig(), *, spacing=None, device=None,
             seed: int = 0, progress: bool = True) -> RegistrationResult:
    """Register a moving image A to a fixed image B with a pair of neural fields.

    Args:
        moving, fixed: numpy arrays or tensors, ``(H, W)`` or ``(D, H, W)``, same number of axes
            (grid shapes may differ). Intensities are rescaled to [0, 1] internally.
        config: :class:`FitConfig`; defaults are the measured ones printed in the README.
        spacing: voxel size per axis for both images (None: 1), or ``(moving_spacing,
            fixed_spacing)``. The inverse-consistency penalty is measured in physical units.
        device: where to fit; default the moving tensor's device, else CPU.
        seed: seeds the network initialisation and the random points (same seed and inputs give
            the same result on the CPU).
        progress: show a tqdm progress bar.
    Returns:
        A :class:`RegistrationResult`.
    Raises:
        FitDivergedError: a loss term became NaN or Inf (the message says when and which).
    """
    if not isinstance(config, FitConfig):
        raise TypeError(f"config: expected a FitConfig, got {type(config).__name__}")
    if device is None:
        device = moving.device if isinstance(moving, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    moving_t, _ = check_image("moving", moving, device=device)
    fixed_t, _ = check_image("fixed", fixed, device=device)
    if moving_t.ndim != fixed_t.ndim:
        raise ValueError(f"moving and fixed: expected the same number of axes, got shapes "
                         f"{tuple(moving_t.shape)} and {tuple(fixed_t.shape)}")
    dim = moving_t.ndim
    moving_spacing, fixed_spacing = _split_spacing(spacing, dim)
    moving_t = normalize_intensity("moving", moving_t)
    fixed_t = normalize_intensity("fixed", fixed_t)
    config = config.resolved(fixed_t.shape)
    backend = resolve_backend(config.backend, device)

    start_time = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    extent_A = physical_extent(moving_t.shape, moving_spacing)
    extent_B = physical_extent(fixed_t.shape, fixed_spacing)

    affine_AB = affine_BA = None
    if config.affine is not None:
        transform = fit_affine(moving_t, fixed_t, extent_A, extent_B, config.affine)
        affine_AB, affine_BA = transform.unit_AB(), transform.unit_BA()
    with torch.random.fork_rng(devices=[]):      # the maps are initialised on the CPU, then moved
        torch.manual_seed(seed)
        maps = MapPair(dim, encoding=config.encoding, hidden_widths=config.hidden_widths,
                       output_scale=config.output_scale, backend=backend,
                       affine_AB=affine_AB, affine_BA=affine_BA).to(device)
    optimizer = torch.optim.Adam(maps.parameters(), lr=config.learning_rate)
    learning_rate_scale = 1.0          # lowered by each rollback

    def learning_rate(iteration: int) -> float:
        """Cosine from ``learning_rate`` to ``learning_rate * learning_rate_decay``."""
        cosine = 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, config.iterations - 1)))
        decay = config.learning_rate_decay
        return learning_rate_scale * config.learning_rate * (decay + (1.0 - decay) * cosine)

    grid_A = identity_grid(moving_t.shape, device=device).reshape(-1, dim)
    grid_B = identity_grid(fixed_t.shape, device=device).reshape(-1, dim)
    stages = [(gaussian_blur(moving_t, s), gaussian_blur(fixed_t, s)) for s in config.blur_sigmas]
    similarity = SIMILARITIES[config.similarity]
    n_levels = config.encoding.n_levels
    history: dict[str, list[float]] = {"loss": [], "similarity": [], "gradient_icon": []}
    if config.icon_weight > 0:
        history["icon"] = []

    def similarity_points(grid):
        """All voxels, or a random subset: ``(points, flat voxel indices or None)``."""
        if config.similarity == "lncc" or config.similarity_points is None \
                or config.similarity_points >= grid.shape[0]:
            return grid, None                     # lncc needs whole images (neighbourhoods)
        index = torch.randint(grid.shape[0], (config.similarity_points,), generator=generator, device=device)
        return grid[index], index

    def similarity_term(source, target, mapped, index):
        warped = sample(source, mapped)
        if config.similarity == "lncc":
            return similarity(warped.reshape(target.shape), target, window=config.lncc_window)
        target_values = target.reshape(-1) if index is None else target.reshape(-1)[index]
        # Only where the map lands inside the other image's domain: outside it there is nothing
        # to compare (padding would invent structure, e.g. streaks from a shape cut by the border).
        inside = ((mapped >= 0) & (mapped <= 1)).all(-1)
        if int(inside.sum()) < 16:
            return similarity(warped, target_values)
        return similarity(warped[inside], target_values[inside])

    good_state, rollbacks = None, []
    bar = tqdm(total=config.iterations, disable=not progress, desc="fit_pair", leave=False)
    iteration = 0
    while iteration < config.iterations:
        stage = min(iteration * len(stages) // config.iterations, len(stages) - 1)
        moving_s, fixed_s = stages[stage]
        weights = level_weights(iteration, config, n_levels, device)

        optimizer.zero_grad(set_to_none=True)
        points_B, index_B = similarity_points(grid_B)
        points_A, index_A = similarity_points(grid_A)
        mapped_B, mapped_A = maps(points_B, points_A, weights)      # phi_AB on B's grid, phi_BA on A's
        terms = {"similarity": similarity_term(moving_s, fixed_s, mapped_B, index_B)
                 + similarity_term(fixed_s, moving_s, mapped_A, index_A)}
        points = torch.rand(config.gradient_icon_points, dim, generator=generator, device=device)
        consistency = inverse_consistency_terms(lambda a, b: maps(a, b, weights), points,
                                                extent_A=extent_A, extent_B=extent_B)
        terms["gradient_icon"] = consistency["gradient_icon"]
        loss = terms["similarity"] + config.gradient_icon_weight * terms["gradient_icon"]
        if config.icon_weight > 0:
            terms["icon"] = consistency["icon"]
            loss = loss + config.icon_weight * terms["icon"]
        values = {name: value.item() for name, value in terms.items()}
        values["loss"] = loss.item()
        bad = [name for name, value in values.items() if not np.isfinite(value)]
        if bad:
            message = (f"fit_pair: the {bad[0]} term became {values[bad[0]]} at iteration {iteration}")
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
            rollbacks.append({"iteration": iteration, "term": bad[0], "learning_rate_scale": learning_rate_scale})
            for name in history:
                del history[name][iteration:]
            bar.n = iteration
            continue
        if config.on_divergence == "rollback" and iteration % _GOOD_STATE_EVERY == 0:
            good_state = (iteration, copy.deepcopy(maps.state_dict()), copy.deepcopy(optimizer.state_dict()),
                          generator.get_state())
        for name, value in values.items():
            history[name].append(value)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration)
        loss.backward()
        optimizer.step()
        iteration += 1
        bar.update(1)
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{values['loss']:.4g}", gicon=f"{values['gradient_icon']:.3g}")
    bar.close()

    for name, parameter in maps.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise FitDivergedError(f"fit_pair: parameter {name} became non-finite in the last step")
    elapsed = time.perf_counter() - start_time
    return RegistrationResult(
        maps, moving_shape=moving_t.shape, fixed_shape=fixed_t.shape, moving_spacing=moving_spacing,
        fixed_spacing=fixed_spacing, config=config, backend=backend, history=history,
        elapsed_s=elapsed, metadata={"seed": seed, "device": str(device), "rollbacks": rollbacks})
