"""One optimiser step of a distillation phase (Salimans & Ho, ICLR 2022, Algorithm 2).

A phase distils a teacher that walks ``teacher_grid`` (2N kept 0-based indices) into a student
that walks ``student_grid`` (N of them, :func:`ddpm.distill.grid.halve`), or, in the optional
warm-up phase, into a student on the same grid (the teacher's one step, re-expressed in the v
parameterisation). Step ``step`` (0-based, within the phase):

1. LR = lr * min(step / warmup, 1) * (1 - step / L): a short linear warm-up (Adam's moments
   start from zero every phase), then Salimans & Ho's linear decay to 0 at the phase's end.
2. The student position j ~ uniform{0..N-1} and eps ~ N(0, I) for every image come from
   generators seeded by (seed, phase, step), so a resumed phase draws exactly the same; label
   dropout (class-conditional teachers) likewise, as the trainer does it, so the student learns
   the conditional and the unconditional branch and guidance works as for the teacher.
3. z_t = alpha_t x0 + sigma_t eps at t = the student's j-th index; the target x_tilde of
   :func:`ddpm.distill.target.two_step_target`; loss = mean_b max(SNR_t, floor) ||x_tilde - xhat||^2
   with xhat = alpha_t z_t - sigma_t v_hat.
4. Global-norm clipping (train.grad_clip), Adam, the EMA update; a non-finite loss or gradient
   norm skips the update (as the trainer does).

It reuses the trainer's pieces (``training.optim``, ``training.ema``, ``training.step``'s seeds
and :class:`~ddpm.training.step.TrainParts`, which is also what ``training.layout`` packs into
a checkpoint); only the loss and the LR schedule differ from :func:`ddpm.training.step.train_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..training.optim import apply_update, grad_norm_and_clip, set_lr
from ..training.step import LABEL_STREAM, NOISE_STREAM, Batch, TrainParts, stream_seed
from .target import alpha_sigma, distill_loss, student_x0, truncated_snr_weight, two_step_target

POS_STREAM = 11  # the student positions j (any number distinct from training.step's streams)


@dataclass(frozen=True)
class Phase:
    """One phase: ``index`` (0-based), the grids, ``steps`` L optimiser steps, peak ``lr``,
    ``warmup`` steps, ``ema_decay``."""

    index: int
    teacher_grid: tuple[int, ...]
    student_grid: tuple[int, ...]
    steps: int
    lr: float
    warmup: int
    ema_decay: float

    @property
    def is_warmup(self) -> bool:
        return self.teacher_grid == self.student_grid

    def describe(self) -> str:
        if self.is_warmup:
            return f"{len(self.student_grid)} -> {len(self.student_grid)} (v warm-up)"
        return f"{len(self.teacher_grid)} -> {len(self.student_grid)}"

    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 [N] each: t, t' and t'' (-1 = x0) of every student position j (module doc of grid)."""
        P, N = self.teacher_grid, len(self.student_grid)
        if self.is_warmup:
            t = np.array(P)
            t1 = np.array([-1] + list(P[:-1]))
            return t, t1, t1.copy()
        t = np.array([P[2 * j + 1] for j in range(N)])
        t1 = np.array([P[2 * j] for j in range(N)])
        t2 = np.array([P[2 * j - 1] if j > 0 else -1 for j in range(N)])
        return t, t1, t2


def phase_lr(step: int, phase: Phase) -> float:
    """lr * min(step / warmup, 1) * (1 - step / L) (module doc, item 1)."""
    warm = 1.0 if phase.warmup <= 0 else min(step / phase.warmup, 1.0)
    return float(phase.lr) * warm * max(0.0, 1.0 - step / phase.steps)


@dataclass
class StepOut:
    applied: bool
    loss: float
    grad_norm: float
    lr: float


def draw(parts: TrainParts, phase: Phase, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(j int64 [B] on the CPU, eps float32 [B, C, H, W] on the device) of ``step``."""
    tc, mc = parts.cfg.train, parts.cfg.model
    g_pos = torch.Generator(device="cpu").manual_seed(stream_seed(tc.seed, phase.index, step, POS_STREAM))
    j = torch.randint(0, len(phase.student_grid), (batch,), generator=g_pos)
    g_noise = torch.Generator(device=parts.device).manual_seed(stream_seed(tc.seed, phase.index, step, NOISE_STREAM))
    eps = torch.randn((batch, mc.in_channels, mc.resolution, mc.resolution), generator=g_noise, device=parts.device)
    return j, eps


def drop_labels_of(parts: TrainParts, phase: Phase, batch: Batch, step: int) -> dict:
    """The batch's conditioning with classifier-free label dropout (train.p_uncond), seeded per step."""
    kwargs = dict(batch.model_kwargs)
    if parts.cfg.model.num_classes > 0 and "y" in kwargs:
        from ..conditioning import drop_labels

        g = torch.Generator(device="cpu").manual_seed(stream_seed(parts.cfg.train.seed, phase.index, step,
                                                                  LABEL_STREAM))
        kwargs["y"] = drop_labels(kwargs["y"], parts.cfg.train.p_uncond, parts.cfg.model.num_classes, g)
    return kwargs


def distill_step(parts: TrainParts, teacher, teacher_diffusion, phase: Phase, batch: Batch, step: int,
                 clip: bool = True, snr_floor: float = 1.0) -> StepOut:
    """One optimiser step at 0-based phase step ``step`` (module doc). ``parts.model`` is the
    student (a v model), ``teacher`` the frozen teacher network with its own diffusion."""
    lr = phase_lr(step, phase)
    set_lr(parts.optimizer, lr)
    x0 = batch.x0
    B = x0.shape[0]
    j, eps = draw(parts, phase, step, B)
    tt, t1, t2 = (torch.from_numpy(a)[j] for a in phase.positions())
    kwargs = drop_labels_of(parts, phase, batch, step)
    abar = np.concatenate([[1.0], parts.diffusion.alphas_cumprod])
    a_t, s_t = alpha_sigma(abar, tt, x0)
    z_t = a_t * x0 + s_t * eps
    dev = parts.device
    x_tilde, _ = two_step_target(teacher, teacher_diffusion, z_t, tt.to(dev), t1.to(dev), t2.to(dev), abar, kwargs,
                                 clip, parts.precision.dtype)
    weight = truncated_snr_weight(abar, tt, snr_floor)
    parts.optimizer.zero_grad(set_to_none=True)
    with parts.precision.autocast():
        out = parts.train_model(z_t, tt.to(dev), **kwargs)
    losses = distill_loss(student_x0(out, z_t, a_t, s_t), x_tilde, weight)
    loss = losses.mean()
    loss.backward()
    norm = grad_norm_and_clip(parts.params, parts.cfg.train.grad_clip)
    host = torch.stack([loss.detach().double(), norm.detach().double()]).cpu()
    finite = math.isfinite(float(host[0])) and math.isfinite(float(host[1]))
    apply_update(parts.optimizer, None, finite)
    if finite:
        parts.ema.update(parts.model)
    else:
        parts.optimizer.zero_grad(set_to_none=True)
    return StepOut(finite, float(host[0]), float(host[1]), lr)
