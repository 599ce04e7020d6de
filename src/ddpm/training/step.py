"""One optimiser step (paper Algorithm 1 and Appendix B), callable on its own.

``train_step(parts, batch, step)`` does exactly what the trainer does at 0-based step index
``step`` (``step`` updates already done):

1. LR = lr·min(step/warmup, 1) (0 at step 0), then ``train.lr_schedule`` (:mod:`.schedules`).
2. t and ε for the whole *global* batch come from generators seeded by (train.seed, step), so
   they depend neither on the number of processes nor on resuming; each rank takes its slice.
3. The rank's examples are split into ``grad_accum`` micro-batches; each contributes
   mean(w·L)/grad_accum to the gradient (w = importance weights, 1 for uniform t, times the
   ``train.loss_weighting`` weight of each t, :mod:`.weighting`), and DDP
   averages over ranks, so the gradient is that of the full-batch mean loss.
4. Global-norm clipping at train.grad_clip, then Adam, then the EMA update (decay from
   ``train.ema_warmup``, :mod:`.schedules`). A non-finite loss
   or gradient norm skips step 4 (no weight, optimiser or EMA change).

Dropout draws from the global torch RNG (seeded by the trainer, saved in checkpoints).
The trainer and ``benchmarks/workloads.py`` both call :func:`train_step`.

Conditioning: a :class:`Batch` carries optional per-example tensors (``model_kwargs``, e.g.
class labels ``y`` [b]); each micro-batch passes its slice to the network as
``model(x_t, t, **kwargs)``. :func:`micro_kwargs` is the one place where a micro-batch's
kwargs are formed (the hook for label dropout).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import distributed as D
from ..config import Config
from .ema import EMA
from .observe import batch_stats
from .optim import apply_update, grad_norm_and_clip, set_lr
from .schedules import ema_decay_at, lr_at
from .weighting import weight_table

# Stream identifiers mixed into the per-step seeds (any fixed distinct numbers).
T_STREAM, NOISE_STREAM, DROPOUT_STREAM, INIT_STREAM = 1, 2, 3, 4
LABEL_STREAM = 5  # label dropout of class-conditional runs


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that mixes integers well (numpy SeedSequence), e.g. (train.seed, step, stream)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class Batch:
    """This rank's share of one global batch.

    Attributes:
        x0: float32 [b, C, H, W] in [-1, 1] on the training device.
        model_kwargs: per-example conditioning, each tensor [b, ...] (e.g. ``{"y": int64 [b]}``);
            empty for an unconditional model.
    """

    x0: torch.Tensor
    model_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainParts:
    """Everything a step touches; built once by the trainer (or a benchmark).

    ``model`` is the raw network (the EMA source, what checkpoints store); ``train_model`` is
    what the forward pass runs (``model`` itself, or its DDP / torch.compile wrapper).
    """

    cfg: Config
    model: torch.nn.Module
    train_model: torch.nn.Module
    diffusion: Any  # ddpm.diffusion.GaussianDiffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    t_sampler: Any  # ddpm.training.tsampler sampler
    precision: Any  # ddpm.training.precision.Precision
    device: torch.device
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False  # the resolved train.channels_last (the model's weights are NHWC)
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())


@dataclass
class StepResult:
    """``applied``: the update was taken (finite loss and gradient norm); ``stats``: float64 [10]
    global-batch loss statistics on the CPU (see ``observe.batch_stats``); ``grad_norm``:
    pre-clipping global norm; ``lr``: the learning rate of this step."""

    applied: bool
    stats: torch.Tensor
    grad_norm: float
    lr: float


def draw_t_and_noise(cfg: Config, t_sampler, step: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t int64 [B], weights float32 [B] (CPU), noise float32 [B, C, H, W] (``device``) for the
    *global* batch of ``step`` (B = train.batch_size)."""
    tc = cfg.train
    g_t = torch.Generator(device="cpu").manual_seed(stream_seed(tc.seed, step, T_STREAM))
    t, w = t_sampler.sample(tc.batch_size, g_t)
    table = weight_table(cfg)  # train.loss_weighting (None: L_simple, no multiplication)
    if table is not None:
        w = w * table[t]
    g_noise = torch.Generator(device=device).manual_seed(stream_seed(tc.seed, step, NOISE_STREAM))
    shape = (tc.batch_size, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    noise = torch.randn(shape, generator=g_noise, device=device)
    return t, w, noise


def drop_batch_labels(cfg: Config, batch: Batch, step: int, offset: int) -> Batch:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022): on a class-conditional run
    each label ``y`` becomes the null label ``model.num_classes`` with probability
    ``train.p_uncond``, drawn per image of the *global* batch from a generator seeded by
    (train.seed, step), so it depends neither on the number of processes (this rank's images start
    at ``offset``) nor on resuming. Other batches pass through unchanged."""
    if cfg.model.num_classes <= 0 or "y" not in batch.model_kwargs:
        return batch
    from ..conditioning import drop_labels

    g = torch.Generator(device="cpu").manual_seed(stream_seed(cfg.train.seed, step, LABEL_STREAM))
    y = drop_labels(batch.model_kwargs["y"], cfg.train.p_uncond, cfg.model.num_classes, g, offset,
                    cfg.train.batch_size)
    return Batch(batch.x0, {**batch.model_kwargs, "y": y})


def micro_kwargs(batch: Batch, sl: slice) -> dict[str, torch.Tensor]:
    """The network's extra keyword arguments for micro-batch ``sl`` of ``batch`` (one place, so
    that conditioning-specific treatment such as label dropout has one spot to go)."""
    return {k: v[sl] for k, v in batch.model_kwargs.items()}


def train_step(parts: TrainParts, batch: Batch, step: int) -> StepResult:
    """One optimiser step at 0-based index ``step`` on this rank's ``batch`` (see module doc).

    Collective under torchrun: every rank calls it with the same ``step``.
    """
    cfg, tc, dev, prec = parts.cfg, parts.cfg.train, parts.device, parts.precision
    A = tc.grad_accum
    local = batch.x0.shape[0]
    m = local // A
    lr = lr_at(step, tc)
    set_lr(parts.optimizer, lr)
    t_all, w_all, noise_all = draw_t_and_noise(cfg, parts.t_sampler, step, dev)
    lo, hi = parts.rank * local, (parts.rank + 1) * local
    t, w, noise = t_all[lo:hi].to(dev), w_all[lo:hi].to(dev), noise_all[lo:hi]
    batch = drop_batch_labels(cfg, batch, step, lo)
    x0 = batch.x0
    if parts.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)

    parts.optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(2 + 8, dtype=torch.float64, device=dev)
    local_losses = []
    T = int(parts.diffusion.num_timesteps)
    for a in range(A):
        sl = slice(a * m, (a + 1) * m)
        last = a == A - 1
        sync = contextlib.nullcontext() if (parts.world_size == 1 or last) else parts.train_model.no_sync()
        with sync:
            kwargs = micro_kwargs(batch, sl)
            with prec.autocast():
                losses = parts.diffusion.training_losses(parts.train_model, x0[sl], t[sl], noise=noise[sl],
                                                         model_kwargs=kwargs or None)
            losses = losses.float()
            loss = (losses * w[sl]).mean() / A
            (prec.scaler.scale(loss) if prec.scaler is not None else loss).backward()
        stats += batch_stats(losses, t[sl], T)
        local_losses.append(losses.detach())
    D.all_reduce_sum(stats)
    if prec.scaler is not None:
        prec.scaler.unscale_(parts.optimizer)
    norm = grad_norm_and_clip(parts.params, tc.grad_clip)
    # One host sync per step: the global loss and the (rank-identical) gradient norm.
    host = torch.cat([stats, norm.detach().double().reshape(1)]).cpu()
    grad_norm = float(host[-1])
    finite = math.isfinite(float(host[0])) and math.isfinite(grad_norm)
    apply_update(parts.optimizer, prec.scaler, finite)
    if finite:
        parts.ema.decay = ema_decay_at(step, tc)
        parts.ema.update(parts.model)
        if tc.t_sampler == "importance":
            losses_all = D.all_gather_tensor(torch.cat(local_losses)).cpu()
            parts.t_sampler.update(t_all, losses_all)
    else:
        parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(finite, host[:-1], grad_norm, lr)
