"""A distillation's settings, its phases and the student's config.

Defaults (chosen by measurement on the digits model that ``make demo`` trains; README "Four
network calls: progressive distillation"):

- ``start``: 16 DDIM steps (:func:`ddpm.distill.grid.default_start`), ``steps``: 4.
- ``phase_steps``: 3,600 optimiser steps per halving phase, ``batch_size``: half the teacher's
  (64 for digits). Phase length is what decides quality here: on the digits model the 32-step
  student of the v warm-up scores Frechet distance 11.3 after 100 optimiser steps and 4.4 after
  400 (its teacher's 32-step DDIM 3.1), and 2.9 after 1,600. To 4 steps (DDIM walk, seeds
  0..499): 800-step phases from 32 steps (the first default) 6.73, 2,400-step phases from 32
  steps 4.02, 3,600-step phases from 16 steps 3.35 (3.69 against 4.28 averaged over three seed
  sets; the stochastic walk 3.08 against 3.41), the last two with the same 8,800 optimiser steps.
  Those 8,800 steps took 1,185 s (19.8 min) on the quiet 2-core Xeon (800-step phases: 2,800
  steps, 403 s), inside the 30 minutes a distillation may take there; a step costs the same
  whatever the phase. ``--steps 1`` adds two more phases (7,200 steps, ~16 min).
- ``lr``: half the teacher's train.lr, warm-up 5 % of a phase, then linear decay to 0
  (Salimans & Ho, ICLR 2022, section 5: each phase's LR decays linearly to 0).
- ``ema_decay``: min(teacher's train.ema_decay, 1 - 10 / phase_steps): an average over about a
  tenth of a phase (Salimans & Ho use a short EMA or none), so each phase's result is its
  own last weights, lightly averaged.
- ``v_warmup``: 4/9 of a phase (1,600 optimiser steps at the default 3,600) of 1:1 distillation
  (same grid, target = the teacher's clipped x0) before the first halving. An eps teacher's clipped x0 at the top of the chain (alpha ~ 0.0055
  at t = T-1 on digits) is saturated noise (mean |x0| 0.93 at t = 199), so the first halving's
  targets there cannot be fitted (loss 0.72 at t = 199 against 0.02 at t = 105 after a 300-step
  first phase, whose 32-step student scored Frechet distance 11.9 against the teacher's 7.4);
  the warm-up student predicts their smooth mean instead (v is well-posed there), and the
  halvings then distil a v teacher.
- ``snr_floor``: 0.01, the loss weight max(SNR_t, 0.01) instead of Salimans & Ho's max(SNR_t, 1).
  Their floor weighs the x0 error at the top of the chain as much as at SNR 1, but there the
  x0 a step must predict barely moves where it lands (its coefficient alpha_t'' - sigma_t''
  alpha_t / sigma_t is ~0.005 at t = 199 on digits) and an eps teacher's targets are saturated
  noise; fitting them took the network's capacity from the steps that matter. Measured on the
  1,000-step digits checkpoint (the v warm-up on 32 steps, 200 optimiser steps, 500 samples):
  Frechet distance 14.4 with floor 1, 8.6 with floor 0.01, the teacher's own 32-step DDIM 7.4.
- ``clip``: the teacher's x0 predictions are clamped to [-1, 1], as the teacher samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..config import Config
from ..errors import ConfigError
from .grid import check_steps, default_start, grids
from .phase import Phase

DEFAULT_STEPS = 4
DEFAULT_PHASE_STEPS = 3600
# settings that may differ when a run folder is continued: more phases only append
RESUMABLE = frozenset({"steps", "save_every", "log_every"})


@dataclass(frozen=True)
class DistillSettings:
    start: int
    steps: int = DEFAULT_STEPS
    phase_steps: int = DEFAULT_PHASE_STEPS
    lr: float = 5e-4
    warmup_frac: float = 0.05
    batch_size: int = 128
    ema_decay: float = 0.99
    v_warmup: int = 0
    seed: int = 0
    clip: bool = True
    snr_floor: float = 0.01
    save_every: int = 200
    log_every: int = 50

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self, num_timesteps: int) -> "DistillSettings":
        check_steps(self.steps, self.start, num_timesteps)
        for name, v, lo in (("--phase-steps", self.phase_steps, 1), ("--batch-size", self.batch_size, 1),
                            ("--v-warmup", self.v_warmup, 0), ("--save-every", self.save_every, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} {v}: expected an integer >= {lo}")
        if not (self.lr > 0):
            raise ConfigError(f"--lr {self.lr}: expected a positive learning rate")
        if not (self.snr_floor > 0):
            raise ConfigError(f"--snr-floor {self.snr_floor}: expected a positive number")
        if not (0 <= self.ema_decay < 1):
            raise ConfigError(f"--ema-decay {self.ema_decay}: expected a number in [0, 1)")
        return self


def default_settings(teacher_cfg: Config, **overrides) -> DistillSettings:
    """The defaults of the module doc for this teacher, with ``overrides`` (None = default)."""
    tc = teacher_cfg.train
    L = overrides.get("phase_steps") or DEFAULT_PHASE_STEPS
    base = DistillSettings(start=default_start(teacher_cfg.diffusion.num_timesteps), phase_steps=L, v_warmup=4 * L // 9,
                           lr=tc.lr / 2, batch_size=max(1, tc.batch_size // 2), ema_decay=min(tc.ema_decay, max(0.0, 1 - 10 / L)))
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **given).check(teacher_cfg.diffusion.num_timesteps)


def phases(settings: DistillSettings, num_timesteps: int) -> list[Phase]:
    """The phases in order: the optional v warm-up (same grid), then one per halving."""
    g = grids(num_timesteps, settings.start, settings.steps)
    out: list[Phase] = []
    warm = max(1, round(settings.warmup_frac * settings.phase_steps))
    if settings.v_warmup > 0:
        out.append(Phase(0, g[0], g[0], settings.v_warmup, settings.lr, max(1, round(settings.warmup_frac
                                                                                      * settings.v_warmup)),
                         settings.ema_decay))
    for a, b in zip(g, g[1:]):
        out.append(Phase(len(out), a, b, settings.phase_steps, settings.lr, warm, settings.ema_decay))
    return out


def student_config(teacher_cfg: Config, settings: DistillSettings) -> Config:
    """The teacher's config with v-prediction (Salimans & Ho section 4) and the distillation's
    batch size, LR, seed and EMA decay (what the checkpoint records)."""
    return replace(teacher_cfg,
                   diffusion=replace(teacher_cfg.diffusion, mean_type="v"),
                   train=replace(teacher_cfg.train, batch_size=settings.batch_size, lr=settings.lr,
                                 seed=settings.seed, ema_decay=settings.ema_decay, warmup_steps=0,
                                 grad_accum=1, compile=False)).validate()
