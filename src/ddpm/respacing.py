"""Shorter reverse chains through a subset of the timesteps (improved DDPM's respacing; DDIM).

:func:`space_timesteps` chooses which 0-based indices a K-step sampler visits and
:func:`respace` builds the K-step Gaussian diffusion through them whose marginals
q(x_{s_k} | x_0) equal the original ones (Nichol & Dhariwal 2021, section 4; Song et al. 2021).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .autospacing import resolve_spacing
from .diffusion import GaussianDiffusion
from .errors import SamplingOptionError, suggest
from .options import TIMESTEP_SPACINGS


def check_spacing(spacing: str) -> str:
    """``spacing`` if it is a known name, else a :class:`SamplingOptionError` listing the choices."""
    if spacing not in TIMESTEP_SPACINGS:
        raise SamplingOptionError(f"unknown timestep spacing {spacing!r}; expected one of "
                                  f"{', '.join(TIMESTEP_SPACINGS)}{suggest(str(spacing), TIMESTEP_SPACINGS)}")
    return spacing


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing",
                    alphas_cumprod: Sequence[float] | np.ndarray | None = None) -> list[int]:
    """The ``steps`` kept 0-based timestep indices out of ``num_timesteps``, ascending.

    ``auto`` depends on the sampler, which this function does not know: sampling resolves it first
    (:func:`ddpm.autospacing.resolve_spacing`); here, with no sampler, it is that fallback (trailing).

    ``trailing`` (default): round(T - k T/steps) - 1 for k < steps; always keeps T-1 (diffusers'
    "trailing"). ``leading``: k * (T // steps), starts at 0. ``linspace``: round(linspace(0, T-1, steps)).
    ``quadratic``: round(linspace(0, sqrt(0.8 T), steps)^2) (DDIM's CIFAR-10 choice, Song et al.
    2021, Appendix D.2: dense near the data). ``logsnr``: uniform in the log-SNR
    log(abar/(1 - abar)) between index 0 and T-1, each rounded to the nearest index (the DPM-Solver
    papers' choice for few steps); needs ``alphas_cumprod`` [T]. Where rounding makes two of these
    coincide (many steps), later ones are moved up (or, at the top, earlier ones down) so there
    are exactly ``steps`` distinct indices.
    """
    T = int(num_timesteps)
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= T:
        raise SamplingOptionError(f"sampling steps must be an integer in 1..{T}, got {steps!r}")
    steps = int(steps)
    check_spacing(spacing)
    spacing = resolve_spacing(spacing, None, steps)
    if spacing == "trailing":
        ratio = T / steps
        kept = np.round(T - np.arange(steps) * ratio).astype(np.int64) - 1
    elif spacing == "leading":
        kept = np.arange(steps, dtype=np.int64) * (T // steps)
    elif spacing == "linspace":
        kept = np.linspace(0, T - 1, steps).round().astype(np.int64)
    elif spacing == "quadratic":
        kept = _distinct(np.linspace(0.0, np.sqrt(0.8 * T), steps) ** 2, T, spacing)
    else:  # logsnr
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise SamplingOptionError(f"spacing 'logsnr' needs the diffusion's alphas_cumprod of length {T}")
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        logsnr = np.log(abar) - np.log1p(-abar)  # strictly decreasing in the index
        targets = np.linspace(logsnr[0], logsnr[-1], steps)
        # fractional index of each target by linear interpolation of the decreasing curve
        kept = _distinct(np.interp(targets[::-1], logsnr[::-1], np.arange(T, dtype=np.float64)[::-1])[::-1], T,
                         spacing)
    out = sorted(set(int(i) for i in kept))
    if len(out) != steps or out[0] < 0 or out[-1] > T - 1:  # pragma: no cover - guarded by the formulas
        raise SamplingOptionError(f"spacing {spacing!r} gives {out} for T={T}, steps={steps}")
    return out


def _distinct(points: np.ndarray, T: int, spacing: str) -> np.ndarray:
    """Ascending real ``points`` rounded to indices, each at least one above the previous (and at
    most T-1: where the bumps would pass T-1, the top ones are moved down instead)."""
    kept = np.round(np.sort(points)).astype(np.int64)
    for k in range(1, len(kept)):
        kept[k] = max(kept[k], kept[k - 1] + 1)
    kept[-1] = min(kept[-1], T - 1)
    for k in range(len(kept) - 2, -1, -1):  # then down from T-1 where the bumps overran it
        kept[k] = min(kept[k], kept[k + 1] - 1)
    if kept[0] < 0:  # pragma: no cover - steps <= T is checked by the caller
        raise SamplingOptionError(f"spacing {spacing!r} cannot place {len(kept)} distinct steps in 0..{T - 1}")
    return kept


def respace(diffusion: GaussianDiffusion, use_timesteps: Sequence[int]) -> tuple[GaussianDiffusion, list[int]]:
    """A shorter chain through the kept steps s_0 < s_1 < ... (improved-diffusion's SpacedDiffusion).

    beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar_{s_{-1}} = 1), so the kept marginals
    q(x_{s_k} | x_0) are unchanged. Where s_k = s_{k-1} + 1 that ratio is exactly alpha_{s_k}, and
    beta_{s_k} itself is used, so keeping every step reproduces the original chain bit for bit.

    Returns: (diffusion over len(use_timesteps) steps with the same options, timestep_map) where
        timestep_map[k] = s_k is the original index the network must see at chain step k.
    """
    T = diffusion.num_timesteps
    use = sorted(set(int(i) for i in use_timesteps))
    if not use or use[0] < 0 or use[-1] >= T:
        raise SamplingOptionError(f"kept timesteps must be a non-empty subset of 0..{T - 1}, got {list(use_timesteps)}")
    if len(use) < 2:
        raise SamplingOptionError("sampling steps must be >= 2: a respaced chain needs at least 2 steps")
    betas, prev, last_abar = [], -1, 1.0
    for i in use:
        betas.append(diffusion.betas[i] if i == prev + 1 else 1.0 - diffusion.alphas_cumprod[i] / last_abar)
        prev, last_abar = i, diffusion.alphas_cumprod[i]
    spaced = GaussianDiffusion(np.array(betas, dtype=np.float64), mean_type=diffusion.mean_type,
                               var_type=diffusion.var_type, loss_type=diffusion.loss_type)
    return spaced, use
