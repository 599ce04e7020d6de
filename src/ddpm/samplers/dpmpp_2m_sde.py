"""``dpm++2m-sde``: DPM-Solver++(2M) for the diffusion SDE (Lu et al. 2022b, section 5; diffusers'
``algorithm_type="sde-dpmsolver++"``, midpoint).

x_{i+1} = (sigma_{i+1}/sigma_i) e^{-h} x_i + alpha_{i+1} (1 - e^{-2h}) D_i
          + sigma_{i+1} sqrt(1 - e^{-2h}) z_i,
D_i as in ``dpm++2m``. Conventions as ``dpm++2m`` (:mod:`ddpm.samplers.dpmpp_2m`): K = NFE,
first step first order, final step to sigma = 0 returns x0 (its noise coefficient is 0), clipping
by the chain, no mid-chain start. Stochastic: exactly one ``noise.next()`` per step (also the
last, where it is multiplied by 0), so image k's stream and result do not depend on the batch.
"""

from __future__ import annotations

from . import register
from .dpmpp_2m import MultistepDPMpp


@register
class DPMpp2MSDE(MultistepDPMpp):
    name = "dpm++2m-sde"
    help = "DPM-Solver++(2M) SDE (Lu et al. 2022b), stochastic, 1 network call per step"
    sde = True
