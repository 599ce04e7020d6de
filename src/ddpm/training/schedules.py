"""Learning-rate and EMA-decay schedules: pure functions of the 0-based step and the config.

Both depend only on (step, train config), so a resumed run takes exactly the values an
uninterrupted one would (nothing extra is checkpointed).

Learning rate (``train.lr_schedule``), after the paper's linear warm-up lr·step/W over the first
W = ``train.warmup_steps`` steps, with p = (step - W) / (total_steps - W) in [0, 1]:

- ``constant`` (the paper, Appendix B): lr.
- ``cosine``: lr · (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017's annealing without restarts).
- ``linear``: lr · (1 - p), reaching 0 at ``train.total_steps``.

A decaying schedule is stretched when a resume changes ``train.total_steps`` (logged by the
trainer); a run planned with ``--minutes`` writes its total into the run's config, so a plain
resume keeps the schedule.

EMA decay (``train.ema_warmup``):

- ``none`` (the paper): ``train.ema_decay`` from the first update on; the average starts as the
  initial (random) weights and keeps a share decay^n of them after n updates (0.995^500 = 8%).
- ``ramp``: min(ema_decay, (1 + n) / (10 + n)) at update n (0-based step index), the
  ``num_updates`` warm-up of TensorFlow's ExponentialMovingAverage (which the official DDPM code
  left off; see :mod:`.ema`): the first updates move the average most of the way to the weights (0.1, 0.18, 0.25, ...), so a
  short run's average is not dominated by its first steps; it reaches 0.995 after 1,790 steps
  and 0.9999 after ~90,000.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import TrainConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of the update at 0-based ``step`` (module docstring)."""
    W = int(tc.warmup_steps)
    if W > 0 and step < W:
        return float(tc.lr) * step / W
    if tc.lr_schedule == "constant":
        return float(tc.lr)
    p = min(max((step - W) / max(tc.total_steps - W, 1), 0.0), 1.0)
    if tc.lr_schedule == "cosine":
        return float(tc.lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if tc.lr_schedule == "linear":
        return float(tc.lr) * (1.0 - p)
    raise ValueError(f"unknown train.lr_schedule {tc.lr_schedule!r}")


def ema_decay_at(step: int, tc: TrainConfig) -> float:
    """EMA decay of the update after 0-based ``step`` (module docstring)."""
    if tc.ema_warmup == "ramp":
        return min(float(tc.ema_decay), (1.0 + step) / (10.0 + step))
    return float(tc.ema_decay)


def ema_init_share(n: int, tc: TrainConfig) -> float:
    """The share of the EMA that is still the initial weights after ``n`` updates: the product
    of the first ``n`` decays (no skipped steps assumed)."""
    if n <= 0:
        return 1.0
    k = np.arange(n, dtype=np.float64)
    d = np.full(n, float(tc.ema_decay))
    if tc.ema_warmup == "ramp":
        d = np.minimum(d, (1.0 + k) / (10.0 + k))
    with np.errstate(divide="ignore"):
        return float(np.exp(np.sum(np.log(d))))
