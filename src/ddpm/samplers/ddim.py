"""``ddim``: DDIM (Song et al. 2021, Eq. 12), deterministic at eta = 0.

x_{k-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z with
s = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev) (Eq. 16) and eps recomputed
from the (clipped) x0. eta = 1 gives s^2 = beta~, the ancestral step with fixedsmall. At eta = 0
this is DPM-Solver-1 (first-order exponential integrator, Lu et al. 2022). One noise draw per
step (unused at eta = 0 and masked at the last step), so image k's stream is fixed.

Option ``var`` = "analytic" (Analytic-DDIM, Bao et al. 2022, Theorem 1 with lambda^2 = s^2):
the mean keeps Eq. 12's coefficients with s, and the added noise's variance becomes the optimal
sigma*^2 from the option ``gamma`` (Gamma_n [T]); at eta = 0 this adds noise (lambda = 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..analytic import chain_variance, check_var_option
from ..errors import SamplingOptionError
from . import register
from .base import Chain, StepSampler, last_step_mask


@register
class DDIM(StepSampler):
    name = "ddim"
    help = "DDIM (Song et al. 2021), deterministic at eta 0, 1 network call per step"

    def __init__(self, chain: Chain):
        super().__init__(chain)
        eta = chain.eta
        if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
            raise SamplingOptionError(f"eta must be a number >= 0, got {eta!r}")
        d = chain.spaced
        mask = last_step_mask(chain)
        abar, abar_prev = d.alphas_cumprod, d.alphas_cumprod_prev
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev) * mask
        noise_sd = sigma
        if check_var_option(chain.options) == "analytic":
            noise_sd = mask * np.sqrt(chain_variance(chain, lam2=sigma ** 2))
        self.sigma = chain.table(noise_sd)
        self.sqrt_abar_prev = chain.table(np.sqrt(abar_prev))
        self.dir_coef = chain.table(np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.0)))

    def step(self, k: int, x: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.chain.coefs[k]
        _, _, _, x0 = self.chain.spaced.mean_variance_from_output(out, x, c, self.chain.clip_denoised)
        eps = (c.sqrt_recip_alphas_cumprod * x - x0) / c.sqrt_recipm1_alphas_cumprod
        return self.sqrt_abar_prev[k] * x0 + self.dir_coef[k] * eps + self.sigma[k] * z, x0
