"""SDEdit: image to image by noising a guide and running the reverse chain from there.

Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", ICLR 2022 (Algorithm 1, in the DDPM/VP discretisation). For a strength S in (0, 1]:

    t0      = round(S * T) - 1                    (0-based; S = 1 gives T - 1, the chain's top)
    x_{t0}  = sqrt(abar_{t0}) x_guide + sqrt(1 - abar_{t0}) eps,   eps ~ N(0, I)  (paper Eq. 4)
    x_0     = the reverse chain of any registered sampler from x_{t0}

For a K-step sampler the chain walked is the K-step chain's kept steps at or below t0 (so S = 1
is exactly :func:`ddpm.sample` from x_T = q(x_{T'} | x_guide) with the same seeds, T' the top
kept step); the guide is noised to the top kept step t0' <= t0 (t0' = t0 on the full chain).
Small S keeps the guide's layout and colours, large S follows the model (the paper's
realism-faithfulness trade-off sits near S ~ 0.4-0.6 for stroke paintings).

Randomness (image k depends only on seeds[k]): eps is the first draw of its stream, then the
sampler's step noise, exactly as :func:`ddpm.sample` draws x_T and then the step noise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import samplers
from ..diffusion import GaussianDiffusion
from ..errors import SamplingOptionError
from ..rng import ImageNoise
from ..samplers.base import Chain
from ..autospacing import resolve_spacing
from ..sampling import make_chain
from ..speed import Speed
from ._common import Batches, check_images

__all__ = ["start_step", "sdedit_chain", "sdedit"]


def start_step(strength: float, num_timesteps: int) -> int:
    """t0 = round(S T) - 1 (0-based; halves round up); SamplingOptionError unless 0 < S <= 1 and t0 >= 0."""
    S = strength
    if isinstance(S, bool) or not isinstance(S, (int, float)) or not math.isfinite(S) or not 0.0 < S <= 1.0:
        raise SamplingOptionError(f"strength must be a number in (0, 1] (1 = from pure noise), got {strength!r}")
    t0 = math.floor(S * num_timesteps + 0.5) - 1
    if t0 < 0:
        raise SamplingOptionError(f"strength {S:g} noises to round(S*T) - 1 = {t0} < 0 with T = {num_timesteps}; "
                                  f"expected strength >= {0.5 / num_timesteps:g}")
    return t0


def sdedit_chain(chain: Chain, t0: int) -> Chain:
    """The chain's kept steps at or below t0, as a chain of its own (the same spaced process's
    first steps, so every coefficient is the one the full chain uses there)."""
    kept = tuple(s for s in chain.timesteps if s <= t0)
    if len(kept) < 2:
        raise SamplingOptionError(f"strength: noising to t0 = {t0} keeps {len(kept)} step(s) of the sampler's chain "
                                  f"(its lowest kept steps are {list(chain.timesteps[:2])}); expected at least 2: "
                                  f"raise the strength or the number of steps")
    return Chain(chain.diffusion, kept, chain.device, clip_denoised=chain.clip_denoised, eta=chain.eta,
                 dtype=chain.dtype, options=chain.options)


@torch.inference_mode()
def sdedit(diffusion: GaussianDiffusion, model: Callable, images: torch.Tensor, strength: float,
           seeds: Sequence[int], *, sampler: str = "ancestral", steps: int | None = None, spacing: str = "auto",
           eta: float = 0.0, clip_denoised: bool = True, batch_size: int | None = None, device="cpu",
           amp_dtype: torch.dtype | None = None, progress: bool = False, speed: Speed | None = None,
           model_kwargs: Mapping[str, torch.Tensor] | None = None, guidance: float | None = None,
           sampler_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """SDEdit ``images`` (the guides) at ``strength`` S in (0, 1].

    Args:
        images: float [N, C, H, W] in [-1, 1], the guides (a sketch, a damaged or noisy image).
        strength: S; the guide is noised to t0 = round(S T) - 1 (see the module docstring).
        seeds: one int per image. steps: network calls of the *whole* chain the sampler would walk
            from x_T (None = all T); only its kept steps at or below t0 are walked.
        sampler, spacing, eta, clip_denoised, batch_size, device, amp_dtype, progress, speed,
        model_kwargs, guidance, sampler_options: as :func:`ddpm.sample`.

    Returns: float32 CPU [N, C, H, W].
    """
    x_guide = check_images(images)
    N, C, H, W = x_guide.shape
    t0 = start_step(strength, diffusion.num_timesteps)
    cls = samplers.get(sampler)
    spacing = resolve_spacing(spacing, sampler, steps)  # as ddpm.sample resolves auto
    full = make_chain(diffusion, device, None if steps is None else cls.chain_steps(steps), spacing,
                      clip_denoised, eta, sampler_options)
    chain = sdedit_chain(full, t0)
    unit = cls(chain)
    top = torch.full((1,), chain.timesteps[-1], dtype=torch.int64)
    shape = (C, H, W)
    out = []
    with Batches(model, seeds, N, shape, batch_size=batch_size, device=chain.device, amp_dtype=amp_dtype,
                 speed=speed, model_kwargs=model_kwargs, guidance=guidance, progress=progress,
                 calls_per_batch=unit.nfe, desc="sdedit") as run:
        for sl, b_seeds in run:
            noise = ImageNoise(b_seeds, shape, chain.device, torch.float32)
            guide = x_guide[sl].to(chain.device)
            x = diffusion.q_sample(guide, top.to(chain.device).expand(len(b_seeds)), noise=noise.next())
            out.append(unit.run(run.denoiser(chain, sl, len(b_seeds)), x, noise).to("cpu", torch.float32))
    return torch.cat(out)
