"""Likelihood pieces of the variational bound (spec section 5): Gaussian KL, the discretized
Gaussian decoder L_0 (paper Eq. 13) and the exact bits/dim loop.

All log-likelihoods and KLs here are in nats, elementwise; ``meanflat`` then averages over
C*H*W and division by ln 2 turns nats/dim into bits/dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .rng import ImageNoise

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion import GaussianDiffusion

LN2 = math.log(2.0)

# Decoder constants (official utils.py, spec 5.3): data lie on 256 levels in [-1, 1] spaced
# 2/255 apart, so each bin has half-width 1/255; +-0.999 detects the edge levels 0 and 255.
BIN_HALF_WIDTH = 1.0 / 255.0
EDGE = 0.999
LOG_CLAMP = 1e-12


def meanflat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise (spec 5.1).

    Arguments broadcast; at least one must be a tensor (floats are accepted for the others).
    """
    ref = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (_as_tensor(v, ref) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the official code's tanh
    approximation (max abs error 1.8e-4 on [-6, 6]); used instead of erf to match its numbers."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, for data x on the 256-level grid in [-1, 1] (spec 5.3).

    P is the mass of N(means, exp(log_scales)^2) on the bin [x - 1/255, x + 1/255]; the bin of
    level 0 (x < -0.999) extends to -inf and that of level 255 (x > 0.999) to +inf, so the 256
    probabilities sum to one. Every probability is clamped at 1e-12 before the log.

    Args:
        x: data [B, C, H, W] in [-1, 1]; means, log_scales: broadcastable to x (log_scales = log std).
    """
    if torch.broadcast_shapes(x.shape, means.shape, log_scales.shape) != x.shape:
        raise ValueError(f"shapes do not broadcast to x: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_CLAMP))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_CLAMP))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_CLAMP))
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_cdf_delta))


@torch.inference_mode()
def calc_bpd_loop(diffusion: "GaussianDiffusion", model: Callable, x0: torch.Tensor, clip_denoised: bool = True,
                  seeds: Sequence[int] | None = None, progress: bool = False,
                  amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full variational bound in bits/dim, one Monte Carlo x_t per timestep (spec 5.5).

    Loops i = T-1 .. 0; at each i draws FRESH noise, x_t = q_sample(x0, i), and evaluates the
    VLB term (the decoder NLL at i = 0, the KL L_i otherwise) and the MSE of the (clipped) x0
    prediction on the [-1, 1] scale. That is T network evaluations per image.

    Args:
        x0: data [B, C, H, W] on the 256-level grid in [-1, 1].
        seeds: optional, one int per image; image k's noise is then the stream
            ``ImageNoise(seeds, x0.shape[1:], device)`` in loop order, so its result does not depend
            on which other images share the batch. Without seeds, noise comes from torch's global RNG.

    Returns: dict with ``total_bpd`` [B] (= sum of terms + prior), ``prior_bpd`` [B] (L_T),
        ``terms_bpd`` [B, T] (column i is the term at 0-based index i), ``mse`` [B, T];
        float32 (float64 if x0 is float64), on x0's device.
    """
    B, T = x0.shape[0], diffusion.num_timesteps
    noise_src = None
    if seeds is not None:
        if len(seeds) != B:
            raise ValueError(f"calc_bpd_loop: got {len(seeds)} seeds for a batch of {B} images; expected one per image")
        noise_src = ImageNoise(seeds, x0.shape[1:], x0.device, x0.dtype)
    terms = torch.zeros(B, T, dtype=x0.dtype, device=x0.device)
    mse = torch.zeros(B, T, dtype=x0.dtype, device=x0.device)
    steps = range(T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="bpd", total=T)
    for i in steps:
        t = torch.full((B,), i, dtype=torch.int64, device=x0.device)
        noise = noise_src.next() if noise_src is not None else torch.randn_like(x0)
        xt = diffusion.q_sample(x0, t, noise=noise)
        out = diffusion.vb_terms_bpd(model, x0, xt, t, clip_denoised=clip_denoised, amp_dtype=amp_dtype)
        terms[:, i] = out["output"]
        mse[:, i] = meanflat((out["pred_xstart"] - x0) ** 2)
    prior = diffusion.prior_bpd(x0)
    # Sum the T terms in float64: T float32 additions would lose ~T*eps relative accuracy.
    total = (terms.double().sum(dim=1) + prior.double()).to(x0.dtype)
    return {"total_bpd": total, "prior_bpd": prior, "terms_bpd": terms, "mse": mse}
