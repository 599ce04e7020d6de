"""Shared arithmetic of the exponential-integrator solvers (DPM-Solver(++), UniPC, PLMS); no sampler here.

The solvers see the DDPM of the kept timesteps as x_n = alpha_n x0 + sigma_n eps with
alpha_n = sqrt(abar_n), sigma_n = sqrt(1 - abar_n) and the half log-SNR
lambda_n = log alpha_n - log sigma_n (Lu et al. 2022, section 2 and Eq. 3.4). They walk the kept
timesteps in *descending* order, i = 0..K-1 (i = 0 is s_{K-1}, the stand-in for x_T; chain step
k = K-1-i), and a final update goes to sigma = 0, alpha = 1 (lambda = +inf) and returns the data
prediction (diffusers' ``final_sigmas_type="zero"``). Every coefficient is computed here in
float64 NumPy before the loop and handed to the loop as 0-d tensors (``Chain.table``), so the loop
makes no host-device synchronisation.
"""

from __future__ import annotations

import numpy as np

from ..errors import SamplingOptionError
from .base import Chain


def descending_schedule(chain: Chain) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha [K+1], sigma [K+1], lambda [K+1]) float64 at the kept timesteps in descending order,
    then the final point alpha = 1, sigma = 0, lambda = +inf (index K)."""
    abar = np.asarray(chain.diffusion.alphas_cumprod, dtype=np.float64)[list(chain.timesteps)][::-1]
    alpha = np.append(np.sqrt(abar), 1.0)
    sigma = np.append(np.sqrt(1.0 - abar), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def first_order(alpha: np.ndarray, sigma: np.ndarray, lam: np.ndarray, i: int) -> tuple[float, float]:
    """(a, b) of DPM-Solver++(1) from point i to i+1: x_{i+1} = a x_i + b x0_i
    (DPM-Solver++ Eq. 8 with order 1; DDIM at eta = 0). To sigma = 0 it is x = x0_i."""
    if sigma[i + 1] == 0.0:
        return 0.0, 1.0
    h = lam[i + 1] - lam[i]
    return sigma[i + 1] / sigma[i], -alpha[i + 1] * np.expm1(-h)


def no_start(name: str, chain: Chain, start) -> int:
    """The first descending index (0): these solvers keep a history and cannot start mid-chain."""
    if start is not None and start != len(chain) - 1:
        raise SamplingOptionError(f"sampler {name!r} cannot start mid-chain (start={start}); use ancestral or ddim")
    return 0


def check_order(name: str, chain: Chain, allowed: tuple[int, ...], default: int) -> int:
    """The ``order`` sampler option (``sampler_options={"order": p}``, CLI ``--order``), validated."""
    opts = dict(chain.options or {})
    unknown = set(opts) - {"order"}
    if unknown:
        raise SamplingOptionError(f"sampler {name!r} takes only the option 'order', got {sorted(unknown)}")
    order = opts.get("order", default)
    if order is None:
        order = default
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in allowed:
        raise SamplingOptionError(f"sampler {name!r}: order must be one of {', '.join(map(str, allowed))}, "
                                  f"got {order!r}")
    return int(order)
