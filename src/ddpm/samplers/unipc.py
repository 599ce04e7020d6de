"""``unipc``: UniPC with the B(h) = e^h - 1 variant ("bh2"), data prediction (Zhao et al. 2023,
section 3, Algorithms 1-3): the UniP-p predictor plus the UniC corrector, which reuses the network
call made at the predicted point, so the corrector costs no extra call.

Order p = 2 (default) or 3: ``sampler_options={"order": 3}`` / ``ddpm sample --order 3``. Walking
the kept timesteps in descending order i = 0..K-1 (:mod:`ddpm.samplers._solver`), with x0_i the
(optionally clipped) data prediction at the *predicted* x_i:

- corrector (i >= 1): x_i <- (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i (e^{-h}-1) x0_{i-1}
  - alpha_i B(h) (sum_m rho^c_m D_m + rho^c_last (x0_i - x0_{i-1})), the rho^c solving the
  order conditions R rho = b of Algorithm 2 (rho = 1/2 at order 1);
- predictor: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h}-1) x0_i
  - alpha_{i+1} B(h) sum_m rho^p_m D_m, with D_m = (x0_{i-m} - x0_i)/r_m and
  r_m = (lambda_{i-m} - lambda_i)/h (rho^p = 1/2 at order 2, the solved system at order 3).

Conventions (diffusers' ``UniPCMultistepScheduler(solver_type="bh2", predict_x0=True,
lower_order_final=True, final_sigmas_type="zero")``, step for step): ``steps`` K = network calls =
kept timesteps; step i has order min(p, i + 1, K - i), so the last step (to sigma = 0) is first
order and returns x0_{K-1}, the prediction at the uncorrected last point. Deterministic (no step
noise); the chain's ``clip_denoised`` clamps every x0; no mid-chain start. The corrector raises
the order by one: UniPC-2 is third order (measured 3.00 at 96 -> 192 calls on the Gaussian test
problem of ``tests/test_solvers.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import register
from ._solver import check_order, descending_schedule, no_start
from .base import Chain, Denoiser, Sampler


def _order_system(hh: float, rks: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(R [order, order], b [order], B(h)) of UniPC's order conditions (Zhao et al. 2023, Alg. 2-3)
    for hh = -h (data prediction) and the ratios rks [order] (last one 1)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = math.expm1(hh)  # bh2
    R, b, fact = [], [], 1
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return np.stack(R), np.array(b), B_h


@register
class UniPC(Sampler):
    name = "unipc"
    help = "UniPC bh2 predictor-corrector (Zhao et al. 2023), order 2 or 3 (--order), 1 network call per step"

    def __init__(self, chain: Chain):
        super().__init__(chain)
        p = check_order(self.name, chain, (2, 3), 2)
        alpha, sigma, lam = descending_schedule(chain)
        K = len(chain)
        self.step_orders = [min(p, i + 1, K - i) for i in range(K)]
        # predictor of step i: x_{i+1} = px_i x_i + sum_j pm_i[j] x0_{i-j}
        px, pm = np.zeros(K), np.zeros((K, 3))
        # corrector at point i (uses step i-1's order): x_i = cx_i x_{i-1} + cnew_i x0_i + sum_j cm_i[j] x0_{i-1-j}
        cx, cnew, cm = np.zeros(K), np.zeros(K), np.zeros((K, 3))
        for i in range(K):
            o = self.step_orders[i]
            if sigma[i + 1] == 0.0:
                pm[i, 0] = 1.0  # to sigma = 0: x = x0_i
            else:
                h = lam[i + 1] - lam[i]
                hh = -h
                px[i] = sigma[i + 1] / sigma[i]
                pm[i, 0] = -alpha[i + 1] * math.expm1(hh)
                if o >= 2:
                    rks = np.array([(lam[i - m] - lam[i]) / h for m in range(1, o)] + [1.0])
                    R, bvec, B_h = _order_system(hh, rks, o)
                    rhos = np.array([0.5]) if o == 2 else np.linalg.solve(R[:-1, :-1], bvec[:-1])
                    for m in range(1, o):  # D_m = (x0_{i-m} - x0_i)/r_m
                        w = -alpha[i + 1] * B_h * rhos[m - 1] / rks[m - 1]
                        pm[i, m] += w
                        pm[i, 0] -= w
            if i >= 1:  # corrector of point i with step i-1's order, from x_{i-1}
                oc = self.step_orders[i - 1]
                j = i - 1
                h = lam[i] - lam[j]
                hh = -h
                rks = np.array([(lam[j - m] - lam[j]) / h for m in range(1, oc)] + [1.0])
                R, bvec, B_h = _order_system(hh, rks, oc)
                rhos = np.array([0.5]) if oc == 1 else np.linalg.solve(R, bvec)
                cx[i] = sigma[i] / sigma[j]
                cm[i, 0] = -alpha[i] * math.expm1(hh)
                for m in range(1, oc):  # D_m = (x0_{j-m} - x0_j)/r_m
                    w = -alpha[i] * B_h * rhos[m - 1] / rks[m - 1]
                    cm[i, m] += w
                    cm[i, 0] -= w
                w = -alpha[i] * B_h * rhos[-1]  # rho_last (x0_i - x0_j)
                cnew[i] = w
                cm[i, 0] -= w
        self.px, self.cx, self.cnew = chain.table(px), chain.table(cx), chain.table(cnew)
        self.pm = [chain.table(pm[:, j]) for j in range(3)]
        self.cm = [chain.table(cm[:, j]) for j in range(3)]

    def run(self, denoise: Denoiser, x: torch.Tensor, noise, callback=None, start: int | None = None
            ) -> torch.Tensor:
        no_start(self.name, self.chain, start)
        K = len(self.chain)
        hist: list[torch.Tensor] = []  # x0 predictions at the predicted points, newest last
        x_prev = x
        for i in range(K):
            k = K - 1 - i
            _, x0 = denoise.predict(x, k)
            if i >= 1:  # UniC: correct x_i with the call just made at the predicted x_i
                oc = self.step_orders[i - 1]
                xc = self.cx[i] * x_prev + self.cnew[i] * x0
                for m in range(oc):
                    xc = xc + self.cm[m][i] * hist[-1 - m]
                x = xc
            hist = (hist + [x0])[-3:]
            nxt = self.px[i] * x
            for m in range(self.step_orders[i]):
                nxt = nxt + self.pm[m][i] * hist[-1 - m]
            x_prev, x = x, nxt
            if callback is not None:
                callback(k, x0)
        return x
