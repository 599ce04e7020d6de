"""The v parameterisation of Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, section 4 (and its Appendix D on parameterisation and weighting).

In the DDPM notation of this package (0-based index t): alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), so x_t = alpha_t x0 + sigma_t eps (paper Eq. 4) and
alpha_t^2 + sigma_t^2 = 1. The network predicts the "velocity"

    v = alpha_t eps - sigma_t x0,

the derivative of x_phi = cos(phi) x0 + sin(phi) eps with respect to the angle
phi_t = arctan(sigma_t / alpha_t). (x_t, v) is a rotation of (x0, eps) by phi_t, so its inverse
is the transposed rotation:

    x0  = alpha_t x_t - sigma_t v
    eps = sigma_t x_t + alpha_t v.

Why: ||v - v_hat||^2 = (1 + SNR_t) ||x0 - x0_hat||^2 = (1 + 1/SNR_t) ||eps - eps_hat||^2
(SNR_t = alpha_t^2 / sigma_t^2). Turning an eps prediction into x0 divides by alpha_t, which for
the paper's linear schedule at t = T-1 (abar ~ 4e-5) multiplies eps errors by ~158; the v
conversions only multiply by alpha_t, sigma_t <= 1, so x0 stays well-posed as SNR -> 0 (Salimans
& Ho's reason to use v for few-step students), and abar = 0 (the ``jsd`` schedule) is harmless.

These functions take alpha and sigma already gathered and broadcastable against x
(e.g. [B, 1, 1, 1]); :class:`ddpm.diffusion.GaussianDiffusion` gathers them at ``t``
(``alpha_sigma``, ``v_from_xstart_eps``, ``xstart_eps_from_v``, ``predict_xstart_eps``).
"""

from __future__ import annotations

import torch


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho section 4). x0, eps: [B, C, H, W]; returns like x0."""
    return alpha * eps - sigma * x0


def x0_eps_from_v(xt: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) = (alpha x_t - sigma v, sigma x_t + alpha v): the inverse rotation (Salimans & Ho
    section 4; uses alpha^2 + sigma^2 = 1). xt, v: [B, C, H, W]; returns two tensors like xt."""
    return alpha * xt - sigma * v, sigma * xt + alpha * v


def v_from_eps(xt: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v an eps prediction implies at x_t: v = (eps - sigma x_t) / alpha (from eps = sigma x_t +
    alpha v). Divides by alpha: ill-conditioned at alpha -> 0, which is why one trains v directly."""
    return (eps - sigma * xt) / alpha


def v_from_x0(xt: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v an x0 prediction implies at x_t: v = (alpha x_t - x0) / sigma (from x0 = alpha x_t - sigma v).
    Divides by sigma: ill-conditioned at sigma -> 0 (t = 0 of a schedule with small beta_1)."""
    return (alpha * xt - x0) / sigma
