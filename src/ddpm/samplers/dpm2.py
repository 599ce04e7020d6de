"""``dpm2``: single-step DPM-Solver-2 in its data-prediction form (Lu et al. 2022, section 3.3 and
Algorithm 1 with r1 at the middle kept timestep; DPM-Solver++ section 4), and the single-step
machinery ``dpm3`` shares.

Budget split (diffusers' ``DPMSolverSinglestepScheduler``, ``lower_order_final=True``,
``final_sigmas_type="zero"``, step for step): ``steps`` K = network calls = kept timesteps, and
the K calls are grouped into solver steps by the order list
    order 2: [1, 2] * (K/2 - 1) + [1, 1]   (K even)   or   [1, 2] * (K // 2) + [1]   (K odd)
    order 3: [1, 2, 3] * (K/3 - 1) + [1, 2] + [1]   (K % 3 == 0),
             [1, 2, 3] * (K // 3) + [1]   (K % 3 == 1),   [1, 2, 3] * (K // 3) + [1, 2]   (K % 3 == 2)
and the last entry is always 1 (the update to sigma = 0 returns x0). A group [1, 2] is one
DPM-Solver-2 step from the group's first point s over two kept intervals: its first call (order
1) moves x to the intermediate kept point with DPM-Solver-1, the second call evaluates there, and
the step restarts from x_s:
    x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) (x0_s + (x0_u - x0_s) / (2 r)),
    h = lambda_t - lambda_s, r = (lambda_u - lambda_s)/h.
So K calls make about K/2 second-order steps. Deterministic (no step noise); the chain's
``clip_denoised`` clamps every x0; no mid-chain start.
"""

from __future__ import annotations

import numpy as np
import torch

from . import register
from ._solver import check_order, descending_schedule, first_order, no_start
from .base import Chain, Denoiser, Sampler


def order_list(K: int, order: int) -> list[int]:
    """The solver order of each of the K calls (diffusers' ``get_order_list`` with lower_order_final)."""
    if order == 3:
        if K % 3 == 0:
            orders = [1, 2, 3] * (K // 3 - 1) + [1, 2] + [1]
        elif K % 3 == 1:
            orders = [1, 2, 3] * (K // 3) + [1]
        else:
            orders = [1, 2, 3] * (K // 3) + [1, 2]
    elif order == 2:
        orders = [1, 2] * (K // 2 - 1) + [1, 1] if K % 2 == 0 else [1, 2] * (K // 2) + [1]
    else:
        orders = [1] * K
    orders[-1] = 1
    return orders


class SinglestepDPMpp(Sampler):
    """Single-step DPM-Solver++ of order ``max_order``: call i ends with
    x_{i+1} = cs_i x_g + sum_j cm_i[j] x0_{g+j}, g the first call of its group."""

    max_order = 2

    def __init__(self, chain: Chain):
        super().__init__(chain)
        p = check_order(self.name, chain, (self.max_order,), self.max_order)
        alpha, sigma, lam = descending_schedule(chain)
        K = len(chain)
        self.step_orders = order_list(K, p)
        cs, cm = np.zeros(K), np.zeros((K, 3))
        for i, o in enumerate(self.step_orders):
            if o == 1:
                cs[i], cm[i, 0] = first_order(alpha, sigma, lam, i)
                continue
            g = i - o + 1                                   # the group's first point
            h = lam[i + 1] - lam[g]
            cs[i] = sigma[i + 1] / sigma[g]
            b = -alpha[i + 1] * np.expm1(-h)               # -alpha_t (e^{-h} - 1)
            if o == 2:  # midpoint: D0 = x0_g, D1 = (x0_{g+1} - x0_g)/r0, x = ... + b (D0 + D1/2)
                r0 = (lam[i] - lam[g]) / h
                cm[i, :2] = b * np.array([1.0 - 0.5 / r0, 0.5 / r0])
            else:       # third order, midpoint form: D0 = x0_g, D1_1 = (x0_{g+2} - x0_g)/r0
                r0 = (lam[i] - lam[g]) / h
                e1 = alpha[i + 1] * (np.expm1(-h) / h + 1.0)
                cm[i] = b * np.array([1.0, 0.0, 0.0]) + e1 * np.array([-1.0, 0.0, 1.0]) / r0
        self.cs = chain.table(cs)
        self.cm = [chain.table(cm[:, j]) for j in range(3)]

    def run(self, denoise: Denoiser, x: torch.Tensor, noise, callback=None, start: int | None = None
            ) -> torch.Tensor:
        no_start(self.name, self.chain, start)
        K = len(self.chain)
        xs, group = x, []
        for i in range(K):
            k = K - 1 - i
            _, x0 = denoise.predict(x, k)
            o = self.step_orders[i]
            if o == 1:
                xs, group = x, [x0]
            else:
                group.append(x0)
            nxt = self.cs[i] * xs
            for j in range(o):
                nxt = nxt + self.cm[j][i] * group[j]
            x = nxt
            if callback is not None:
                callback(k, x0)
        return x


@register
class DPM2(SinglestepDPMpp):
    name = "dpm2"
    help = "single-step DPM-Solver-2 (Lu et al. 2022, data prediction), K calls = about K/2 steps"
