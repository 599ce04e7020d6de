"""Training: ``train(cfg, out_dir, resume=None)`` and its parts.

    loop.py         the training loop and ``train``
    optim.py        Adam, LR warm-up, gradient clipping, flat optimiser state
    ema.py          exponential moving average of the weights
    tsampler.py     uniform / importance sampling of t
    precision.py    fp32 / bf16 / fp16 autocast and loss scaling
    batches.py      resumable global-batch data order, sliced per rank
    state.py        run folder, checkpoint selection, resume compatibility
    observe.py      metrics.jsonl, TensorBoard, progress bar, sample grids
    distributed.py  torchrun / DDP helpers

``ddpm.train`` is also the name of the top-level API function. Importing this subpackage binds
the attribute ``ddpm.train`` to the package, so the package is made callable and forwards to
:func:`ddpm.train.loop.train`: ``ddpm.train(cfg, "runs/x")`` works either way.
"""

from __future__ import annotations

import sys
import types

from .loop import NonFiniteLossError, train

__all__ = ["train", "NonFiniteLossError"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
