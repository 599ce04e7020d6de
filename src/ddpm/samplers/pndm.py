"""``pndm``: PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, section 3.3,
Eq. 9 for the transfer and Eq. 12-13 for the linear multistep part).

The transfer phi(x, eps, t -> t') moves x_t along DDIM's deterministic path (PNDM Eq. 9):
    x_{t'} = sqrt(abar_{t'}/abar_t) x_t
             - (abar_{t'} - abar_t) eps / (abar_t sqrt(1 - abar_{t'}) + sqrt(abar_t (1 - abar_t) abar_{t'})),
and PLMS feeds it the Adams-Bashforth combination of the last eps evaluations
(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3)/24, with fewer terms while the history fills. The start is
diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (the PLMS of latent diffusion): the first step
is taken twice, once with e(x_T) and again from x_T with the mean of e(x_T) and e at that
first estimate (a Heun step), and the history keeps e(x_T) and the later evaluations.

Budget (the convention of every sampler here: ``steps`` K = network calls): the warm-up's extra
call means K calls walk K - 1 kept timesteps, so :meth:`PNDM.chain_steps` asks the driver for a
chain of K - 1 timesteps (K >= 3); diffusers' ``num_inference_steps`` N is K - 1. The final
transfer goes to abar = 1 (sigma = 0; diffusers' ``set_alpha_to_one``). Deterministic; with the
chain's ``clip_denoised`` every eps is the one recomputed from the clamped x0 prediction; no
mid-chain start. Observed global order 2 (2.08 at 96 -> 192 calls on the Gaussian test problem
of ``tests/test_solvers.py``), not the 4 of its Adams-Bashforth weights. In float32 its
transfers multiply x by sqrt(abar'/abar) (a product of sqrt(1/abar_{T-1}) ~ 158 over a T = 1000
run), so rounding is amplified more than in the data-prediction solvers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SamplingOptionError
from . import register
from ._solver import check_order, no_start
from .base import Chain, Denoiser, Sampler

# Adams-Bashforth weights by history length (newest first), PNDM Eq. 12 and its warm-up.
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _transfer(abar: float, abar_next: float) -> tuple[float, float]:
    """(cx, ce) of PNDM Eq. 9: x_{t'} = cx x_t - ce eps, float64."""
    denom = abar * np.sqrt(1.0 - abar_next) + np.sqrt(abar * (1.0 - abar) * abar_next)
    return float(np.sqrt(abar_next / abar)), float((abar_next - abar) / denom)


@register
class PNDM(Sampler):
    name = "pndm"
    help = "PLMS pseudo linear multistep (Liu et al. 2022), K calls walk K-1 timesteps"

    @classmethod
    def chain_steps(cls, nfe: int) -> int:
        """Kept timesteps for ``nfe`` network calls: nfe - 1 (the Heun warm-up makes one extra call)."""
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 3:
            raise SamplingOptionError(f"sampler 'pndm' needs steps (network calls) >= 3, got {nfe!r}")
        return int(nfe) - 1

    def __init__(self, chain: Chain):
        super().__init__(chain)
        check_order(self.name, chain, (4,), 4)
        if len(chain) < 2:
            raise SamplingOptionError("sampler 'pndm' needs a chain of at least 2 timesteps (steps >= 3)")
        N = len(chain)
        abar = np.asarray(chain.diffusion.alphas_cumprod, dtype=np.float64)[list(chain.timesteps)][::-1]
        abar = np.append(abar, 1.0)  # descending, then the final abar = 1
        cx, ce = zip(*[_transfer(abar[i], abar[i + 1]) for i in range(N)])
        self.cx, self.ce = chain.table(cx), chain.table(ce)
        self.ab = {n: [chain.table([w])[0] for w in ws] for n, ws in _AB.items()}

    @property
    def nfe(self) -> int:
        return len(self.chain) + 1

    def run(self, denoise: Denoiser, x: torch.Tensor, noise, callback=None, start: int | None = None
            ) -> torch.Tensor:
        no_start(self.name, self.chain, start)
        N = len(self.chain)
        # warm-up (Heun): e0 at x_T, a first estimate of x_1, e at it, then x_1 from x_T with the mean
        e0, x0 = denoise.predict(x, N - 1)
        x1 = self.cx[0] * x - self.ce[0] * e0
        e1, _ = denoise.predict(x1, N - 2)
        x = self.cx[0] * x - self.ce[0] * (0.5 * (e0 + e1))
        if callback is not None:
            callback(N - 1, x0)
        ets = [e0]  # history: e(x_T), then one evaluation per later point (newest last)
        for i in range(1, N):
            k = N - 1 - i
            e, x0 = denoise.predict(x, k)
            ets = (ets + [e])[-4:]
            w = self.ab[len(ets)]
            comb = w[0] * ets[-1]
            for j in range(1, len(ets)):
                comb = comb + w[j] * ets[-1 - j]
            x = self.cx[i] * x - self.ce[i] * comb
            if callback is not None:
                callback(k, x0)
        return x
