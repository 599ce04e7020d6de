"""Exponential moving average of the weights (paper Appendix B), the weights used for all evaluation.

The official code uses ``tf.train.ExponentialMovingAverage`` with decay 1e-10 at step 0 and
``ema_decay`` afterwards, without the ``num_updates`` warm-up. In effect the average starts as a
copy of the initial weights and after every optimiser step becomes

    ema <- decay · ema + (1 - decay) · param

which is ``ema.lerp_(param, 1 - decay)``; one fused multi-tensor call updates all parameters.
The trainer passes the step's non-finite guard as a device tensor, so the weight is a tensor
(``1 - decay`` or 0) and no host read is needed (:func:`foreach_lerp_tensor_`).
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
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One step of ema <- decay·ema + (1-decay)·param over all parameters; buffers are copied.

        ``applied``: an optional bool [] device tensor (the step's non-finite guard); where it is
        false the average is left exactly as it was, decided on the device (no host read).
        """
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._ema_params):
            raise ValueError("EMA.update: model has a different number of parameters")
        if applied is None:
            if params:
                torch._foreach_lerp_(self._ema_params, params, 1.0 - self.decay)
            for eb, b in zip(self._ema_buffers, model.buffers()):
                eb.copy_(b)
            return
        # weight (1-decay) or 0 as a device tensor: lerp with weight 0 returns ema unchanged
        weight = applied.to(self._ema_params[0].dtype if self._ema_params else torch.float32) * (1.0 - self.decay)
        if params:
            foreach_lerp_tensor_(self._ema_params, params, weight)
        for eb, b in zip(self._ema_buffers, model.buffers()):
            eb.copy_(torch.where(applied, b, eb))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def foreach_lerp_tensor_(ema: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor,
                         exact: bool | None = None) -> None:
    """ema <- ema + weight·(param - ema) for every pair, ``weight`` a 0-d tensor on their device.

    ``torch._foreach_lerp_`` takes a tensor weight only per tensor (a 0-d tensor passed as its
    Scalar would be read on the host). On the CPU the per-tensor form with the weight broadcast
    (a stride-0 view, no memory) is bit-identical to the scalar call. On other devices that form
    leaves the fused multi-tensor kernel for one kernel per tensor, so there it is three fused
    calls instead: d = param - ema; d *= weight; ema += d (within an ulp of lerp; with weight 0
    exactly ema, since the weights of a skipped step are finite and unchanged). ``exact``: force
    the per-tensor lerp (True) or the three fused calls (False); default by device.
    """
    if not ema:
        return
    if exact if exact is not None else ema[0].device.type == "cpu":
        torch._foreach_lerp_(ema, params, [weight.expand_as(e) for e in ema])
        return
    d = torch._foreach_sub(params, ema)
    torch._foreach_mul_(d, weight)
    torch._foreach_add_(ema, d)
