"""The global stage: an affine map (and its exact inverse) fitted before the fields.

The affine is parametrised in physical coordinates centred on each domain's centre,
``p_A = L p_B + t`` with ``p = S (x - 1/2)`` and ``S = diag(extent)``, so that rotations are
rotations in millimetres (or voxels) whatever the grid shapes. ``phi_BA`` is the exact inverse.

Two ways in. From a known start (the headers' world alignment, the image centres or a given
transform; ``start=``), a rigid stage (rotation about the fixed image's centre and translation)
and then step 3 refine it. Otherwise (``"moments"``, today's default for bare arrays):

1. Start: the images' intensity centroids and an isotropic scale from their second moments.
2. Search: from that start under each candidate rotation, a short batched Adam run fits a
   similarity transform (scale, translation and, in 2D, the angle) on heavily blurred small
   images; the candidate with the lowest symmetric cost (1 - NCC, both directions: see
   :class:`_Cost`) wins. The scale stays within a factor 1.5 of the moments' estimate.
3. Refinement: Adam on the full affine with a blur schedule, on images resampled to at most
   ``working_size`` voxels per axis, minimising ``AffineConfig.refinement_cost`` (default
   1 - NCC; ``"ssd"`` for the symmetric SSD, ``"mi"`` for minus the mutual information) inside
   the images' masks when there are any; its singular values stay within a factor 2 of the
   search's scale, which rules out collapsed maps.

With ``native=True`` on the CPU, each step's cost and gradient come from the compiled
``affine_ncc`` kernel (the same function as the torch operations; ``fit_pair`` uses it with the
native backend). With ``cuda_graphs=True`` on a GPU, the steps of the search and of each stage of
the refinement are captured as a CUDA graph and replayed (:class:`~neuralfield_reg._graphs.CapturedStep`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .._graphs import CapturedStep
from .._optim import make_adam
from ..encoders.fused import MEASURES
from ..config import AffineConfig
from ..geometry.coords import identity_grid, sample_batch
from ..geometry.filters import gaussian_blur, resample
from ..losses.similarity import MI_BINS, mi


@dataclass(frozen=True)
class AffineTransform:
    """``p_A = linear @ p_B + translation`` in centred physical coordinates.

    ``linear`` is ``(..., d, d)`` and ``translation`` ``(..., d)``: a batch of transforms is allowed.
    """

    linear: torch.Tensor
    translation: torch.Tensor
    extent_A: tuple[float, ...]
    extent_B: tuple[float, ...]

    def unit_AB(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matrix, offset)`` of phi_AB in unit coordinates: ``x_A = matrix @ x_B + offset``."""
        return _unit_affine(self.linear, self.translation, self.extent_A, self.extent_B)

    def unit_BA(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matrix, offset)`` of phi_BA = phi_AB^-1 in unit coordinates."""
        inverse = torch.linalg.inv(self.linear)
        return _unit_affine(inverse, -(inverse @ self.translation[..., None])[..., 0], self.extent_B, self.extent_A)


def _unit_affine(linear, translation, extent_to, extent_from):
    s_to = torch.as_tensor(extent_to, dtype=linear.dtype, device=linear.device)
    s_from = torch.as_tensor(extent_from, dtype=linear.dtype, device=linear.device)
    matrix = linear * s_from / s_to[:, None]
    offset = 0.5 + translation / s_to - (matrix @ torch.full_like(s_from, 0.5)[:, None])[..., 0]
    return matrix, offset


def _apply(matrix: torch.Tensor, offset: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(..., d, d)``, ``(..., d)`` applied to ``(P, d)`` points -> ``(..., P, d)``."""
    return points @ matrix.transpose(-1, -2) + offset[..., None, :]


def _moments(image: torch.Tensor, extent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity centroid ``(d,)`` and covariance ``(d, d)`` in centred physical coordinates."""
    weights = image - image.min()
    weights = weights / weights.sum().clamp_min(1e-12)
    points = (identity_grid(image.shape, dtype=image.dtype, device=image.device) - 0.5) * extent
    points = points.reshape(-1, image.ndim)
    w = weights.reshape(-1, 1)
    centroid = (w * points).sum(0)
    centred = points - centroid
    covariance = (w * centred).T @ centred
    return centroid, covariance


def _rotation_2d(angle: torch.Tensor) -> torch.Tensor:
    """``(..., 2, 2)`` rotation matrices of angles ``(...)``."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _rotation_3d(angles: Sequence[float]) -> torch.Tensor:
    rotation = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        step = torch.eye(3, dtype=torch.float64)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    return rotation


def candidate_rotations(dim: int, steps_2d: int = 36) -> torch.Tensor:
    """``(K, d, d)`` rotations tried by the search: a full circle in 2D; +-30 degrees about each
    axis (27 combinations) in 3D."""
    if dim == 2:
        return _rotation_2d(torch.arange(steps_2d, dtype=torch.float64) * (2.0 * math.pi / steps_2d))
    angles = (-math.pi / 6.0, 0.0, math.pi / 6.0)
    return torch.stack([_rotation_3d(combo) for combo in itertools.product(angles, repeat=3)])


# The refinement's singular values stay within this factor of the search's scale.
_REFINE_SCALE_FACTOR = 2.0


def _working_shape(shape: Sequence[int], size: int) -> tuple[int, ...]:
    factor = min(1.0, size / max(shape))
    return tuple(max(4, int(round(n * factor))) for n in shape)


_NCC_EPS = 1e-8          # losses.similarity.ncc's default


class _NativeTerm(torch.autograd.Function):
    """The correlation (``"ncc"``), the mean squared difference (``"ssd"``) or minus the mutual
    information (``"mi"``) of ``K`` affine maps (``(K, d, d)``, ``(K, d)``) in one call of the
    compiled ``affine_ncc`` kernel, which also returns its gradient with respect to the maps."""

    @staticmethod
    def forward(ctx, matrices, offsets, kernels, image, points, target, kind):
        value, grad_matrices, grad_offsets = kernels.affine_ncc(image, points, target, matrices.contiguous(),
                                                                offsets.contiguous(), _NCC_EPS,
                                                                MEASURES.index(kind), MI_BINS)
        ctx.save_for_backward(grad_matrices, grad_offsets)
        return value

    @staticmethod
    def backward(ctx, grad):
        grad_matrices, grad_offsets = ctx.saved_tensors
        return grad[:, None, None] * grad_matrices, grad[:, None] * grad_offsets, None, None, None, None, None


class _Cost:
    """The symmetric cost of a batch of affine maps: ``1 - NCC`` (``kind="ncc"``), the mean
    squared difference (``kind="ssd"``) or minus the mutual information (``kind="mi"``,
    :func:`~neuralfield_reg.losses.similarity.mi` with its default bins) of ``moving o phi_AB``
    against ``fixed`` plus that of ``fixed o phi_BA`` against ``moving``, for one pair of images
    evaluated many times (the search's and the refinement's steps), with the fixed parts computed
    once. With ``masks`` (``(moving_mask, fixed_mask)``, boolean, on the images' grids), each
    direction compares only the voxels inside its target image's mask.

    NCC for the search: between thin outlines of different shapes (a triangle and a circle) the
    SSD is lowest when the outlines do not overlap at all, and a map that collapses onto
    background lowers it too; the correlation rewards overlap and is undefined (not small) for a
    constant warped image.

    Each target image is centred once; the correlation of a warped row ``w`` is then
    ``cov(w, t) / sqrt(var(w) var(t) + 1e-8)``, as :func:`~neuralfield_reg.losses.similarity.ncc`
    computes it (the 1e-8 matters at heavy blur, where the variances are small). With
    ``kernels`` (the compiled module, CPU images), sampling, correlation and their gradient are
    one ``affine_ncc`` call per direction: a 2D step is otherwise bound by the overhead of ~250
    small tensor operations, and a 3D search by the autograd of ``grid_sample``.
    """

    def __init__(self, moving: torch.Tensor, fixed: torch.Tensor, grid_moving: torch.Tensor,
                 grid_fixed: torch.Tensor, extent_moving: torch.Tensor, extent_fixed: torch.Tensor,
                 kernels=None, kind: str = "ncc", masks=(None, None)):
        dim = moving.ndim
        self.kernels, self.kind = kernels, kind
        if kernels is None:
            self.images = (moving[None, None], fixed[None, None])            # sampled by AB, by BA
        else:
            self.images = (moving.contiguous(), fixed.contiguous())
        grids = (grid_fixed.reshape(-1, dim), grid_moving.reshape(-1, dim))
        targets = (fixed.reshape(-1), moving.reshape(-1))
        kept = [None if mask is None else mask.reshape(-1) for mask in (masks[1], masks[0])]
        self.grids = tuple((g if k is None else g[k]).contiguous() for g, k in zip(grids, kept))
        targets = tuple(t if k is None else t[k] for t, k in zip(targets, kept))
        self.targets = targets if kind != "ncc" else tuple(values - values.mean() for values in targets)
        self.s_A, self.s_B = extent_moving, extent_fixed

    def __call__(self, linear: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """``(K,)`` costs of ``K`` transforms ``p_A = linear p_B + translation`` (``(K, d, d)``,
        ``(K, d)``; physical units, as :class:`AffineTransform`)."""
        inverse = torch.linalg.inv_ex(linear).inverse   # no error check: no host read (CUDA graphs)
        maps = (_unit_affine(linear, translation, self.s_A, self.s_B),
                _unit_affine(inverse, -(inverse @ translation[..., None])[..., 0], self.s_B, self.s_A))
        cost = 0.0
        for (matrix, offset), image, grid, target in zip(maps, self.images, self.grids, self.targets):
            if self.kernels is not None:
                value = _NativeTerm.apply(matrix, offset, self.kernels, image, grid, target, self.kind)
                cost = cost + (1.0 - value if self.kind == "ncc" else value)
                continue
            points = _apply(matrix, offset, grid)                                       # (K, P, d)
            warped = sample_batch(image, points.reshape(1, -1, grid.shape[1]))[0, 0].reshape(points.shape[:-1])
            if self.kind == "ssd":
                cost = cost + (warped - target).square().mean(-1)
                continue
            if self.kind == "mi":
                cost = cost + mi(warped, target.expand_as(warped), batched=True)
                continue
            centred = warped - warped.mean(-1, keepdim=True)
            covariance = (centred @ target) / target.shape[0]
            variance = centred.square().mean(-1) * target.square().mean()
            cost = cost + (1.0 - covariance / torch.sqrt(variance + _NCC_EPS))
        return cost


# A mask with fewer voxels than this at a level of the refinement's pyramid is not used there.
_MIN_MASKED = 16


class _Images:
    """Both images resampled to at most ``size`` voxels per axis, with their identity grids (and
    their masks, when given, resampled with each level)."""

    def __init__(self, moving: torch.Tensor, fixed: torch.Tensor, size: int, masks=(None, None)):
        self.moving = resample(moving, _working_shape(moving.shape, size))
        self.fixed = resample(fixed, _working_shape(fixed.shape, size))
        self.masks = tuple(None if mask is None else mask.to(moving.dtype) for mask in masks)
        self.grid_moving = identity_grid(self.moving.shape, dtype=moving.dtype, device=moving.device)
        self.grid_fixed = identity_grid(self.fixed.shape, dtype=fixed.dtype, device=fixed.device)

    def blurred(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_blur(self.moving, sigma), gaussian_blur(self.fixed, sigma)

    def level(self, sigma: float, max_shrink: int) -> tuple[torch.Tensor, ...]:
        """``(moving, fixed, grid_moving, grid_fixed)`` blurred by ``sigma`` voxels, then shrunk
        by the largest power of two <= ``min(sigma, max_shrink)``: a blur of ``sigma`` voxels
        leaves nothing that a grid ``sigma`` times coarser loses, and a step there costs
        ``shrink^d`` times less (a resolution pyramid, as ANTs' and Greedy's affine stages run)."""
        moving, fixed = self.blurred(sigma)
        shrink = 1
        while shrink * 2 <= min(sigma, max_shrink):
            shrink *= 2
        if shrink > 1:
            moving = resample(moving, tuple(max(4, -(-n // shrink)) for n in moving.shape))
            fixed = resample(fixed, tuple(max(4, -(-n // shrink)) for n in fixed.shape))
        masks = tuple(None if mask is None else resample(mask, image.shape) > 0.5
                      for mask, image in zip(self.masks, (moving, fixed)))
        # a mask that leaves (almost) nothing at this level (a small object on a coarse grid): all voxels
        masks = tuple(None if mask is None or int(mask.sum()) < _MIN_MASKED else mask for mask in masks)
        return (moving, fixed, identity_grid(moving.shape, dtype=moving.dtype, device=moving.device),
                identity_grid(fixed.shape, dtype=fixed.dtype, device=fixed.device), masks)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(d, d)`` proper rotation of one angle (2D) or a rotation vector (3D, radians)."""
    if angles.numel() == 1:
        return _rotation_2d(angles[0])
    zero = torch.zeros((), dtype=angles.dtype, device=angles.device)
    skew = torch.stack([torch.stack([zero, -angles[2], angles[1]]), torch.stack([angles[2], zero, -angles[0]]),
                        torch.stack([-angles[1], angles[0], zero])])
    return torch.linalg.matrix_exp(skew)


def _descend(images: _Images, config: AffineConfig, steps: int, parameters: list[torch.Tensor], current,
             costs, project=None, kernels=None, capture: bool = False) -> None:
    """Adam on ``parameters`` over the refinement's blur schedule, ``steps`` in all (stages of equal
    length, the last takes the remainder). ``current()`` gives the ``(linear, translation / length)``
    being fitted, ``costs(moving, fixed)`` builds the cost of one stage, ``project()`` (optional)
    runs after each step; ``kernels``: the compiled module for native Adam steps, or None;
    ``capture``: each stage's step as a CUDA graph (on CUDA, see :class:`CapturedStep`)."""
    optimizer = make_adam(parameters, config.learning_rate, kernels, capturable=capture)
    per_stage = max(1, steps // len(config.blur_sigmas))
    for stage, sigma in enumerate(config.blur_sigmas):
        cost = costs(*images.level(sigma, config.max_shrink))
        last = stage == len(config.blur_sigmas) - 1

        def step(cost=cost):
            linear, translation = current()
            cost(linear[None], translation[None])[0].backward()
            optimizer.step()
        runner = CapturedStep(step, optimizer.zero_grad, parameters[0].device, capture, "fit: the affine stage's step")
        for _ in range(max(0, steps - per_stage * stage if last else per_stage)):
            runner()
            if project is not None:
                project()


def moments_start(moving: torch.Tensor, fixed: torch.Tensor, extent_moving: Sequence[float],
                  extent_fixed: Sequence[float], orientation=None) -> AffineTransform:
    """The moments start of the search: the fixed image's intensity centroid onto the moving one's,
    with the isotropic scale of their second moments (clamped to [1/4, 4]) times ``orientation``
    (``(d, d)``, how the moving image's axes sit relative to the fixed's; identity by default)."""
    dtype = torch.float64
    s_A = torch.tensor(extent_moving, dtype=dtype, device=moving.device)
    s_B = torch.tensor(extent_fixed, dtype=dtype, device=moving.device)
    centroid_A, covariance_A = _moments(moving.to(dtype), s_A)
    centroid_B, covariance_B = _moments(fixed.to(dtype), s_B)
    scale = torch.sqrt(torch.trace(covariance_A).clamp_min(1e-12) / torch.trace(covariance_B).clamp_min(1e-12))
    linear = scale.clamp(0.25, 4.0) * _orientation(orientation, moving.ndim, moving.device)
    return AffineTransform(linear, centroid_A - linear @ centroid_B, tuple(extent_moving), tuple(extent_fixed))


def _orientation(orientation, dim: int, device) -> torch.Tensor:
    if orientation is None:
        return torch.eye(dim, dtype=torch.float64, device=device)
    return torch.as_tensor(orientation, dtype=torch.float64, device=device)


def fit_affine(moving: torch.Tensor, fixed: torch.Tensor, extent_moving: Sequence[float],
               extent_fixed: Sequence[float], config: AffineConfig = AffineConfig(), *,
               native: bool = False, start: AffineTransform | None = None,
               orientation=None, masks=(None, None), cuda_graphs: bool = False) -> AffineTransform:
    """Fit the affine stage between two images normalised to [0, 1].

    Args:
        moving, fixed: ``(*spatial)`` images (shapes may differ, same number of axes).
        extent_moving, extent_fixed: physical size of each domain per axis.
        native: on the CPU, compute the cost and its gradient with the compiled ``affine_ncc``
            kernel (the same function; raises ``NativeBuildError`` when the kernels are
            unavailable); otherwise with torch operations.
        start: a known start (from the headers, the image centres or the user), in the centred
            physical frames: refined by ``config.rigid_iterations`` rigid steps (a rotation about
            the fixed image's centre and a translation), then by the affine refinement; no
            moments, no rotation search.
        orientation: without ``start``, ``(d, d)`` local linear part of the world identity
            (:func:`~neuralfield_reg.transforms.world.orientation`): the moments start and the
            search's candidates are rotations of it, so that images stored with flipped or
            permuted axes are searched in the right handedness. Default identity.
        masks: ``(moving_mask, fixed_mask)``, boolean ``(*spatial)`` masks of the two images (or
            None): the rigid and affine refinement compare each direction only inside its target
            image's mask (e.g. the foreground, so a skull around one brain and not the other does
            not pull the map towards scaling one head onto the other's brain).
        cuda_graphs: capture the steps as CUDA graphs (on a CUDA device; the torch operations and
            a capturable Adam run them, elsewhere eagerly).
    """
    dim = moving.ndim
    dtype, device = torch.float64, moving.device
    kernels = None
    if native and device.type == "cpu":
        from .._cuda_ext import load
        kernels = load()
    capture = cuda_graphs and kernels is None
    s_A = torch.tensor(extent_moving, dtype=dtype, device=device)
    s_B = torch.tensor(extent_fixed, dtype=dtype, device=device)
    moving64, fixed64 = moving.to(dtype), fixed.to(dtype)
    # Translations are optimised in units of the mean extent so that one learning rate suits all.
    length = float(torch.cat([s_A, s_B]).mean())

    def transform(linear, translation):
        return AffineTransform(linear, translation * length, tuple(extent_moving), tuple(extent_fixed))

    def costs(kind):
        def build(moving_s, fixed_s, grid_moving, grid_fixed, masks):
            cost = _Cost(moving_s, fixed_s, grid_moving, grid_fixed, s_A, s_B, kernels, kind, masks)
            return lambda linear, translation: cost(linear, translation * length)
        return build

    images = _Images(moving64, fixed64, config.working_size, masks)
    if start is None:
        linear, translation = _search(moving64, fixed64, s_A, s_B, config, kernels, length,
                                      None if orientation is None else _orientation(orientation, dim, device),
                                      capture)
    else:
        linear0 = torch.as_tensor(start.linear, dtype=dtype, device=device)
        translation0 = torch.as_tensor(start.translation, dtype=dtype, device=device) / length
        angles = torch.zeros(1 if dim == 2 else 3, dtype=dtype, device=device, requires_grad=True)
        shift = torch.zeros(dim, dtype=dtype, device=device, requires_grad=True)

        def rigid():
            return linear0 @ _rotation(angles), translation0 + shift

        if config.rigid_iterations > 0:
            _descend(images, config, config.rigid_iterations, [angles, shift], rigid, costs(config.refinement_cost),
                     kernels=kernels, capture=capture)
        with torch.no_grad():
            linear, translation = (value.detach().clone() for value in rigid())
    # The refinement keeps each singular value of the linear part within a factor of 2 of the
    # start's scale: like the search's bound, this rules out collapsing a map (rank ~1). Since no
    # singular value reaches 0, the determinant keeps its sign: no reflection appears.
    search_scale = float(torch.linalg.svdvals(linear).mean())
    singular_bounds = (search_scale / _REFINE_SCALE_FACTOR, search_scale * _REFINE_SCALE_FACTOR)

    def bound_singular_values():
        with torch.no_grad():
            u, singular, vh = torch.linalg.svd(linear)
            if singular.min() < singular_bounds[0] or singular.max() > singular_bounds[1]:
                linear.copy_(u @ torch.diag(singular.clamp(*singular_bounds)) @ vh)

    if config.iterations > 0:
        linear.requires_grad_(True)
        translation.requires_grad_(True)
        _descend(images, config, config.iterations, [linear, translation], lambda: (linear, translation),
                 costs(config.refinement_cost), bound_singular_values, kernels=kernels, capture=capture)
    return transform(linear.detach(), translation.detach())


def _search(moving64, fixed64, s_A, s_B, config: AffineConfig, kernels, length: float,
            orientation: torch.Tensor | None, capture: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of the module docstring: the moments start under each candidate rotation (of
    ``orientation``), a short batched similarity fit of each, the best one. Returns ``(linear,
    translation / length)``."""
    dim, dtype, device = moving64.ndim, moving64.dtype, moving64.device
    centroid_A, covariance_A = _moments(moving64, s_A)
    centroid_B, covariance_B = _moments(fixed64, s_B)
    scale = torch.sqrt(torch.trace(covariance_A).clamp_min(1e-12) / torch.trace(covariance_B).clamp_min(1e-12))
    log_scale0 = float(torch.log(scale.clamp(0.25, 4.0)))
    # The search keeps the scale within a factor of 1.5 of the moments' estimate: on thin or
    # hollow structures a similarity can also improve by shrinking a map onto a part of the
    # image, a degenerate minimum that the moments rule out.
    log_scale_bounds = (log_scale0 - math.log(1.5), log_scale0 + math.log(1.5))

    rotations = candidate_rotations(dim, config.rotation_steps_2d).to(device) if config.rotation_search \
        else torch.eye(dim, dtype=dtype, device=device)[None]
    if orientation is not None:
        rotations = orientation @ rotations
    count = rotations.shape[0]
    log_scale = torch.full((count,), log_scale0, dtype=dtype, device=device, requires_grad=True)
    angle = torch.zeros(count, dtype=dtype, device=device, requires_grad=True)

    def similarity(log_scale, angle, translation=None):
        linear = torch.exp(log_scale)[:, None, None] * rotations
        if dim == 2:
            linear = linear @ _rotation_2d(angle)
        if translation is None:  # the moments start: centroid of B onto centroid of A
            translation = (centroid_A - (linear @ centroid_B[:, None])[..., 0]) / length
        return linear, translation

    translation = similarity(log_scale, angle)[1].detach().clone().requires_grad_(True)
    if config.search_iterations > 0:
        images = _Images(moving64, fixed64, config.search_size)
        cost = _Cost(*images.blurred(config.search_sigma), images.grid_moving, images.grid_fixed, s_A, s_B,
                     kernels)
        optimizer = make_adam([log_scale, angle, translation], config.search_learning_rate, kernels,
                              capturable=capture)

        def step():
            linear, physical = similarity(log_scale, angle, translation)
            cost(linear, physical * length).sum().backward()   # candidates are independent: one batched step
            optimizer.step()
            with torch.no_grad():
                log_scale.clamp_(*log_scale_bounds)
        runner = CapturedStep(step, optimizer.zero_grad, device, capture, "fit: the affine search's step")
        for _ in range(config.search_iterations):
            runner()
        with torch.no_grad():
            linear, physical = similarity(log_scale, angle, translation)
            best = int(torch.argmin(cost(linear, physical * length)))
    else:
        best = 0
    with torch.no_grad():
        linear, translation = similarity(log_scale, angle, translation)
    return linear[best].detach().clone(), translation[best].detach().clone()
