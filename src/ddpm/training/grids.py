"""The progress grids a training run writes every ``train.sample_every`` steps (rank 0).

Each grid shows the samples of the fixed seeds sample_seed .. sample_seed + sample_n - 1, drawn
with ``train.grid_sampler`` in ``train.grid_steps`` network calls (default DPM-Solver++(2M),
Lu et al. 2022, in 20 calls: about a tenth of the 200-step chain of the small configurations and
a fiftieth of the paper's 1000; ``grid_steps=0`` draws the full chain). A grid is a preview: the
few-step samples of a well-trained model look like its full-chain ones (README, the few-step
table), and the grid costs ~grid_steps forward passes of ``sample_n`` images, which the plan
counts (:func:`grid_calls`).

Early in a run the EMA still holds much of the initial, random weights (a share
decay^n after n updates, :func:`ddpm.training.schedules.ema_init_share`), so its samples say
little about how training goes. While that share is above ``RAW_SHARE`` the grid shows the EMA's
samples on the left and the raw (current) weights' on the right, separated by a white band.

Quality against training time: on the embedded digits (:func:`scorable`) the trainer also writes
the grid's digits Fréchet distance and classifier confidence into metrics.jsonl (:func:`score_grid`,
keys ``grid_step``, ``grid_fd``, ``grid_confidence``, ``grid_n`` in the record of the grid's step, or
the next record when the log cadence skips it; the same seeds every time, so a run shows when it
stops improving).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .schedules import ema_init_share

# Fewer grid samples than this are not scored (a 64-feature covariance from a handful is noise).
MIN_SCORED = 32
# Draw the raw weights' samples beside the EMA's while the EMA's initial-weight share is above this.
RAW_SHARE = 0.1


def grid_steps(cfg) -> int | None:
    """Network calls of one grid's chain: None (the full T-step chain) or 1..T."""
    n = int(cfg.train.grid_steps)
    return None if n <= 0 else min(n, int(cfg.diffusion.num_timesteps))


def shows_raw(cfg, step: int) -> bool:
    """Whether the grid at ``step`` also shows the raw weights (module docstring)."""
    return ema_init_share(step, cfg.train) > RAW_SHARE


def grid_calls(cfg, total_steps: int | None = None) -> tuple[int, int]:
    """(grids, network calls of ``sample_n`` images) a run to ``total_steps`` draws in all.

    Used by the plan to add the grids' time to the run's estimate. The chain of a sampler makes
    about one network call per step (pndm: +1 per chain; ignored here)."""
    tc = cfg.train
    total = int(total_steps if total_steps is not None else tc.total_steps)
    if not tc.sample_every:
        return 0, 0
    steps = grid_steps(cfg) or int(cfg.diffusion.num_timesteps)
    grids = [s for s in range(tc.sample_every, total + 1, tc.sample_every)]
    calls = sum(steps * (2 if shows_raw(cfg, s) else 1) for s in grids)
    return len(grids), calls


def _draw(diffusion, model, cfg, device, amp_dtype, labels) -> np.ndarray:
    from ..images import to_uint8
    from ..sampling import sample

    tc = cfg.train
    seeds = list(range(tc.sample_seed, tc.sample_seed + tc.sample_n))
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    x = sample(diffusion, model, shape, seeds, batch_size=min(tc.sample_n, 256), device=device,
               sampler=tc.grid_sampler, steps=grid_steps(cfg), amp_dtype=amp_dtype, progress=False,
               model_kwargs=None if labels is None else {"y": labels})
    return to_uint8(x)


def _tile(u8: np.ndarray, labels, cfg) -> np.ndarray:
    from ..images import make_grid

    if labels is None:
        return make_grid(u8)
    from ..conditioning import class_grid

    cells, cols = class_grid(u8, labels.numpy())
    return make_grid(cells, nrow=cols)


def scorable(cfg) -> bool:
    """Whether a run's samples can be scored by :mod:`ddpm.evaluate.digits_quality`: grey runs on
    the embedded digits at 8x8 or a multiple (shrunk back by the enlargement's least-squares
    inverse, :func:`ddpm.evaluate.digits_quality.shrink_enlarged`)."""
    m = cfg.model
    return cfg.data.source == "digits" and m.in_channels == 1 and m.resolution % 8 == 0


def score_grid(cfg, u8: np.ndarray) -> dict | None:
    """The digits quality of a grid's EMA samples (uint8 [N, R, R, 1]) for metrics.jsonl:
    ``{"grid_fd", "grid_confidence", "grid_n"}``, or None when the run is not :func:`scorable`.
    With N = sample_n (64) the Fréchet distance is biased upwards against 500-sample scores, but
    the same seeds at every grid make the numbers of one run comparable: quality against time."""
    if u8 is None or not scorable(cfg) or len(u8) < MIN_SCORED:
        return None
    from ..evaluate.digits_quality import digits_quality, shrink_enlarged

    res = digits_quality(shrink_enlarged(u8))
    return {"grid_fd": float(res["fd"]), "grid_confidence": float(res["confidence"]), "grid_n": int(len(u8))}


def write_sample_grid(path: Path, diffusion, ema_model: torch.nn.Module, cfg, device: torch.device,
                      amp_dtype: torch.dtype | None, raw_model: torch.nn.Module | None = None) -> np.ndarray:
    """EMA samples for the fixed seeds -> one PNG grid (class-conditional runs: image k of class
    k mod C, one row per class); with ``raw_model`` (the training network, put in eval mode for
    the draw and back in train mode after) its samples of the same seeds are tiled to the right.
    Returns the EMA samples, uint8 [sample_n, R, R, C]."""
    from PIL import Image

    from ..atomic import atomic_save_image
    from ..images import grid_scale

    C = int(getattr(cfg.model, "num_classes", 0))
    labels = torch.arange(cfg.train.sample_n) % C if C > 0 else None
    ema_u8 = _draw(diffusion, ema_model, cfg, device, amp_dtype, labels)
    grid = _tile(ema_u8, labels, cfg)
    if raw_model is not None:
        was_training = raw_model.training
        raw_model.eval()
        try:
            raw = _tile(_draw(diffusion, raw_model, cfg, device, amp_dtype, labels), labels, cfg)
        finally:
            raw_model.train(was_training)
        band = np.full((grid.shape[0], max(2, cfg.model.resolution // 2), grid.shape[2]), 255, np.uint8)
        grid = np.concatenate([grid, band, raw], axis=1)
    s = grid_scale(cfg.model.resolution)
    if s > 1:
        grid = grid.repeat(s, axis=0).repeat(s, axis=1)
    mode = "L" if grid.shape[2] == 1 else ("RGBA" if grid.shape[2] == 4 else "RGB")
    atomic_save_image(path, Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode))
    return ema_u8
