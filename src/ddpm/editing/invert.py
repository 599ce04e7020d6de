"""DDIM inversion: a deterministic latent x_T for a real image, its decoding, and interpolation
of two real images through their latents.

Song et al., "Denoising Diffusion Implicit Models", ICLR 2021: at eta = 0 the reverse step
(Eq. 12) on kept steps s_0 < ... < s_{K-1} (0-based; abar_k = abar at s_k, abar_{-1} = 1) is

    x_{k-1} = sqrt(abar_{k-1}) x0_k + sqrt(1 - abar_{k-1}) eps_k,
    eps_k = eps_theta(x_k, s_k),   x0_k = (x_k - sqrt(1 - abar_k) eps_k) / sqrt(abar_k)   (Eq. 9)

a discretised ODE (section 4.3, Eq. 14), which can be run backwards. Inversion takes eps at the
point already known, x_{k-1}, in place of eps at x_k (the only approximation):

    x_0'  = the image;   eps = eps_theta(image, s_0);   x_{s_0} = sqrt(abar_0) image + sqrt(1 - abar_0) eps
    x_k   = sqrt(abar_k) x0_{k-1} + sqrt(1 - abar_k) eps_{k-1},   k = 1 .. K-1

K network calls, clipping off (a clipped x0 is not invertible). Decoding the latent x_{s_{K-1}}
with DDIM at eta = 0 and clipping off on the same kept steps (:func:`ddim_decode`, or ``ddpm
sample --x-T LATENTS.npz --sampler ddim --steps K --clip off``) gives the image back up to the
error bound derived next.

Round-trip error bound. Write the decoding step as x_{k-1} = D_k(x_k) = c1_k x_k + c2_k
eps_theta(x_k, s_k), c1_k = sqrt(abar_{k-1}/abar_k), c2_k = sqrt(1 - abar_{k-1}) - c1_k sqrt(1 -
abar_k) (< 0). The encoder's states z_k satisfy D_k(z_k) = z_{k-1} + c2_k d_k with d_k =
eps_theta(z_k, s_k) - e_k, e_k the eps the encoder used for step k. If eps_theta(., s_k) is
L_k-Lipschitz in a norm, D_k is (c1_k + |c2_k| L_k)-Lipschitz, and induction from the top
(where decoder and encoder start equal) gives

    |decode(encode(x)) - x| <= sum_k  prod_{j<k} (c1_j + |c2_j| L_j) * |c2_k| * |d_k|.

|c2_k| is O(1/K) for a fixed schedule and d_k is the change of eps over one step, so the
round trip tightens as K grows; with eps independent of x and t it is exact.

Interpolation (:func:`interpolate_latents`): slerp of the two latents (Song et al. 2021, section
5.4; Shoemake 1985), slerp(a, b, l) = sin((1-l) th)/sin(th) a + sin(l th)/sin(th) b with
cos th = <a, b>/(|a||b|), per image pair, then decoding. The DDPM paper's own interpolation
(stochastic encoder, section 4.4) is :func:`ddpm.sampling.interpolate`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..diffusion import GaussianDiffusion
from ..errors import SamplingOptionError
from ..sampling import make_chain, sample
from ..speed import Speed
from ._common import Batches, check_images

__all__ = ["ddim_invert", "ddim_decode", "slerp", "interpolate_latents"]


@torch.inference_mode()
def ddim_invert(diffusion: GaussianDiffusion, model: Callable, images: torch.Tensor, *, steps: int | None = None,
                spacing: str = "trailing", batch_size: int | None = None, device="cpu",
                amp_dtype: torch.dtype | None = None, progress: bool = False, speed: Speed | None = None,
                model_kwargs: Mapping[str, torch.Tensor] | None = None, guidance: float | None = None,
                trajectory: bool = False):
    """Encode real images to DDIM latents (deterministic; see the module docstring).

    Args:
        images: float [N, C, H, W] in [-1, 1]. steps: K kept steps (None = all T), chosen by
            ``spacing`` exactly as :func:`ddpm.sample` chooses them, so decoding with the same
            ``steps``/``spacing`` walks the same chain back.
        model_kwargs / guidance: conditioning and classifier-free guidance W (decode with the same).
        trajectory: also return every encoder state and the eps it used.

    Returns: float32 CPU [N, C, H, W] latents x_{s_{K-1}}; with ``trajectory``, (latents, states
        [N, K+1, C, H, W] = image, x_{s_0}, ..., x_{s_{K-1}}, eps [N, K, C, H, W] = e_0 .. e_{K-1}).
    """
    x_img = check_images(images)
    N, C, H, W = x_img.shape
    chain = make_chain(diffusion, device, steps, spacing, clip_denoised=False)
    K = len(chain)
    abar = chain.spaced.alphas_cumprod
    sa, s1 = chain.table(np.sqrt(abar)), chain.table(np.sqrt(1.0 - abar))
    out, states, epss = [], [], []
    with Batches(model, range(N), N, (C, H, W), batch_size=batch_size, device=chain.device, amp_dtype=amp_dtype,
                 speed=speed, model_kwargs=model_kwargs, guidance=guidance, progress=progress, calls_per_batch=K,
                 desc="encoding") as run:
        for sl, b in run:
            denoise = run.denoiser(chain, sl, len(b))
            x = x_img[sl].to(chain.device)
            x0, hist, ehist = x, [x], []
            for k in range(K):
                eps, pred = denoise.predict(x, max(k - 1, 0))
                if k > 0:  # at k = 0 the known point is the image itself: x0 = image (abar_{-1} = 1)
                    x0 = pred
                x = sa[k] * x0 + s1[k] * eps
                if trajectory:
                    hist.append(x)
                    ehist.append(eps)
            out.append(x.to("cpu", torch.float32))
            if trajectory:
                states.append(torch.stack(hist, 1).to("cpu", torch.float32))
                epss.append(torch.stack(ehist, 1).to("cpu", torch.float32))
    latents = torch.cat(out)
    return (latents, torch.cat(states), torch.cat(epss)) if trajectory else latents


def ddim_decode(diffusion: GaussianDiffusion, model: Callable, latents: torch.Tensor, *, steps: int | None = None,
                spacing: str = "trailing", **kwargs) -> torch.Tensor:
    """Decode DDIM latents [N, C, H, W]: :func:`ddpm.sample` with ``sampler="ddim"``, eta = 0,
    clipping off and ``x_T=latents`` (the seeds are then unused). ``kwargs``: batch_size, device,
    amp_dtype, progress, speed, model_kwargs, guidance. Returns float32 CPU [N, C, H, W]."""
    z = check_images(latents, "latents")
    return sample(diffusion, model, tuple(z.shape[1:]), range(z.shape[0]), sampler="ddim", eta=0.0, steps=steps,
                  spacing=spacing, clip_denoised=False, x_T=z, **kwargs)


def slerp(a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """Spherical interpolation of two latents [C, H, W] (or [1, C, H, W]) at each lambda.

    slerp(a, b, l) = sin((1 - l) th) / sin(th) a + sin(l th) / sin(th) b, cos th = <a, b>/(|a||b|),
    computed in float64; where th is ~0 (parallel latents) it falls back to the linear mix.
    Returns float32 [L, C, H, W]; lambda 0 gives a, 1 gives b.
    """
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    if a64.shape != b64.shape:
        raise SamplingOptionError(f"slerp needs two latents of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    lam = torch.as_tensor([float(v) for v in lambdas], dtype=torch.float64)[:, None]
    cos = (a64 @ b64) / (a64.norm() * b64.norm())
    th = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(th)) < 1e-6:
        mix = (1 - lam) * a64 + lam * b64
    else:
        mix = (torch.sin((1 - lam) * th) * a64 + torch.sin(lam * th) * b64) / torch.sin(th)
    return mix.to(torch.float32).reshape(len(lam), *a.shape[-3:])


def interpolate_latents(diffusion: GaussianDiffusion, model: Callable, image_a: torch.Tensor,
                        image_b: torch.Tensor, lambdas: Sequence[float], *, steps: int | None = None,
                        spacing: str = "trailing", **kwargs) -> torch.Tensor:
    """Interpolate two real images [C, H, W] through their DDIM latents: encode both
    (:func:`ddim_invert`), slerp the latents at ``lambdas``, decode (:func:`ddim_decode`).
    ``kwargs``: device, amp_dtype, speed, progress. Returns float32 CPU [L, C, H, W]."""
    a, b = check_images(image_a, "image_a"), check_images(image_b, "image_b")
    if a.shape != b.shape or a.shape[0] != 1:
        raise SamplingOptionError(f"interpolation needs two images [C, H, W] of one shape, got {tuple(image_a.shape)} "
                                  f"and {tuple(image_b.shape)}")
    z = ddim_invert(diffusion, model, torch.cat([a, b]), steps=steps, spacing=spacing, **kwargs)
    return ddim_decode(diffusion, model, slerp(z[0], z[1], lambdas), steps=steps, spacing=spacing, **kwargs)
