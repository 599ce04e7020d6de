"""``ancestral``: paper Algorithm 2 as the official code's p_sample runs it (section 3.2, Eq. 11).

x_{k-1} = mu_theta(x_k, k) + sigma_k z, with mu_theta the posterior mean at the (clipped) x0
prediction and z = 0 at the last step (Algorithm 2: z = 0 at t = 1), so the final output is the
(clipped) x0 prediction. sigma_k^2 is the model's variance: fixedlarge (beta_t, beta~_2 at index
0), fixedsmall (beta~_t) or the learned one. On a respaced chain the betas are the spaced ones.
One noise draw per step, also the last (where it is masked), so image k's stream is fixed.

Option ``var``: "model" (default, the above) or "analytic": sigma_k^2 = Analytic-DPM's optimal
variance (Bao et al. 2022, Theorem 1; :mod:`ddpm.analytic`) from the option ``gamma`` (the
model's Gamma_n [T]), on the full or a respaced chain, also for a learned-variance model.
"""

from __future__ import annotations

import numpy as np
import torch

from ..analytic import chain_variance, check_var_option
from . import register
from .base import Chain, StepSampler, last_step_mask


@register
class Ancestral(StepSampler):
    name = "ancestral"
    help = "paper Algorithm 2 (p_sample of the official code), 1 network call per step"

    def __init__(self, chain: Chain):
        super().__init__(chain)
        d = chain.spaced
        mask = last_step_mask(chain)
        self.mask = chain.table(mask)
        self.analytic = check_var_option(chain.options) == "analytic"
        if self.analytic:
            self.std = chain.table(mask * np.sqrt(chain_variance(chain)))
        else:
            self.std = chain.table(mask * np.exp(0.5 * d.coef_arrays["fixed_log_variance"]))

    def step(self, k: int, x: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.chain.spaced
        mean, _, log_var, x0 = d.mean_variance_from_output(out, x, self.chain.coefs[k], self.chain.clip_denoised)
        if d.learned_variance and not self.analytic:
            return mean + self.mask[k] * torch.exp(0.5 * log_var) * z, x0
        return mean + self.std[k] * z, x0
