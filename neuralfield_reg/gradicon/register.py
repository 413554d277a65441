"""register(): one pair through a trained network, optionally fine-tuned on that pair."""

from __future__ import annotations

import copy
import math
import time

import torch

from ..geometry.filters import resample
from ..registration.fit import FitDivergedError, _check_images, _split_spacing
from ..transforms.grid_maps import GridMapPair
from ..registration.result import RegistrationResult
from .losses import registration_loss
from .wrappers import RegistrationNetwork


def register(network: RegistrationNetwork, moving, fixed, *, finetune_steps: int = 0,
             loss: str = "gradicon", similarity: str = "lncc", lam: float | None = None,
             lr: float = 2.5e-4, lncc_window: int = 5, spacing=None, device=None, seed: int = 0,
             progress: bool = False) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained network.

    The images are rescaled to [0, 1] and resampled onto ``network.input_shape`` (when set;
    else onto the fixed image's grid). The maps are functions of unit coordinates, so the result
    applies to the images at their own resolution, like one from :func:`~neuralfield_reg.fit_pair`.

    Args:
        network: a trained :class:`RegistrationNetwork`; it is not modified.
        moving, fixed: numpy arrays or tensors, ``(H, W)`` or ``(D, H, W)``.
        finetune_steps: Adam steps on this pair alone (instance optimisation of a copy of the
            network's weights) with ``loss``, ``similarity``, ``lam``, ``lr``, ``lncc_window``.
        spacing: voxel sizes, as for ``fit_pair`` (used by the Jacobian determinant).
        device: where to run (default: where the network is).
        seed: seeds the fine-tuning noise.
    Returns:
        A :class:`~neuralfield_reg.RegistrationResult` (``metadata["method"] == "conv_network"``).
    """
    if not isinstance(network, RegistrationNetwork):
        raise TypeError(f"network: expected a gradicon RegistrationNetwork, got {type(network).__name__}")
    if not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValueError(f"finetune_steps: expected a non-negative integer, got {finetune_steps!r}")
    device = torch.device(device) if device is not None else next(network.parameters()).device
    started = time.perf_counter()
    moving_t, fixed_t = (images[0] for images in _check_images("register", [moving], [fixed], device))
    dim = moving_t.ndim
    shape = network.input_shape or tuple(fixed_t.shape)
    if len(shape) != dim:
        raise ValueError(f"moving: the network is for {len(shape)}D images {tuple(shape)}, got a "
                         f"{dim}D image of shape {tuple(moving_t.shape)}")
    moving_spacing, fixed_spacing = _split_spacing(spacing, dim)
    moving_n = resample(moving_t, shape)[None, None]               # checked and rescaled to [0, 1]
    fixed_n = resample(fixed_t, shape)[None, None]

    history: dict[str, list[float]] = {}
    if finetune_steps:
        network = copy.deepcopy(network).to(device).train()
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = {"loss": [], "similarity": [], "inverse_consistency": []}
        for step in range(finetune_steps):
            terms = registration_loss(network, moving_n, fixed_n, loss=loss, similarity=similarity,
                                      lam=lam, generator=generator, lncc_window=lncc_window)
            for name, value in terms.items():
                value = float(value.detach())
                if not math.isfinite(value):
                    raise FitDivergedError(f"register: the {name} term became {value} at fine-tuning "
                                           f"step {step}; lower lr")
                history[name].append(value)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
    network.eval()
    with torch.no_grad():
        phi_AB = network(moving_n, fixed_n)
        phi_BA = network(fixed_n, moving_n)
    maps = GridMapPair([g[0] for g in phi_AB.displacements], [g[0] for g in phi_BA.displacements])
    for name, grid in maps.named_buffers():
        if not bool(torch.isfinite(grid).all()):
            raise FitDivergedError(f"register: the network produced non-finite displacements ({name})")
    return RegistrationResult(
        maps, moving_shape=moving_t.shape, fixed_shape=fixed_t.shape, moving_spacing=moving_spacing,
        fixed_spacing=fixed_spacing, config=None, backend="torch", history=history,
        elapsed_s=time.perf_counter() - started,
        metadata={"method": "conv_network", "finetune_steps": finetune_steps, "loss": loss,
                  "similarity": similarity, "seed": seed, "device": str(device)})
