"""The distillation target of Salimans & Ho, ICLR 2022, Algorithm 2 (discrete time).

Notation (0-based DDPM index t, abar_t = prod_{s<=t} (1 - beta_s)): alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), z_t = alpha_t x0 + sigma_t eps (DDPM paper Eq. 4), SNR_t =
alpha_t^2 / sigma_t^2. Index -1 stands for x0 itself (alpha = 1, sigma = 0).

A deterministic DDIM step (Song et al. 2021, Eq. 12 at eta = 0) from t to s < t with the x0
prediction xhat is

    z_s = alpha_s xhat + sigma_s (z_t - alpha_t xhat) / sigma_t.                       (1)

The teacher takes two of them, t -> t' -> t'' (its own x0 prediction at each, clipped to
[-1, 1] exactly as it samples). The student must land on the same z_t'' in one step (1) from
t to t'', which fixes the x0 it has to predict:

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).   (2)

At the last step (t'' = -1: alpha = 1, sigma = 0) x_tilde = z_t'' = the teacher's x0 after its
two steps. The loss is the x0 error weighted by the truncated SNR, w_t = max(SNR_t, floor)
(Salimans & Ho section 4, "truncated SNR weighting", floor = 1; for a v student and floor 1 it
equals max(alpha_t^2, sigma_t^2) ||v_tilde - v_hat||^2). The floor is a setting
(``snr_floor``): see :mod:`ddpm.distill.settings` for why its default is 0.01.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..diffusion import call_model
from ..likelihood import meanflat


def extended_abar(diffusion) -> np.ndarray:
    """float64 [T + 1]: abar with 1 prepended, so that ``ext[t + 1]`` is abar_t for t in -1..T-1."""
    return np.concatenate([[1.0], np.asarray(diffusion.alphas_cumprod, dtype=np.float64)])


def alpha_sigma(abar_ext: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) [B, 1, 1, 1] in ``like``'s dtype for 0-based t [B] (-1: x0), float64 first."""
    a = torch.as_tensor(abar_ext, dtype=torch.float64)[(t.cpu() + 1)]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (a.sqrt().to(like.device, like.dtype).reshape(shape),
            (1.0 - a).clamp_min(0).sqrt().to(like.device, like.dtype).reshape(shape))


def ddim_step(z_t: torch.Tensor, xhat: torch.Tensor, a_t, s_t, a_s, s_s) -> torch.Tensor:
    """Eq. (1): z_s from z_t [B, C, H, W] and the x0 prediction xhat, given alpha/sigma at t and s."""
    return a_s * xhat + (s_s / s_t) * (z_t - a_t * xhat)


def x_tilde_from(z_t: torch.Tensor, z_tt: torch.Tensor, a_t, s_t, a_tt, s_tt) -> torch.Tensor:
    """Eq. (2): the x0 whose one DDIM step from (t, z_t) lands on z_t'' [B, C, H, W]."""
    r = s_tt / s_t
    return (z_tt - r * z_t) / (a_tt - r * a_t)


def truncated_snr_weight(abar_ext: np.ndarray, t: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """float32 [B]: max(SNR_t, floor) with SNR_t = abar_t / (1 - abar_t), computed in float64
    (Salimans & Ho's truncated SNR at floor = 1; :mod:`ddpm.distill.settings` on the default)."""
    a = torch.as_tensor(abar_ext, dtype=torch.float64)[(t.cpu() + 1)]
    return torch.clamp(a / (1.0 - a), min=float(floor)).float()


@torch.no_grad()
def predict_x0(model, diffusion, z: torch.Tensor, t: torch.Tensor, model_kwargs: Mapping[str, Any] | None,
               clip: bool, amp_dtype=None) -> torch.Tensor:
    """The network's x0 prediction [B, C, H, W] at 0-based t [B] (whatever its mean type: eps,
    xstart, v, ...), clamped to [-1, 1] when ``clip`` (as the package's samplers do)."""
    out = call_model(model, z, t, amp_dtype, dict(model_kwargs or {})).float()
    return diffusion.p_mean_variance(None, z, t, clip_denoised=clip, model_output=out)["pred_xstart"]


@torch.no_grad()
def two_step_target(teacher, teacher_diffusion, z_t: torch.Tensor, t: torch.Tensor, t1: torch.Tensor,
                    t2: torch.Tensor, abar_ext: np.ndarray, model_kwargs: Mapping[str, Any] | None = None,
                    clip: bool = True, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_tilde, z_t'') for z_t [B, C, H, W] at t > t1 > t2 (0-based [B] each; t2 = -1: x0).

    Two deterministic teacher DDIM steps (Eq. 1) t -> t1 -> t2, then Eq. (2). When t1 == t2 (the
    1:1 warm-up into the v parameterisation) it is one teacher step and x_tilde = the teacher's x0.
    """
    a_t, s_t = alpha_sigma(abar_ext, t, z_t)
    a_1, s_1 = alpha_sigma(abar_ext, t1, z_t)
    a_2, s_2 = alpha_sigma(abar_ext, t2, z_t)
    x_a = predict_x0(teacher, teacher_diffusion, z_t, t, model_kwargs, clip, amp_dtype)
    z_1 = ddim_step(z_t, x_a, a_t, s_t, a_1, s_1)
    if bool((t1 == t2).all()):
        return x_a, z_1
    x_b = predict_x0(teacher, teacher_diffusion, z_1, t1, model_kwargs, clip, amp_dtype)
    z_2 = ddim_step(z_1, x_b, a_1, s_1, a_2, s_2)
    return x_tilde_from(z_t, z_2, a_t, s_t, a_2, s_2), z_2


def student_x0(out: torch.Tensor, z_t: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """A v student's x0 = alpha_t z_t - sigma_t v (Salimans & Ho section 4), unclipped; ``out`` may
    carry variance channels after the first C, which the student does not use."""
    return a_t * z_t - s_t * out[:, :z_t.shape[1]].float()


def distill_loss(xhat: torch.Tensor, x_tilde: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-example loss [B]: w_t * mean over C, H, W of (x_tilde - xhat)^2."""
    return weight.to(xhat.device) * meanflat((x_tilde - xhat) ** 2)
