"""What ``ddpm distill`` prints before its first step: teacher, student, phases, optimiser steps
per phase and the time per phase on this device, from a timed warm-up step (as ``ddpm train``
does with :mod:`ddpm.plan`).

The warm-up runs one untimed and two timed distillation steps (two teacher calls without
gradients and one student forward/backward at the real batch size) on throwaway copies of the
networks, inside ``torch.random.fork_rng``, so the run itself is not changed by it.
``DDPM_PLAN_WARMUP=0`` skips it (no time estimate).
"""

from __future__ import annotations

import copy
import os
import time

import torch

from ..config import Config
from ..plan import _duration
from .phase import Phase, distill_step


def measure_distill_step(teacher_net, teacher_diffusion, parts, phase: Phase, device) -> float:
    """Seconds per distillation step of ``phase`` (batch settings.batch_size) on ``device``."""
    from ..training.step import Batch

    cfg = parts.cfg
    parts = copy.copy(parts)
    parts.model = parts.train_model = copy.deepcopy(parts.model)
    parts.params = list(parts.model.parameters())
    parts.optimizer = type(parts.optimizer)(parts.params, **parts.optimizer.defaults)
    parts.ema = copy.deepcopy(parts.ema)
    B, r = cfg.train.batch_size, cfg.model.resolution
    x0 = torch.rand(B, cfg.model.in_channels, r, r, device=device) * 2 - 1
    kwargs = {"y": torch.zeros(B, dtype=torch.int64, device=device)} if cfg.model.num_classes > 0 else {}
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        distill_step(parts, teacher_net, teacher_diffusion, phase, Batch(x0, kwargs), 1)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for s in (2, 3):
            distill_step(parts, teacher_net, teacher_diffusion, phase, Batch(x0, kwargs), s)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / 2


def plan_lines(teacher_cfg: Config, teacher_path: str, plist: list[Phase], seconds_per_step: float | None,
               done_steps: int = 0) -> list[str]:
    """The plan as printed (one line per phase; ``done_steps`` already taken in a resumed run)."""
    T = teacher_cfg.diffusion.num_timesteps
    lines = [f"distill: teacher {teacher_path} ({teacher_cfg.diffusion.mean_type}-prediction, T={T}, "
             f"{teacher_cfg.preset}) -> student with v-prediction (Salimans & Ho 2022), same network"]
    total = sum(ph.steps for ph in plist)
    per = f"{seconds_per_step:.3f} s/step (timed warm-up step)" if seconds_per_step else "not timed"
    lines.append(f"phases: {len(plist)}, {total} optimiser steps in all; {per}")
    for ph in plist:
        eta = f", ~{_duration(ph.steps * seconds_per_step)}" if seconds_per_step else ""
        lines.append(f"  phase {ph.index}: {ph.describe()} DDIM steps, {ph.steps} optimiser steps, lr {ph.lr:g} "
                     f"decaying linearly to 0, EMA {ph.ema_decay:g}{eta}")
    if seconds_per_step:
        left = max(total - done_steps, 0)
        lines.append(f"time: ~{_duration(left * seconds_per_step)} for the {left} steps left"
                     + (f" ({done_steps} done)" if done_steps else ""))
    return lines


def warmup_enabled() -> bool:
    return os.environ.get("DDPM_PLAN_WARMUP", "1") != "0"
