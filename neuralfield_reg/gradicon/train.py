"""Training a registration network over a dataset of pairs: Adam, progress, checkpoints, resume,
and data-parallel training across processes (``torch.distributed``, launched with ``torchrun``).

Batches come from a :class:`~torch.utils.data.DistributedSampler` (shuffled epochs; one
replica in a single process), read as one endless stream of indices, so the pairs of step ``k``
follow from ``k`` alone. The grid noise of the loss is drawn for the whole global batch by a
seeded CPU generator whose state is part of every checkpoint. A resumed run therefore takes
exactly the steps the uninterrupted run would have taken, and N processes, each with
``batch_size / N`` pairs, take the same steps as one process (up to float summation order).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..io.files import atomic_save, safe_load
from .._version import __version__
from ..registration.fit import FitDivergedError
from ..validation import as_tensor, describe
from .losses import DEFAULT_LAMBDA, registration_loss
from .wrappers import RegistrationNetwork

_FORMAT = "neuralfield_reg.gradicon.checkpoint"
_TERMS = ("loss", "similarity", "inverse_consistency")


def _network_dim(network: RegistrationNetwork) -> int | None:
    """The number of spatial axes of the network's images (its U-Nets'), if it says."""
    for module in network.modules():
        if isinstance(getattr(module, "dim", None), int) and module is not network:
            return module.dim
    return None


def _collate(pairs: Dataset, index: torch.Tensor, device, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1, *shape)`` moving and fixed batches from dataset items ``(moving, fixed)``; an item
    image may carry a leading channel axis of size 1, as torch datasets often yield."""
    movings, fixeds = [], []
    expected = "(H, W) or (D, H, W)" if dim is None else ("(H, W)" if dim == 2 else "(D, H, W)")
    for i in index.tolist():
        item = pairs[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"pairs: item {i} should be a (moving, fixed) pair, got {describe(item)}")
        for name, value, out in (("moving", item[0], movings), ("fixed", item[1], fixeds)):
            tensor, _ = as_tensor(f"pairs[{i}] {name}", value)
            if dim is not None and tensor.ndim == dim + 1 and tensor.shape[0] == 1:
                tensor = tensor[0]                       # (1, *spatial): one channel
            if tensor.ndim not in ((2, 3) if dim is None else (dim,)):
                raise ValueError(f"pairs: item {i}'s {name} image should be {expected} (optionally with a "
                                 f"leading channel of 1), got {describe(value)}")
            if not tensor.is_floating_point():
                raise TypeError(f"pairs: item {i}'s {name} image should be floating, got {tensor.dtype}")
            out.append(tensor.float())
    shapes = {tuple(t.shape) for t in movings + fixeds}
    if len(shapes) != 1:
        raise ValueError(f"pairs: every image in a batch must share one grid, got shapes {sorted(shapes)}")
    moving = torch.stack(movings)[:, None].to(device)
    fixed = torch.stack(fixeds)[:, None].to(device)
    if not bool(torch.isfinite(moving).all() and torch.isfinite(fixed).all()):
        raise ValueError(f"pairs: items {index.tolist()} contain NaN or Inf values")
    return moving, fixed


class _IndexStream:
    """This rank's dataset indices as an endless stream of shuffled epochs."""

    def __init__(self, pairs: Dataset, world: int, rank: int, seed: int):
        self.sampler = DistributedSampler(pairs, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.epoch_length = len(self.sampler)
        self._epoch, self._indices = -1, []

    def _epoch_indices(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._indices = epoch, list(self.sampler)
        return self._indices

    def batch(self, step: int, size: int) -> torch.Tensor:
        """Indices of this rank's ``size`` pairs at ``step``."""
        positions = range(step * size, (step + 1) * size)
        return torch.tensor([self._epoch_indices(p // self.epoch_length)[p % self.epoch_length] for p in positions])


def _distributed() -> tuple[int, int]:
    """``(world_size, rank)``: from the process group when one is initialised, else ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_arguments(network, pairs, steps, time_budget_s, batch_size, checkpoint_every, callback_every, lr) -> None:
    """:func:`train`'s arguments, checked before anything runs."""
    if not isinstance(network, RegistrationNetwork):
        raise TypeError(f"network: expected a gradicon RegistrationNetwork, got {type(network).__name__}")
    if not isinstance(pairs, Dataset) or len(pairs) == 0:
        raise ValueError(f"pairs: expected a non-empty torch Dataset of (moving, fixed), got {describe(pairs)}")
    if steps is None and time_budget_s is None:
        raise ValueError("steps and time_budget_s: give at least one (training would never stop)")
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    if time_budget_s is not None and not time_budget_s >= 0:
        raise ValueError(f"time_budget_s: expected a non-negative number of seconds, got {time_budget_s!r}")
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("callback_every", callback_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")


def _resume(checkpoint, settings: dict, network, optimizer, generator) -> tuple[dict, int, float]:
    """``(history, step, seconds)`` of the run saved in ``checkpoint`` (its network, optimizer
    and generator loaded), or of a fresh run when there is none."""
    history: dict[str, list[float]] = {"step": [], "seconds": [], **{t: [] for t in _TERMS}}
    if checkpoint is None or not Path(checkpoint).exists():
        return history, 0, 0.0
    state = safe_load(checkpoint, format_name=_FORMAT, what="gradicon training checkpoint")
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if changed:
        raise ValueError(f"checkpoint: {str(checkpoint)!r} was written with other settings "
                         f"(saved, requested): {changed}")
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["history"], state["step"], state["seconds"]


def _step(model, optimizer, pairs, stream, generator, step: int, batch_size: int, world: int, rank: int, device,
          dim: int | None, loss_settings: dict) -> tuple[dict[str, float], float]:
    """One training step on this rank's share of the global batch: the loss terms (averaged
    over the processes) and the step's seconds (the slowest process's)."""
    local_batch = batch_size // world
    started = time.perf_counter()
    moving, fixed = _collate(pairs, stream.batch(step, local_batch), device, dim)
    # Noise for the whole global batch (both directions), then this rank's share of it: the
    # sampler deals global batch positions round-robin (rank r holds r, r + N, r + 2N, ...).
    noise = torch.randn(2, batch_size, *moving.shape[2:], moving.ndim - 2, generator=generator)
    noise = noise[:, rank::world].reshape(2 * local_batch, *noise.shape[2:])
    terms = registration_loss(model, moving, fixed, noise_samples=noise.to(device), **loss_settings)
    values = torch.stack([terms[name].detach() for name in _TERMS])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    values = dict(zip(_TERMS, values.tolist()))
    for name, value in values.items():     # checked before backward: NaN grids can crash grid_sample
        if not np.isfinite(value):
            raise FitDivergedError(f"train: the {name} term became {value} at step {step}; "
                                   "lower lr or lam, or check the images")
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return values, float(elapsed)


def train(network: RegistrationNetwork, pairs: Dataset, *, loss: str = "gradicon",
          similarity: str = "lncc", lam: float | None = None, batch_size: int = 32, lr: float = 1e-3,
          steps: int | None = None, time_budget_s: float | None = None, checkpoint=None,
          checkpoint_every: int = 100, lncc_window: int = 5, seed: int = 0, device=None,
          callback=None, callback_every: int = 100, progress: bool = True) -> dict[str, list[float]]:
    """Train ``network`` in place on ``pairs`` with the GradICON or ICON loss.

    Args:
        network: a :class:`RegistrationNetwork` (e.g. :func:`default_model`).
        pairs: a torch ``Dataset`` whose items are ``(moving, fixed)`` images (numpy or torch,
            ``(H, W)`` or ``(D, H, W)``, intensities around [0, 1]), all on one grid.
        loss, similarity, lam, lncc_window: see :func:`registration_loss`.
        batch_size: pairs per step. lr: Adam learning rate.
        steps: stop after this many steps in total (counting steps of a resumed run).
        time_budget_s: stop when training (not callback) time reaches this many seconds in total.
            At least one of ``steps`` and ``time_budget_s`` is needed.
        checkpoint: a file path. If it exists, training resumes from it (same settings required);
            it is rewritten atomically every ``checkpoint_every`` steps and at the end.
        seed: seeds batch selection and grid noise.
        device: where to train (default: where the network's parameters are; under torchrun
            with CUDA, pass ``cuda:LOCAL_RANK``).
        callback: ``callback(step, network, history)`` every ``callback_every`` steps and at the
            end (e.g. validation); its time is not counted as training time.
        progress: show a progress bar.

    Distributed: when a ``torch.distributed`` process group is initialised (e.g.
    :func:`neuralfield_reg.app.distributed.init_from_environment` under ``torchrun``), the network
    is wrapped in ``DistributedDataParallel``, each of the N processes trains on
    ``batch_size / N`` pairs of every global batch, the loss terms in the history are averaged
    over the processes, the time budget is that of the slowest process, and only rank 0 writes
    checkpoints, shows progress and runs the callback.
    Returns:
        The history: ``{"step", "seconds", "loss", "similarity", "inverse_consistency"}`` lists.
    Raises:
        FitDivergedError: a loss term became NaN or Inf (names the step and the term).
    """
    _check_arguments(network, pairs, steps, time_budget_s, batch_size, checkpoint_every, callback_every, lr)
    lam = DEFAULT_LAMBDA.get(loss, 1.0) if lam is None else float(lam)
    world, rank = _distributed()
    if batch_size % world:
        raise ValueError(f"batch_size: {batch_size} pairs cannot be split evenly over {world} processes")
    settings = {"loss": loss, "similarity": similarity, "lam": lam, "batch_size": batch_size,
                "lr": float(lr), "lncc_window": lncc_window, "seed": seed}
    if device is None:
        device = next(network.parameters()).device
    device = torch.device(device)
    network.to(device).train()
    model = network
    if world > 1:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    stream = _IndexStream(pairs, world, rank, seed)
    history, step, seconds = _resume(checkpoint, settings, network, optimizer, generator)

    def save():
        if checkpoint is not None and rank == 0:
            atomic_save({"format": _FORMAT, "library_version": __version__, "settings": settings,
                         "step": step, "seconds": seconds, "network": network.state_dict(),
                         "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                         "history": history}, checkpoint)

    def done() -> bool:
        return (steps is not None and step >= steps) or (time_budget_s is not None and seconds >= time_budget_s)

    def run_callback():
        if callback is not None and rank == 0:
            callback(step, network, history)
        if world > 1:
            dist.barrier()          # the other ranks wait here, outside their step timing

    bar = tqdm(total=steps, initial=step, disable=not progress or rank != 0, desc=f"train {loss}", leave=False)
    while not done():
        values, elapsed = _step(model, optimizer, pairs, stream, generator, step, batch_size, world, rank, device,
                                _network_dim(network), {"loss": loss, "similarity": similarity, "lam": lam, "lncc_window": lncc_window})
        step += 1
        seconds += elapsed
        history["step"].append(step)
        history["seconds"].append(seconds)
        for name in _TERMS:
            history[name].append(values[name])
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{values['loss']:.4g}", ic=f"{values['inverse_consistency']:.3g}")
        if step % checkpoint_every == 0:
            save()
        if step % callback_every == 0:
            run_callback()
    bar.close()
    save()
    if not history["step"] or history["step"][-1] % callback_every != 0:
        run_callback()
    return history
