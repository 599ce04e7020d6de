"""What a training checkpoint holds, in one place: :func:`pack` writes it, :func:`unpack` reads it.

Tensors (names as stored; see :mod:`ddpm.checkpoint` for the file format):

    model/<param>                  raw training weights
    ema/<param>                    EMA weights (sampling and evaluation use these)
    optim/<param>/<exp_avg|...>    Adam state, keyed by parameter name (optim.optimizer_tensors)
    tsampler/...                   the importance sampler's loss history (empty for uniform t)
    rng/cpu/<rank>, rng/cuda/<rank>  every rank's global torch RNG (dropout)

JSON meta: config, step, version, kind="train", optimizer (hyper-parameters, parameter names),
data_sampler (position in the data order), t_sampler, skipped_nonfinite, nonfinite_in_row,
world_size, precision, grad_scaler (fp16 only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import add_prefix, split_prefix
from ..weights import load_state_strict
from .optim import load_optimizer_tensors, optimizer_tensors
from .step import TrainParts


@dataclass
class Counters:
    """Where the run stands: batches consumed (``step``, skipped ones included), non-finite
    steps skipped in total and in a row."""

    step: int = 0
    skipped: int = 0
    in_row: int = 0


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's (CPU, CUDA or None) global RNG state."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def pack(parts: TrainParts, counters: Counters, data_state: dict,
         rng: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the whole training state; ``rng`` is every rank's :func:`rng_state`."""
    param_names = [n for n, _ in parts.model.named_parameters()]
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(add_prefix(parts.model.state_dict(), "model/"))
    tensors.update(add_prefix(parts.ema.state_dict(), "ema/"))
    opt_tensors, opt_meta = optimizer_tensors(parts.optimizer, param_names)
    tensors.update(add_prefix(opt_tensors, "optim/"))
    for r, (cpu, cuda) in enumerate(rng):
        tensors[f"rng/cpu/{r}"] = cpu
        if cuda is not None:
            tensors[f"rng/cuda/{r}"] = cuda
    tensors.update(add_prefix(parts.t_sampler.state_tensors(), "tsampler/"))
    scaler = parts.precision.scaler
    meta = {
        "config": parts.cfg.to_dict(),
        "step": counters.step,
        "version": __version__,
        "kind": "train",
        "optimizer": opt_meta,
        "data_sampler": data_state,
        "t_sampler": parts.cfg.train.t_sampler,
        "skipped_nonfinite": counters.skipped,
        "nonfinite_in_row": counters.in_row,
        "world_size": parts.world_size,
        "precision": parts.precision.name,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    return tensors, meta


def unpack(parts: TrainParts, tensors: dict[str, torch.Tensor], meta: dict, path: str | Path
           ) -> tuple[Counters, dict, bool]:
    """Load a :func:`pack`-ed state into ``parts``.

    Returns:
        (counters, data sampler state, rng_restored). ``rng_restored`` is False when the
        checkpoint was written by another number of processes: this rank's dropout RNG is then
        left for the caller to seed.
    Raises:
        CheckpointError: the weights or optimiser state do not fit the model.
    """
    param_names = [n for n, _ in parts.model.named_parameters()]
    load_state_strict(parts.model, split_prefix(tensors, "model/"), path)
    load_state_strict(parts.ema.module, split_prefix(tensors, "ema/"), path)
    load_optimizer_tensors(parts.optimizer, param_names, split_prefix(tensors, "optim/"), meta.get("optimizer", {}))
    parts.t_sampler.load_state_tensors(split_prefix(tensors, "tsampler/"))
    if parts.precision.scaler is not None and meta.get("grad_scaler"):
        parts.precision.scaler.load_state_dict(meta["grad_scaler"])
    counters = Counters(int(meta["step"]), int(meta.get("skipped_nonfinite", 0)), int(meta.get("nonfinite_in_row", 0)))
    cpu = tensors.get(f"rng/cpu/{parts.rank}")
    restored = cpu is not None and int(meta.get("world_size", 1)) == parts.world_size
    if restored:
        torch.set_rng_state(cpu)
        cuda = tensors.get(f"rng/cuda/{parts.rank}")
        if cuda is not None and parts.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, parts.device)
    return counters, meta["data_sampler"], restored
