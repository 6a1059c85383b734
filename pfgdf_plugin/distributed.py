"""Data-parallel training on PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node=N -m pfgdf_plugin run RECIPE`` starts N processes; each calls
:func:`init_from_env` (through the runner), which joins the process group torchrun describes in
the environment (``gloo`` on CPU, ``nccl`` on CUDA). Pretraining and fine-tuning then run
under DistributedDataParallel over a :class:`~torch.utils.data.DistributedSampler`; pruning
runs the same way on every rank (same data, same seeds), so every method's state (SPP's
probabilities and masks, DBP's probe statistics, MPD's permutations) is identical everywhere,
which :func:`same_on_all_ranks` checks. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return whether one is active."""
    if active():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return False
    backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (itself outside a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def same_on_all_ranks(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every tensor is bitwise the same on all ranks (True outside a process group)."""
    if not active():
        return True
    same = torch.ones(1)
    for t in tensors:
        t = t.detach().float().cpu().reshape(-1)
        lo, hi = t.clone(), t.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            same.zero_()
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1)


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm statistics) of rank ``src`` to all ranks."""
    if active():
        for b in model.buffers():
            dist.broadcast(b.data, src=src)


def wrap(model: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """``model`` under DistributedDataParallel when a process group is active, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return DDP(model, device_ids=ids)


def shutdown(initialised_here: Optional[bool]) -> None:
    if initialised_here and dist.is_initialized():
        dist.destroy_process_group()
