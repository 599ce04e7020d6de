"""``dpm++2m``: DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al.
2022b, "DPM-Solver++", Algorithm 2), and the multistep machinery ``dpm++3m`` and ``dpm++2m-sde`` share.

Walking the kept timesteps in descending order i = 0..K-1 (see :mod:`ddpm.samplers._solver`),
with h_i = lambda_{i+1} - lambda_i, r = h_{i-1}/h_i and x0_i the (optionally clipped) data
prediction at point i:

    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2r)) x0_i - (1/(2r)) x0_{i-1}            (Algorithm 2's "midpoint" form)

Conventions (diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
final_sigmas_type="zero", lower_order_final=True)``, step for step):

- ``steps`` K = network calls (NFE) = kept timesteps; one call per step, none extra.
- Warm-up: step i uses order min(p, i + 1) (the first step is DPM-Solver++(1) = DDIM).
- The last step (i = K-1) goes to sigma = 0 with order 1, i.e. it returns x0_{K-1}; with K < 15
  the step before it is at most second order (``lower_order_final``: stabilises few-step runs).
- Deterministic: no step noise is drawn (x_T is the stream's first draw, made by the driver).
- The chain's ``clip_denoised`` clamps every x0_i to [-1, 1] (the official sampler clips;
  diffusers' solvers do not by default).
- It keeps a history of x0 predictions, so it cannot start mid-chain (``start``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import register
from ._solver import check_order, descending_schedule, first_order, no_start
from .base import Chain, Denoiser, Sampler


class MultistepDPMpp(Sampler):
    """DPM-Solver++ multistep of order ``order`` (2 or 3; ODE) or the 2M SDE variant (``sde=True``).

    Every step is x_{i+1} = cx_i x_i + sum_j cm_i[j] x0_{i-j} (+ cz_i z_i for the SDE), with the
    coefficients [K] computed before the loop in float64.
    """

    max_order = 2
    orders = (2,)
    sde = False

    def __init__(self, chain: Chain):
        super().__init__(chain)
        p = check_order(self.name, chain, self.orders, self.max_order)
        alpha, sigma, lam = descending_schedule(chain)
        K = len(chain)
        cx, cz = np.zeros(K), np.zeros(K)
        cm = np.zeros((K, 3))
        self.step_orders = []
        for i in range(K):
            o = min(p, i + 1)
            if i == K - 1:
                o = 1                         # to sigma = 0: x = x0 (final_sigmas_type "zero")
            elif i == K - 2 and K < 15:
                o = min(o, 2)                 # lower_order_final
            self.step_orders.append(o)
            if sigma[i + 1] == 0.0:
                cx[i], cm[i, 0] = 0.0, 1.0
                continue
            h = lam[i + 1] - lam[i]
            if self.sde:
                # DPM-Solver++(2M) SDE (DPM-Solver++ section 5 / Appendix): the linear part decays
                # as e^{-2h} and noise sigma_{i+1} sqrt(1 - e^{-2h}) is injected.
                a = sigma[i + 1] / sigma[i] * np.exp(-h)
                b = alpha[i + 1] * -np.expm1(-2.0 * h)
                cz[i] = sigma[i + 1] * np.sqrt(-np.expm1(-2.0 * h))
            else:
                a, b = first_order(alpha, sigma, lam, i)
            cx[i] = a
            if o == 1:
                cm[i, 0] = b
            elif o == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                cm[i, 0] = b * (1.0 + 0.5 / r0)
                cm[i, 1] = -b * 0.5 / r0
            else:  # third order (DPM-Solver++ Appendix, multistep 3M)
                r0 = (lam[i] - lam[i - 1]) / h
                r1 = (lam[i - 1] - lam[i - 2]) / h
                e1 = alpha[i + 1] * (np.expm1(-h) / h + 1.0)
                e2 = -alpha[i + 1] * ((np.expm1(-h) + h) / h ** 2 - 0.5)
                # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1,
                # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1)
                d10 = np.array([1.0, -1.0, 0.0]) / r0
                d11 = np.array([0.0, 1.0, -1.0]) / r1
                D1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                D2 = (d10 - d11) / (r0 + r1)
                cm[i] = b * np.array([1.0, 0.0, 0.0]) + e1 * D1 + e2 * D2
        self.cx, self.cz = chain.table(cx), chain.table(cz)
        self.cm = [chain.table(cm[:, j]) for j in range(3)]

    def run(self, denoise: Denoiser, x: torch.Tensor, noise, callback=None, start: int | None = None
            ) -> torch.Tensor:
        no_start(self.name, self.chain, start)
        K = len(self.chain)
        hist: list[torch.Tensor] = []  # x0 predictions, newest last
        for i in range(K):
            k = K - 1 - i
            _, x0 = denoise.predict(x, k)
            hist = (hist + [x0])[-3:]
            o = self.step_orders[i]
            nxt = self.cx[i] * x
            for j in range(o):
                nxt = nxt + self.cm[j][i] * hist[-1 - j]
            if self.sde:
                nxt = nxt + self.cz[i] * noise.next()
            x = nxt
            if callback is not None:
                callback(k, x0)
        return x


@register
class DPMpp2M(MultistepDPMpp):
    name = "dpm++2m"
    help = "DPM-Solver++(2M) (Lu et al. 2022b), deterministic, 1 network call per step"
