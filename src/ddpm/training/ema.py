"""Exponential moving average of the weights (paper Appendix B), the weights used for all evaluation.

The official code uses ``tf.train.ExponentialMovingAverage`` with decay 1e-10 at step 0 and
``ema_decay`` afterwards, without the ``num_updates`` warm-up. In effect the average starts as a
copy of the initial weights and after every optimiser step becomes

    ema <- decay · ema + (1 - decay) · param

which is ``ema.lerp_(param, 1 - decay)``; one fused multi-tensor call updates all parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An averaged copy of ``model`` (``self.module``: eval mode, no gradients).

    Args:
        model: the raw network (not the DDP/compiled wrapper); its current weights are copied.
        decay: per-step decay in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self._ema_params = [p for p in self.module.parameters()]
        self._ema_buffers = [b for b in self.module.buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of ema <- decay·ema + (1-decay)·param over all parameters; buffers are copied."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._ema_params):
            raise ValueError("EMA.update: model has a different number of parameters")
        if params:
            torch._foreach_lerp_(self._ema_params, params, 1.0 - self.decay)
        for eb, b in zip(self._ema_buffers, model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
