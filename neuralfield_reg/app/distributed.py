"""Joining the process group that ``torchrun`` describes, for multi-process work.

Launched plainly, a script runs as one process and nothing here does anything. Launched with
``torchrun --nproc_per_node=N script.py``, each process calls :func:`init_from_environment`
and gets its rank and device (one GPU per rank when there are GPUs, gloo on the CPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_environment(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise ``torch.distributed`` from torchrun's environment variables if they are set.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo.
    Returns:
        ``(rank, world_size, device)``: ``(0, 1, cuda:0 or cpu)`` outside torchrun; under
        torchrun with GPUs the device is ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def shutdown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
