"""A training batch that does not fit in GPU memory is split into micro-batches, automatically.

:class:`SplitOnOOM` wraps :func:`ddpm.training.step.train_step`. When a step raises
``torch.OutOfMemoryError`` (CUDA's out-of-memory), the step's partial gradients are dropped, the
global RNG (dropout) is put back as it was before the step, and the same step runs again with
``train.grad_accum`` raised to the next divisor of the per-process batch (1 -> 2 -> 4 ...). The
global batch, the t/noise draws (seeded per step) and the update are then exactly those of a run
configured with that ``train.grad_accum`` (paper Algorithm 1 on the same batch; the
micro-batches' mean losses are summed with weight 1/A). The split is said in one line and kept
for the rest of the run; checkpoints keep the configured value (the split is not a setting).

Under torchrun the ranks would have to agree on a split, so there an out-of-memory error stops
the run with a message naming ``train.grad_accum``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable

import torch

from ..errors import ConfigError

StepFn = Callable[[Any, Any, int], Any]


def oom_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a device out-of-memory error (torch.OutOfMemoryError on CUDA)."""
    return tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def next_split(local: int, accum: int) -> int | None:
    """The smallest micro-batch count > ``accum`` that divides ``local`` (None: already 1 image each)."""
    for a in range(accum + 1, local + 1):
        if local % a == 0:
            return a
    return None


class SplitOnOOM:
    """``step_fn(parts, batch, step)`` with micro-batch splitting on out-of-memory (module doc).

    Args:
        step_fn: the step to run (``train_step`` signature).
        log: where the one-line notice goes.
        world_size: processes in the run (> 1: no automatic split).
    """

    def __init__(self, step_fn: StepFn, log: Callable[[str], Any], world_size: int = 1):
        self.step_fn, self.log, self.world_size = step_fn, log, int(world_size)
        self.accum: int | None = None  # None: as configured

    def _parts(self, parts):
        if self.accum is None or self.accum == parts.cfg.train.grad_accum:
            return parts
        view = copy.copy(parts)  # shallow: the same model, optimizer, EMA; only cfg differs
        view.cfg = replace(parts.cfg, train=replace(parts.cfg.train, grad_accum=self.accum))
        return view

    def __call__(self, parts, batch, step: int):
        cuda = [parts.device] if parts.device.type == "cuda" else []
        rng = torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
        while True:
            try:
                return self.step_fn(self._parts(parts), batch, step)
            except oom_errors():
                local = int(batch.x0.shape[0])
                accum = self.accum or parts.cfg.train.grad_accum
                new = next_split(local, accum)
                parts.optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                if new is None or self.world_size > 1:
                    why = ("under torchrun the processes cannot agree on a split" if self.world_size > 1
                           else f"{local // accum} image(s) per forward pass already")
                    raise ConfigError(f"out of memory at step {step} ({why}); set train.grad_accum (now "
                                      f"{accum}) higher, or lower train.batch_size or the model size") from None
                torch.random.set_rng_state(rng[0])
                for d, s in zip(cuda, rng[1]):
                    torch.cuda.set_rng_state(s, d)
                self.log(f"out of memory at step {step}: splitting each batch of {local} into {new} micro-batches "
                         f"of {local // new} from now on (same global batch and results as "
                         f"train.grad_accum={new})")
                self.accum = new
