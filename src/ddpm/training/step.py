"""One optimiser step (paper Algorithm 1 and Appendix B), callable on its own.

``train_step(parts, batch, step)`` does exactly what the trainer does at 0-based step index
``step`` (``step`` updates already done):

1. LR = lr·min(step/warmup, 1) (0 at step 0), then ``train.lr_schedule`` (:mod:`.schedules`).
2. t and ε for the whole *global* batch come from generators on the training device seeded by
   (train.seed, step), so they depend neither on the number of processes nor on resuming; each
   rank takes its slice. (The generators are made once per run and re-seeded every step.)
3. The rank's examples are split into ``grad_accum`` micro-batches; each contributes
   mean(w·L)/grad_accum to the gradient (w = importance weights, 1 for uniform t, times the
   ``train.loss_weighting`` weight of each t, :mod:`.weighting`), and DDP
   averages over ranks, so the gradient is that of the full-batch mean loss.
4. Global-norm clipping at train.grad_clip, then Adam, then the EMA update (decay from
   ``train.ema_warmup``, :mod:`.schedules`). A non-finite loss
   or gradient norm skips step 4 (no weight, optimiser or EMA change).

No host round trip: with uniform t nothing in the step reads a device value on the host. The
non-finite guard of 4 is a device tensor applied as a gradient scaler applies ``found_inf``
(:mod:`.guard`, :meth:`.EMA.update`), and loss statistics, gradient norm and the guard's flag
come back as device tensors in :class:`StepResult`; the trainer reads them once per
``train.log_every`` steps (:meth:`StepResult.record`). Reading ``result.applied`` or
``result.grad_norm`` does read them (a host sync on a GPU). The importance sampler of t keeps
its history on the CPU and so reads the losses every step.

Dropout draws from the global torch RNG (seeded by the trainer, saved in checkpoints).
The trainer and ``benchmarks/workloads.py`` both call :func:`train_step`.

Conditioning: a :class:`Batch` carries optional per-example tensors (``model_kwargs``, e.g.
class labels ``y`` [b]); each micro-batch passes its slice to the network as
``model(x_t, t, **kwargs)``. :func:`micro_kwargs` is the one place where a micro-batch's
kwargs are formed (the hook for label dropout).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import distributed as D
from ..config import Config
from .ema import EMA
from .guard import guarded_step
from .observe import batch_stats
from .optim import grad_norm_and_clip, set_lr
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
    winograd: bool = False  # Winograd routing of the 3x3 convolutions (ddpm.netpath.for_training)
    params: list[torch.nn.Parameter] = field(init=False)
    rng: "StepGenerators" = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())
        self.rng = StepGenerators(self.device)


class StepGenerators:
    """The per-step generators of t, ε and label dropout, on ``device``; made once and re-seeded
    with (train.seed, step, stream) every step (a fresh ``torch.Generator`` per step would do the
    same draws, but a CUDA graph needs the same generator objects at every replay)."""

    def __init__(self, device: torch.device):
        self.t = torch.Generator(device=device)
        self.noise = torch.Generator(device=device)
        self.label = torch.Generator(device=device)
        self.t_cpu = torch.Generator(device="cpu")  # for a t sampler that draws on the host

    def seed(self, seed: int, step: int) -> None:
        """Seed every generator for step ``step`` (host work only: a GPU generator's seed is read
        by the kernels that draw, or by a CUDA graph at replay)."""
        t_seed = stream_seed(seed, step, T_STREAM)
        self.t.manual_seed(t_seed)
        self.t_cpu.manual_seed(t_seed)
        self.noise.manual_seed(stream_seed(seed, step, NOISE_STREAM))
        self.label.manual_seed(stream_seed(seed, step, LABEL_STREAM))


@dataclass
class StepResult:
    """What a step leaves for the trainer, as device tensors (reading them on the host is a
    sync on a GPU; the trainer does it once per log interval via :meth:`record`).

    ``finite``: bool [], the update was taken (finite loss and gradient norm); ``stats``: float64
    [10] global-batch loss statistics (see ``observe.batch_stats``); ``norm``: float32 [], the
    pre-clipping global gradient norm; ``lr``: the learning rate of this step (a float).
    """

    finite: torch.Tensor
    stats: torch.Tensor
    norm: torch.Tensor
    lr: float

    @property
    def applied(self) -> bool:
        """Whether the update was taken (reads the device)."""
        return bool(self.finite)

    @property
    def grad_norm(self) -> float:
        """Pre-clipping global gradient norm (reads the device)."""
        return float(self.norm)

    def record(self) -> torch.Tensor:
        """float64 [12] on the device: stats [10], gradient norm, applied (1.0/0.0); stacking a
        window of these and reading them at once is the trainer's only host read per window."""
        return torch.cat([self.stats.detach().double(), self.norm.detach().double().reshape(1),
                          self.finite.double().reshape(1)])


def draw_t_and_noise(cfg: Config, t_sampler, step: int, device: torch.device, rng: StepGenerators | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t int64 [B], weights float32 [B], noise float32 [B, C, H, W], all on ``device``, for the
    *global* batch of ``step`` (B = train.batch_size). ``rng``: the run's generators (re-seeded
    here); default fresh ones.

    On the CPU these are the draws of earlier versions bit for bit (the same generators on the
    same device); on a GPU t now comes from a CUDA generator (earlier: a CPU one, copied over).
    """
    rng = rng or StepGenerators(device)
    rng.seed(cfg.train.seed, step)
    return _draw(cfg, t_sampler, device, rng)


def _draw(cfg: Config, t_sampler, device: torch.device, rng: StepGenerators
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`draw_t_and_noise` from generators seeded already (a captured step re-seeds them
    before each replay; the graph only draws)."""
    tc = cfg.train
    on_device = getattr(t_sampler, "on_device", False)
    t, w = t_sampler.sample(tc.batch_size, rng.t if on_device else rng.t_cpu)
    table = weight_table(cfg, t.device)  # train.loss_weighting (None: L_simple, no multiplication)
    if table is not None:
        w = w * table[t]
    shape = (tc.batch_size, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    noise = torch.randn(shape, generator=rng.noise, device=device)
    return t.to(device), w.to(device), noise


def drop_batch_labels(cfg: Config, batch: Batch, step: int, offset: int,
                      generator: torch.Generator | None = None) -> Batch:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022): on a class-conditional run
    each label ``y`` becomes the null label ``model.num_classes`` with probability
    ``train.p_uncond``, drawn per image of the *global* batch from a generator seeded by
    (train.seed, step) (``generator``: one already seeded so, e.g. the run's, on the labels'
    device; default a fresh CPU one), so it depends neither on the number of processes (this
    rank's images start at ``offset``) nor on resuming. Other batches pass through unchanged."""
    if cfg.model.num_classes <= 0 or "y" not in batch.model_kwargs:
        return batch
    from ..conditioning import drop_labels

    g = generator or torch.Generator(device="cpu").manual_seed(stream_seed(cfg.train.seed, step, LABEL_STREAM))
    y = drop_labels(batch.model_kwargs["y"], cfg.train.p_uncond, cfg.model.num_classes, g, offset,
                    cfg.train.batch_size)
    return Batch(batch.x0, {**batch.model_kwargs, "y": y})


def micro_kwargs(batch: Batch, sl: slice) -> dict[str, torch.Tensor]:
    """The network's extra keyword arguments for micro-batch ``sl`` of ``batch`` (one place, so
    that conditioning-specific treatment such as label dropout has one spot to go)."""
    return {k: v[sl] for k, v in batch.model_kwargs.items()}


def train_step(parts: TrainParts, batch: Batch, step: int) -> StepResult:
    """One optimiser step at 0-based index ``step`` on this rank's ``batch`` (see module doc).

    Collective under torchrun: every rank calls it with the same ``step``. Nothing here reads a
    device value on the host (with uniform t).
    """
    lr = begin_step(parts, step)
    finite, stats, norm, t_all, local_losses = step_body(parts, batch)
    if parts.cfg.train.t_sampler == "importance" and bool(finite):  # a host read: its history is on the CPU
        losses_all = D.all_gather_tensor(torch.cat(local_losses)).cpu()
        parts.t_sampler.update(t_all.cpu(), losses_all)
    return StepResult(finite, stats, norm, lr)


def begin_step(parts: TrainParts, step: int) -> float:
    """The host's share of step ``step``: set the LR (warm-up and ``train.lr_schedule``) and the
    EMA decay (``train.ema_warmup``), seed the step's generators. Returns the LR."""
    tc = parts.cfg.train
    lr = lr_at(step, tc)
    set_lr(parts.optimizer, lr)
    parts.ema.decay = ema_decay_at(step, tc)
    parts.rng.seed(tc.seed, step)
    return lr


def step_body(parts: TrainParts, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        list[torch.Tensor]]:
    """The device's share of a step (after :func:`begin_step`): draws, forward and backward per
    micro-batch, clipping, the guarded Adam update and the EMA; only device work, so it can be
    captured in a CUDA graph (:mod:`.graphstep`). Returns (finite bool [], stats float64 [10],
    norm float32 [], t of the global batch int64 [B], per-micro-batch losses)."""
    cfg, tc, dev, prec = parts.cfg, parts.cfg.train, parts.device, parts.precision
    A = tc.grad_accum
    local = batch.x0.shape[0]
    m = local // A
    t_all, w_all, noise_all = _draw(cfg, parts.t_sampler, dev, parts.rng)
    lo, hi = parts.rank * local, (parts.rank + 1) * local
    t, w, noise = t_all[lo:hi], w_all[lo:hi], noise_all[lo:hi]
    batch = drop_batch_labels(cfg, batch, 0, lo, parts.rng.label)
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
    # The guard on the device: the global loss and the (rank-identical) gradient norm. An
    # overflow the fp16 scaler would find makes the norm non-finite too, so this covers it.
    finite = torch.isfinite(stats[0]) & torch.isfinite(norm)
    guarded_step(parts.optimizer, finite)
    if prec.scaler is not None:
        prec.scaler.update()  # lowers the scale after an overflow (its found_inf from unscale_)
    parts.ema.update(parts.model, finite)
    return finite, stats, norm.detach(), t_all, local_losses
