"""One process or many: device choice and the few ``torch.distributed`` calls the package needs.

Without ``RANK``/``WORLD_SIZE`` in the environment the trainer runs as one process; without an
initialised process group every collective helper here is a no-op (rank 0 of 1). The trainer
and the evaluations (:mod:`ddpm.evaluate.shard`) use the same helpers. Under ``torchrun`` each process joins the default process group (NCCL on
CUDA, gloo on CPU), trains one shard of every global batch inside ``DistributedDataParallel``,
and rank 0 alone writes files and shows progress.

One machine, 8 GPUs::

    torchrun --standalone --nproc_per_node=8 -m ddpm.cli train --preset cifar10 --out runs/c10

Several machines (run on every node; torchrun's c10d rendezvous finds the others, nothing in
this package is node-aware)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST0:29500 --rdzv_id=c10 -m ddpm.cli train --preset cifar10 --out runs/c10

The global batch (``train.batch_size``) stays the same whatever the number of processes; each
process sees ``batch_size / world_size`` examples per optimiser step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError


def choose_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The one device rule: ``None`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU;
    a bare ``"cuda"`` -> ``cuda:<local_rank>``.

    Raises:
        UserError: an unknown device name, or CUDA asked for where there is none.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device: unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


@dataclass
class DistEnv:
    """Where this process sits. ``owns_group``: we initialised the process group, so we destroy it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment names a rank and a world size (torchrun, or set by hand)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Join the process group if launched by torchrun; choose this process's device.

    An already initialised default group (a caller that set one up itself) is used as is and
    left for the caller to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = choose_device(device, local_rank)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if not launched_by_torchrun():
        return DistEnv(device=choose_device(device, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = choose_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def teardown(env: DistEnv) -> None:
    """Barrier, then destroy the group if :func:`setup` created it."""
    if env.owns_group and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _multi() -> bool:
    return dist_info()[1] > 1


def barrier() -> None:
    if _multi():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity for one process)."""
    if _multi():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks in place (identity for one process)."""
    if _multi():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0, in rank order."""
    rank, world = dist_info()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj_rank0, obj_rank1, ...]`` on every rank (in-memory pickling between our own processes)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
