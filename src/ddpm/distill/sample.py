"""Sampling with a distilled student: deterministic DDIM on exactly its kept indices.

Salimans & Ho, ICLR 2022, Algorithm 2 trains the student so that one DDIM step (Song et al.
2021, Eq. 12 at eta = 0) from kept index k_i to k_{i-1} (and from k_0 to x0) replaces two of
its teacher's, so sampling is that walk:

    z_{k_{i-1}} = alpha_{k_{i-1}} xhat + sigma_{k_{i-1}} (z_{k_i} - alpha_{k_i} xhat) / sigma_{k_i},

xhat the student's x0 (alpha z - sigma v, clamped to [-1, 1] as the teacher's was), ending with
x0 = xhat at k_0. It is the package's ``ddim`` sampler at eta = 0 on the chain of these kept
steps (tested), written here once more because a 1-step chain has no respaced process. x_T is
the first draw of every image's own noise stream (:class:`ddpm.rng.ImageNoise`), as for every
sampler, so image k of a run is the same at any batch size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..diffusion import call_model
from ..rng import ImageNoise
from .target import alpha_sigma, ddim_step


def _output(model, x, t, kwargs, guidance, amp_dtype):
    """The network output at t [B] (guidance W: out_u + W (out_c - out_u), both in one call of 2B,
    linear in the output, so the same for v as for eps; null label = model.num_classes)."""
    if guidance is None:
        return call_model(model, x, t, amp_dtype, kwargs).float()
    null = {k: (torch.full_like(v, int(model.num_classes)) if k == "y" else v) for k, v in kwargs.items()}
    both = call_model(model, torch.cat([x, x]), torch.cat([t, t]), amp_dtype,
                      {k: torch.cat([kwargs[k], null[k]]) for k in kwargs}).float()
    cond, uncond = both.chunk(2)
    C = x.shape[1]
    guided = uncond[:, :C] + float(guidance) * (cond[:, :C] - uncond[:, :C])
    return torch.cat([guided, cond[:, C:]], dim=1) if cond.shape[1] > C else guided


@torch.no_grad()
def sample_student(model, diffusion, kept: Sequence[int], shape: Sequence[int], seeds: Sequence[int], *,
                   batch_size: int | None = None, device="cpu", model_kwargs: Mapping[str, Any] | None = None,
                   guidance: float | None = None, clip: bool = True, amp_dtype=None,
                   progress: bool = False) -> torch.Tensor:
    """Samples float32 [N, C, H, W] in [-1, 1] (on the CPU), one per seed, with len(kept) network calls each.

    Args:
        model: the student network (eval mode, on ``device``); diffusion: its GaussianDiffusion
            (the T-step process; its mean type turns outputs into x0).
        kept: the student's increasing 0-based indices (its checkpoint's meta["distill"]["kept"]).
        model_kwargs: per-image conditioning with a leading dim N (e.g. {"y": labels}).
        guidance: classifier-free guidance weight W (None: plain conditional/unconditional).
    """
    seeds = [int(s) for s in seeds]
    kept = [int(k) for k in kept]
    device = torch.device(device)
    B = len(seeds) if batch_size is None else int(batch_size)
    abar = np.concatenate([[1.0], np.asarray(diffusion.alphas_cumprod, dtype=np.float64)])
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(range(0, len(seeds), B)) * len(kept), desc="sampling (student)")
    outs = []
    for i in range(0, len(seeds), B):
        b_seeds = seeds[i:i + B]
        x = ImageNoise(b_seeds, tuple(shape), device, torch.float32).next()
        kw = {k: v[i:i + len(b_seeds)].to(device) for k, v in (model_kwargs or {}).items()}
        for j in range(len(kept) - 1, -1, -1):
            t = torch.full((len(b_seeds),), kept[j], dtype=torch.int64, device=device)
            s = torch.full_like(t, kept[j - 1] if j > 0 else -1)
            out = _output(model, x, t, kw, guidance, amp_dtype)
            xhat = diffusion.p_mean_variance(None, x, t, clip_denoised=clip, model_output=out)["pred_xstart"]
            x = ddim_step(x, xhat, *alpha_sigma(abar, t, x), *alpha_sigma(abar, s, x))
            if bar is not None:
                bar.update(1)
        outs.append(x.to("cpu", torch.float32))
    if bar is not None:
        bar.close()
    return torch.cat(outs)
