"""A time budget: ``ddpm train --minutes M`` turns M minutes into a number of steps.

From the plan's measured seconds per step and per progress-grid network call
(:func:`ddpm.plan.measure_step`, :func:`ddpm.plan.measure_grid_call`), :func:`fit_minutes`
chooses ``train.total_steps`` so that the steps plus the progress grids take about M minutes,
with ``GRIDS`` grids, the last at the end (``train.sample_every`` and ``train.save_every`` =
total / GRIDS, unless 0), and the warm-up capped at a fifth of the run. A decaying ``train.lr_schedule`` reads total_steps, so its
length follows. The planned total is written into the run's config.json like any other value:
``--resume auto`` continues that run without planning again. The estimate excludes the data
loader (the plan's loader line says whether it keeps up) and the run's start-up.
"""

from __future__ import annotations

from dataclasses import replace

from .config import Config
from .errors import ConfigError

GRIDS = 4            # progress grids (and checkpoints) in a budgeted run
MAX_WARMUP_SHARE = 5  # warm-up at most 1/5 of the run


def _shaped(cfg: Config, every: int) -> Config:
    """``cfg`` with GRIDS·every steps, a grid and a checkpoint every ``every`` steps (the last at the end)."""
    tc = cfg.train
    steps = GRIDS * every
    return replace(cfg, train=replace(
        tc, total_steps=steps, warmup_steps=min(tc.warmup_steps, steps // MAX_WARMUP_SHARE),
        sample_every=every if tc.sample_every else 0, save_every=every if tc.save_every else 0)).validate()


def run_seconds(cfg: Config, step_s: float, grid_call_s: float) -> float:
    """Estimated seconds of the whole run: its steps plus its progress grids."""
    from .training.grids import grid_calls

    return cfg.train.total_steps * step_s + grid_calls(cfg)[1] * grid_call_s


def fit_minutes(cfg: Config, minutes: float, step_s: float, grid_call_s: float) -> Config:
    """``cfg`` with the most steps (a multiple of GRIDS, the cadence of the module docstring) whose
    estimated run time fits in ``minutes``. Raises :class:`ConfigError` when not even GRIDS steps fit."""
    if not minutes > 0:
        raise ConfigError(f"--minutes {minutes}: expected a positive number of minutes")
    budget = 60.0 * minutes

    def fits(every: int) -> bool:
        return run_seconds(_shaped(cfg, every), step_s, grid_call_s) <= budget

    lo, hi = 0, max(1, int(budget / step_s) // GRIDS)  # fits(lo) by convention; hi is an upper bound
    if not fits(1):
        raise ConfigError(f"--minutes {minutes:g}: too short for this model here (a step takes {step_s:.3g} s, "
                          f"a progress grid network call {grid_call_s:.3g} s); give more minutes, a smaller "
                          f"--size, or --set train.sample_every=0")
    while lo < hi:  # the largest `every` that fits (run time grows with it)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return _shaped(cfg, max(lo, 1))


def budget_line(cfg: Config, minutes: float, step_s: float, grid_call_s: float) -> str:
    est = run_seconds(cfg, step_s, grid_call_s)
    return (f"time budget: --minutes {minutes:g} -> {cfg.train.total_steps:,} steps at the measured {step_s:.3g} s "
            f"per step, grids and checkpoints every {cfg.train.sample_every or cfg.train.save_every:,} steps, "
            f"warm-up {cfg.train.warmup_steps}"
            + (f", lr {cfg.train.lr_schedule} to 0 at step {cfg.train.total_steps:,}"
               if cfg.train.lr_schedule != "constant" else "")
            + f"; estimated {est / 60:.1f} min (steps and grids; the loader and start-up not counted)")


def plan_minutes(cfg: Config, minutes: float, device, world_size: int = 1) -> tuple[Config, tuple, list[str]]:
    """What ``ddpm train --minutes M`` does before the plan is printed: measure a step and a grid
    call on ``device`` (:mod:`ddpm.plan`), fit the run into M minutes. Returns (the fitted config,
    (step measure, grid call seconds) for :func:`ddpm.plan.build_plan`'s ``measured``, [the
    budget's plan line]). One process only: under torchrun every rank would measure its own."""
    from .plan import measure_grid_call, measure_step

    if world_size > 1:
        raise ConfigError("--minutes plans a single-process run; under torchrun give --set train.total_steps=N")
    m = measure_step(cfg, device, world_size)
    call_s = measure_grid_call(cfg, device)
    fitted = fit_minutes(cfg, minutes, m.seconds, call_s)
    return fitted, (m, call_s), [budget_line(fitted, minutes, m.seconds, call_s)]
