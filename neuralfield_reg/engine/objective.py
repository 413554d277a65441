"""The loss of a fit step, per pair: its terms and the gradients of the parameters.

    loss = sim(A o phi_AB, B) + sim(B o phi_BA, A) + gradient_icon_weight * gradient_icon
           (+ icon_weight * icon) (+ diffusion_weight * diffusion)

:func:`make_objective` picks once per fit how it is computed: by the fused CPU kernels
(similarity, penalty and their gradients in native calls, no autograd graph), or by autograd,
with either term handed to its fused kernel where one applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import FitConfig
from ..geometry.coords import sample_batch
from ..transforms.fields import MapPairs
from ..encoders.fused import (MEASURES, PenaltyInputs, SimilarityInputs, fused_loss_gradients, penalty_fused,
                              similarity_fused)
from ..losses import SIMILARITIES, inverse_consistency_terms
from .sampler import Draw, Points, Sampler, patch_shape

# A direction with fewer points mapped inside the other image than this compares all of them.
MIN_INSIDE = 16


@dataclass
class Step:
    """One step's values, each ``(B,)``: ``terms`` by name (``"loss"`` included), and the
    gradients of ``loss.sum()`` with respect to the field parameters when they were computed
    with the loss (else None: :meth:`backward` runs autograd)."""

    terms: dict[str, torch.Tensor]
    gradients: list[torch.Tensor] | None = None

    def values(self, names: list[str]) -> list[list[float]]:
        """``(B, len(names))`` plain floats, for the history and the divergence checks."""
        return torch.stack([self.terms[name].detach() for name in names], dim=1).tolist()

    def backward(self, parameters: list[torch.Tensor]) -> None:
        """Put the gradients into ``parameters``' ``.grad`` (pairs share no parameter: each gets
        its own gradient from the sum)."""
        if self.gradients is None:
            self.terms["loss"].sum().backward()
            return
        for parameter, gradient in zip(parameters, self.gradients, strict=True):
            parameter.grad = gradient


def compared_points(mapped: torch.Tensor, mask_values: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` which points a direction's similarity counts: those whose map lands inside the
    other image's domain (outside it there is nothing to compare; padding would invent structure)
    and, with a mask, inside the target's mask. A pair with fewer than ``MIN_INSIDE`` points
    inside compares all its points, and one that the mask leaves without any compares all.
    (``cuda_ext/similarity_cpu.cpp`` applies the same rule; ``tests/test_fused.py`` compares.)"""
    inside = ((mapped >= 0) & (mapped <= 1)).all(-1)
    inside = inside | (inside.sum(1, keepdim=True) < MIN_INSIDE)
    if mask_values is not None:
        inside = inside & mask_values
        inside = inside | ~inside.any(1, keepdim=True)
    return inside


class Objective:
    """The step's loss computed with autograd; the similarity (SSD, NCC or MI) and the penalty each go
    to their fused kernel (an autograd Function) when ``fused_similarity`` / ``fused_penalty``."""

    def __init__(self, config: FitConfig, maps: MapPairs, sampler: Sampler, masks: dict, extents: tuple,
                 fused_similarity: bool = False, fused_penalty: bool = False):
        self.config, self.maps, self.sampler, self.masks = config, maps, sampler, masks
        self.extent_A, self.extent_B = extents
        # The extents as tensors on the fit's device, made once: the autograd penalty then copies
        # nothing from the host during a step (a CUDA graph could not capture that copy). Float32,
        # the maps' dtype, so that no cast is needed either.
        self.extent_tensors = tuple(None if e is None else
                                    torch.as_tensor(e, dtype=torch.float32, device=sampler.device) for e in extents)
        self.fused_similarity, self.fused_penalty = fused_similarity, fused_penalty
        self.similarity = SIMILARITIES[config.similarity]
        self.names = (["loss", "similarity", "gradient_icon"] + (["icon"] if config.icon_weight > 0 else [])
                      + (["diffusion"] if config.diffusion_weight > 0 else []))

    def penalty_inputs(self, draw: Draw) -> PenaltyInputs:
        """The fused penalty kernel's inputs: the drawn points, both weights, the extents."""
        config = self.config
        return PenaltyInputs(draw.penalty, config.gradient_icon_weight, self.extent_A, self.extent_B,
                             config.diffusion_weight)

    def __call__(self, images: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor, draw: Draw) -> Step:
        moving, fixed = images
        config = self.config
        terms = {"similarity": self._similarity(moving, fixed, weights, draw)}
        if self.fused_penalty:
            penalty, terms["gradient_icon"], terms["diffusion"] = penalty_fused(
                self.maps, self.penalty_inputs(draw), level_weights=weights)
        else:
            # The maps' linear parts only with a diffusion term (its Jacobians come from the same evaluation).
            matrices = self.maps.matrices
            linear = (matrices[0::2], matrices[1::2]) if config.diffusion_weight > 0 else (None, None)
            consistency = inverse_consistency_terms(lambda a, b: self.maps(a, b, weights), draw.penalty,
                                                    extent_A=self.extent_tensors[0],
                                                    extent_B=self.extent_tensors[1],
                                                    linear_AB=linear[0], linear_BA=linear[1])
            terms["gradient_icon"] = consistency["gradient_icon"]
            penalty = config.gradient_icon_weight * terms["gradient_icon"]
            if config.icon_weight > 0:
                terms["icon"] = consistency["icon"]
                penalty = penalty + config.icon_weight * terms["icon"]
            if config.diffusion_weight > 0:
                terms["diffusion"] = consistency["diffusion"]
                penalty = penalty + config.diffusion_weight * terms["diffusion"]
        terms["loss"] = terms["similarity"] + penalty
        return Step(terms)

    def fused_inputs(self, moving: torch.Tensor, fixed: torch.Tensor, draw: Draw) -> SimilarityInputs:
        """The fused similarity kernel's inputs for the drawn points."""
        at_points = self.sampler.at_points

        def mask_at(key: str, points: Points):
            mask = self.masks[key]
            return None if mask is None else at_points(mask, points.index).to(points.points.dtype)

        return SimilarityInputs(moving[:, 0], fixed[:, 0], draw.B.points, at_points(fixed, draw.B.index),
                                draw.A.points, at_points(moving, draw.A.index), masks_B=mask_at("B", draw.B),
                                masks_A=mask_at("A", draw.A), measure=self.config.similarity,
                                bins=self.config.mi_bins)

    def _similarity(self, moving, fixed, weights, draw: Draw) -> torch.Tensor:
        if self.fused_similarity:
            return similarity_fused(self.maps, self.fused_inputs(moving, fixed, draw), level_weights=weights)
        mapped_B, mapped_A = self.maps(draw.B.points, draw.A.points, weights)   # phi_AB on B's grid, phi_BA on A's
        return (self._direction(moving, fixed, mapped_B, draw.B.index, self.masks["B"])
                + self._direction(fixed, moving, mapped_A, draw.A.index, self.masks["A"]))

    def _direction(self, sources, targets, mapped, index, mask) -> torch.Tensor:
        """Per pair ``(B,)``: ``sources`` sampled at ``mapped`` against ``targets`` (only where
        ``mask``, the target image's mask, is set, when there is one)."""
        config, similarity, n_pairs = self.config, self.similarity, self.sampler.n_pairs
        warped = sample_batch(sources, mapped)[:, 0]                              # (B, N)
        target_values = self.sampler.at_points(targets, index)
        if config.similarity != "lncc":
            mask_values = None if mask is None else self.sampler.at_points(mask, index)
            options = {"bins": config.mi_bins} if config.similarity == "mi" else {}
            return similarity(warped, target_values, batched=True, weights=compared_points(mapped, mask_values),
                              **options)
        if index is None:
            return similarity(warped.reshape(n_pairs, *targets.shape[2:]), targets[:, 0],
                              window=config.lncc_window, batched=True, weights=mask)
        patch = patch_shape(targets.shape[2:], config.lncc_patch_size)
        # With a mask, every patch holds its (masked) centre voxel, so no patch is all-zero.
        weights = None if mask is None else torch.gather(mask.reshape(n_pairs, -1), 1, index).reshape(-1, *patch)
        per_patch = similarity(warped.reshape(-1, *patch), target_values.reshape(-1, *patch),
                               window=config.lncc_window, batched=True, weights=weights)
        return per_patch.reshape(n_pairs, -1).mean(1)


class FusedObjective(Objective):
    """The similarity (SSD, NCC or MI) and the penalty terms (gradient-ICON, diffusion) in the fused CPU
    kernels, their gradients summed in one set of buffers: no autograd graph, :meth:`Step.backward`
    assigns the gradients."""

    def __call__(self, images, weights, draw: Draw) -> Step:
        loss, similarity, penalty, smoothness, gradients = fused_loss_gradients(
            self.maps, self.fused_inputs(*images, draw), self.penalty_inputs(draw), level_weights=weights)
        return Step({"similarity": similarity, "gradient_icon": penalty, "diffusion": smoothness, "loss": loss},
                    gradients)


def make_objective(config: FitConfig, maps: MapPairs, sampler: Sampler, masks: dict, extents: tuple) -> Objective:
    """The objective of a fit: fused kernels wherever they apply (the native backend on the CPU;
    SSD, NCC or MI with as many points in both directions; the penalty without plain ICON), else
    autograd."""
    fusable = maps.fields.fused_for(sampler.grids["B"][:1])
    fused_similarity = fusable and config.similarity in MEASURES and sampler.count("A") == sampler.count("B")
    fused_penalty = fusable and config.icon_weight == 0
    kind: Callable = FusedObjective if fused_similarity and fused_penalty else Objective
    return kind(config, maps, sampler, masks, extents, fused_similarity=fused_similarity, fused_penalty=fused_penalty)
