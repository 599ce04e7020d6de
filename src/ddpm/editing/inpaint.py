"""Inpainting with an unconditional (or class-conditional) DDPM: RePaint and the replacement method.

Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", CVPR 2022
(Eq. 8 and Algorithm 1; the jump schedule of its section 4.3), and the replacement method of
Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021 (Appendix I.2), which is
RePaint with one resampling (R = 1).

With m = 1 on the pixels to keep (RePaint's convention; the user-facing ``mask`` marks the pixels
to *generate*, so m = 1 - mask), on a chain of kept steps s_0 < ... < s_{K-1} (0-based; the
full chain is 0..T-1) and abar_k = abar at s_k, every reverse step from chain step k is

    x_known   = sqrt(abar_{k-1}) x0_input + sqrt(1 - abar_{k-1}) n,   n ~ N(0, I)  (Eq. 8, top;
                                                                      at k = 0: x0_input itself)
    x_unknown = the sampler's step from x_k (Algorithm 2 for ``ancestral``: x_{k-1} ~ p(x_{k-1}|x_k))
    x_{k-1}   = m * x_known + (1 - m) * x_unknown                    (Eq. 8, bottom)

so the result keeps the input's pixels exactly (bit for bit in float, hence in uint8). The
replacement method alone harmonises poorly (x_unknown never learns how the known part was
noised); RePaint resamples: after descending to certain states it goes back up J chain steps
with the forward process in one draw, x_{k+J} ~ q(x_{k+J} | x_k) = N(sqrt(abar_{k+J}/abar_k) x_k,
(1 - abar_{k+J}/abar_k) I), and descends again; :func:`repaint_schedule` says where (J = jump
length, R = resamplings; the paper's default J = 10, R = 10 on a 250-step respaced chain, which is
250 + 24 * 9 * 10 = 2,410 network calls per image; the paper's ~4,500 "steps" also count the
forward jumps' single steps).

Randomness (image k depends only on seeds[k]): its stream's first draw is x_{s_{K-1}}, then
every reverse step draws z (the sampler's step noise) and then n (the known part's noise, also
at k = 0 where it is unused), and every upward jump draws once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .. import samplers
from ..diffusion import GaussianDiffusion
from ..errors import SamplingOptionError
from ..rng import ImageNoise
from ..samplers.base import StepSampler
from ..sampling import make_chain
from ..speed import Speed
from ._common import Batches, check_images

__all__ = ["repaint_schedule", "count_calls", "inpaint"]


def repaint_schedule(steps: int, jump: int = 1, resample: int = 1) -> list[int]:
    """The chain states RePaint visits, as in the paper's released schedule (``get_schedule_jump``).

    States are chain indices: K-1 is x_{s_{K-1}} (x_T's stand-in), 0 is x_{s_0}, -1 is the output
    x0. A step to a smaller index is one reverse step; to a larger one, one forward step. After
    arriving at a state j in 0, J, 2J, ... below K - J the walk goes up J states and back down,
    R - 1 times per such j. R = 1 (or J >= K) is the plain chain K-1, ..., 0, -1.

    Returns: list of ints starting at K-1 and ending at -1.
    """
    K, J, R = int(steps), int(jump), int(resample)
    if K < 1 or J < 1 or R < 1:
        raise SamplingOptionError(f"RePaint needs steps >= 1, jump >= 1 and resample >= 1, got {K}, {J}, {R}")
    jumps = {j: R - 1 for j in range(0, K - J, J)}
    t, states = K - 1, [K - 1]
    while t >= 0:
        t -= 1
        states.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(J):
                t += 1
                states.append(t)
    return states


def count_calls(steps: int, jump: int = 1, resample: int = 1) -> int:
    """Network calls per image of :func:`inpaint` (the reverse steps of :func:`repaint_schedule`)."""
    s = repaint_schedule(steps, jump, resample)
    return sum(1 for a, b in zip(s[:-1], s[1:]) if b < a)


def _moves(states: list[int]) -> list[tuple[int, int]]:
    """(a, b) pairs: one reverse step a -> a-1, or one merged forward jump a -> b > a."""
    out: list[tuple[int, int]] = []
    for a, b in zip(states[:-1], states[1:]):
        if b > a and out and out[-1][1] > out[-1][0]:
            out[-1] = (out[-1][0], b)  # consecutive forward steps: one draw from q(x_b | x_a)
        else:
            out.append((a, b))
    return out


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bool [N, 1 or C, H, W]: True where the input is kept (mask == 0)."""
    m = torch.as_tensor(mask)
    if m.ndim == 3:
        m = m[None]
    N, C, H, W = x.shape
    if m.ndim != 4 or m.shape[0] not in (1, N) or m.shape[1] not in (1, C) or tuple(m.shape[2:]) != (H, W):
        raise SamplingOptionError(f"mask must be [N or 1, 1 or C, H, W] = [{N}, {C}, {H}, {W}] (1 = generate), "
                                  f"got {tuple(m.shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise SamplingOptionError("mask must be binary: 1 = generate, 0 = keep")
    return (m == 0).expand(N, -1, -1, -1)


@torch.inference_mode()
def inpaint(diffusion: GaussianDiffusion, model: Callable, images: torch.Tensor, mask: torch.Tensor,
            seeds: Sequence[int], *, resample: int = 1, jump: int = 1, steps: int | None = None,
            spacing: str = "trailing", sampler: str = "ancestral", eta: float = 0.0, clip_denoised: bool = True,
            batch_size: int | None = None, device="cpu", amp_dtype: torch.dtype | None = None,
            progress: bool = False, speed: Speed | None = None,
            model_kwargs: Mapping[str, torch.Tensor] | None = None, guidance: float | None = None,
            sampler_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Fill the masked pixels of ``images`` with the model (RePaint; R = 1: the replacement method).

    Args:
        images: float [N, C, H, W] in [-1, 1] (``ddpm.images.to_model``): the known image.
        mask: [N or 1, 1 or C, H, W] of 0/1, **1 = generate, 0 = keep** (as diffusers' pipelines).
        seeds: one int per image (image k depends only on seeds[k], whatever ``batch_size``).
        resample: R, how often each resampled block is walked (R = 1: no resampling).
        jump: J, chain steps per upward jump.
        steps: None = the full T-step chain; else a respaced chain of ``steps`` kept steps
            (``spacing`` as in :func:`ddpm.sample`).
        sampler: a step sampler (``ancestral``, Algorithm 2 as in the paper; or ``ddim`` with
            ``eta``): the x_unknown step. Multistep solvers cannot be resampled and are refused.
        clip_denoised, amp_dtype, speed, device, progress, sampler_options: as :func:`ddpm.sample`.
        model_kwargs / guidance: conditioning with one row per image and classifier-free guidance
            weight W, as :func:`ddpm.sample`.

    Returns: float32 CPU [N, C, H, W]; equal to ``images`` (bit for bit) where mask == 0.
    """
    x0_in = check_images(images)
    N, C, H, W = x0_in.shape
    keep_all = _check_mask(mask, x0_in)
    cls = samplers.get(sampler)
    if not issubclass(cls, StepSampler):
        raise SamplingOptionError(f"inpainting resamples single steps; sampler {sampler!r} keeps a history. "
                                  f"Use a step sampler: ancestral or ddim")
    chain = make_chain(diffusion, device, steps, spacing, clip_denoised, eta, sampler_options)
    unit, K = cls(chain), len(chain)
    moves = _moves(repaint_schedule(K, jump, resample))
    abar = chain.spaced.alphas_cumprod  # float64 [K]: abar at s_k
    known_a, known_b = chain.table(np.sqrt(abar)), chain.table(np.sqrt(1.0 - abar))
    up = {(a, b): (chain.table([np.sqrt(abar[b] / abar[a])])[0], chain.table([np.sqrt(1.0 - abar[b] / abar[a])])[0])
          for a, b in moves if b > a}
    shape = (C, H, W)
    out = []
    with Batches(model, seeds, N, shape, batch_size=batch_size, device=chain.device, amp_dtype=amp_dtype,
                 speed=speed, model_kwargs=model_kwargs, guidance=guidance, progress=progress,
                 calls_per_batch=count_calls(K, jump, resample), desc="inpainting") as run:
        for sl, b_seeds in run:
            ref = x0_in[sl].to(chain.device)
            keep = keep_all[sl].to(chain.device)
            noise = ImageNoise(b_seeds, shape, chain.device, torch.float32)
            denoise = run.denoiser(chain, sl, len(b_seeds))
            x = noise.next()  # x_{s_{K-1}} ~ N(0, I)
            for a, b in moves:
                if b > a:  # RePaint's resampling: back up the chain in one forward draw
                    ca, cb = up[(a, b)]
                    x = ca * x + cb * noise.next()
                    continue
                x_unknown, _ = unit.step(a, x, denoise(x, a), noise.next())
                n = noise.next()
                x_known = ref if b < 0 else known_a[b] * ref + known_b[b] * n
                x = torch.where(keep, x_known, x_unknown)
            out.append(x.to("cpu", torch.float32))
    return torch.cat(out)
