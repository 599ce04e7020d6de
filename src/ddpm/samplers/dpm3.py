"""``dpm3``: single-step DPM-Solver-3 in its data-prediction form (Lu et al. 2022, section 3.3,
Algorithm 2 with the intermediate points at kept timesteps; diffusers'
``DPMSolverSinglestepScheduler(solver_order=3)``, midpoint form).

K calls are grouped [1, 2, 3] (see :mod:`ddpm.samplers.dpm2` for the exact order list, ending
[..., 1, 2] + [1] or similar and always 1 at the last call, which returns x0). A group is one
third-order step from its first point s over three kept intervals, through the points u1, u2:
call 1 moves to u1 (DPM-Solver-1), call 2 moves from x_s to u2 (the second-order formula of
``dpm2``), call 3 completes the step from x_s:
    x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s
          + alpha_t ((e^{-h} - 1)/h + 1) (x0_{u2} - x0_s) / r2,    r2 = (lambda_{u2} - lambda_s)/h.
So K calls make about K/3 third-order steps. Deterministic; clipping by the chain; no mid-chain start.
"""

from __future__ import annotations

from . import register
from .dpm2 import SinglestepDPMpp


@register
class DPM3(SinglestepDPMpp):
    name = "dpm3"
    help = "single-step DPM-Solver-3 (Lu et al. 2022, data prediction), K calls = about K/3 steps"
    max_order = 3
