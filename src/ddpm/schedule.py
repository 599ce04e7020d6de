"""Beta schedules beta_1..beta_T (paper section 4 and Appendix B), as float64 numpy arrays of shape [T].

Index ``i`` of the returned array is the paper's beta_{i+1} (0-based time, docs/ARCHITECTURE.md).
``linear`` with the defaults is the paper's schedule (1e-4 -> 0.02, T = 1000). The official
schedules take ``beta_start``/``beta_end`` literally for every T; to keep the paper's overall
noise level at a smaller T, pass ``beta_start * 1000 / T`` and ``beta_end * 1000 / T``
(improved-diffusion's rescaling). ``cosine`` (improved-diffusion) ignores both.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError, suggest
from .options import BETA_SCHEDULES as SCHEDULES  # the one declaration of the names

# improved-diffusion's cosine schedule: offset s and the cap that keeps beta < 1 near t = T.
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


class ScheduleError(ConfigError, ValueError):
    """An unknown schedule name or an invalid beta range (a ``ValueError`` and a ``ConfigError``)."""


def _warmup(beta_start: float, beta_end: float, num_timesteps: int, frac: float) -> np.ndarray:
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    n = int(num_timesteps * frac)
    betas[:n] = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return betas


def cosine_alpha_bar(u: np.ndarray | float) -> np.ndarray:
    """improved-diffusion's abar(u) = cos^2(((u + s) / (1 + s)) * pi / 2) for u = t / T in [0, 1]."""
    return np.cos((np.asarray(u, dtype=np.float64) + COSINE_S) / (1.0 + COSINE_S) * math.pi / 2) ** 2


def get_beta_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The betas of schedule ``name``: float64 [num_timesteps], betas[i] = beta_{i+1}.

    Names (paper section 4; Nichol & Dhariwal 2021): ``linear``, ``quad``, ``warmup10``, ``warmup50``, ``const``,
    ``jsd`` (beta = 1/T, 1/(T-1), ..., 1; the last is 1 so abar_T = 0) and ``cosine``
    (beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)).

    Raises:
        ScheduleError (a ValueError): unknown name, T < 1, or a beta outside (0, 1].
    """
    T = int(num_timesteps)
    if T < 1 or T != num_timesteps:
        raise ScheduleError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "warmup10":
        betas = _warmup(beta_start, beta_end, T, 0.1)
    elif name == "warmup50":
        betas = _warmup(beta_start, beta_end, T, 0.5)
    elif name == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name == "cosine":
        u = np.arange(T + 1, dtype=np.float64) / T
        abar = cosine_alpha_bar(u)
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], COSINE_MAX_BETA)
    else:
        raise ScheduleError(f"unknown beta schedule {name!r}; expected one of {', '.join(SCHEDULES)}"
                            f"{suggest(name, SCHEDULES)}")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (T,) or not np.all((betas > 0) & (betas <= 1)):
        raise ScheduleError(f"beta schedule {name!r} with beta_start={beta_start}, beta_end={beta_end}, T={T} "
                            f"gives betas outside (0, 1] (min {betas.min():.3g}, max {betas.max():.3g})")
    return betas
