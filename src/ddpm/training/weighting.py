"""Per-timestep weights on the training loss: the paper's L_simple, Min-SNR-gamma and P2.

The paper trains on L_simple (Ho et al. 2020, Eq. 14): every t weighs the same. Later recipes
reweight t by its signal-to-noise ratio SNR_t = abar_t / (1 - abar_t) (0-based t, abar the
cumulative product of 1 - beta):

- ``min_snr:G`` (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  ICCV 2023, Eq. 9-11): the x0-space loss weighted by min(SNR_t, G); the small-t steps, whose
  loss is easy and whose gradients conflict with the others', are capped at G (they use G = 5).
- ``p2:K,G`` (Choi et al., "Perception Prioritized Training of Diffusion Models", CVPR 2022,
  Eq. 8): the eps loss weighted by 1 / (K + SNR_t)^G, down-weighting the clean end.

Both are defined on one loss space; the network may predict eps, x0 or v. With x_t = sqrt(abar)
x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0, errors convert as
||d eps||^2 = SNR ||d x0||^2 = SNR / (SNR + 1) ||d v||^2, so a weight w_eps on the eps-MSE is
w_eps · c on the MSE the network is trained with, c = 1 (eps), SNR (xstart), SNR/(SNR+1) (v).
Min-SNR's eps form is min(SNR, G)/SNR, its v form min(SNR, G)/(SNR + 1), its x0 form min(SNR, G).

The weights multiply the per-example losses the trainer averages (together with importance
sampling's weights; ``training.step.draw_t_and_noise``). The logged ``loss`` stays the unweighted
MSE, comparable across weightings.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..options import parse_loss_weighting

# MSE spaces a weighting can be expressed in: the mean types whose target is eps, x0 or v.
WEIGHTABLE_MEAN_TYPES = ("eps", "xstart", "v")


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR_t = abar_t / (1 - abar_t), float64 [T] (Kingma et al. 2021's signal-to-noise ratio)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return a / (1.0 - a)


def eps_space_factor(mean_type: str, s: np.ndarray) -> np.ndarray:
    """c with ||d eps||^2 = c · ||d target||^2 for the network's target (module docstring)."""
    if mean_type == "eps":
        return np.ones_like(s)
    if mean_type == "xstart":
        return s
    if mean_type == "v":
        return s / (s + 1.0)
    raise ValueError(f"loss weighting is defined for mean types {', '.join(WEIGHTABLE_MEAN_TYPES)}, "
                     f"not {mean_type!r}")


def loss_weights(spec: str, alphas_cumprod: np.ndarray, mean_type: str) -> np.ndarray:
    """float64 [T]: the weight on the per-example MSE at each 0-based t.

    Args:
        spec: ``train.loss_weighting`` (``none``, ``min_snr:G``, ``p2:K,G``).
        alphas_cumprod: abar_t, float64 [T].
        mean_type: what the network predicts (``eps``, ``xstart``, ``v``).
    """
    name, args = parse_loss_weighting(spec)
    s = snr(alphas_cumprod)
    if name == "none":
        return np.ones_like(s)
    if name == "min_snr":
        w_eps = np.minimum(s, args[0]) / s
    else:  # p2
        k, g = args
        w_eps = 1.0 / (k + s) ** g
    return w_eps * eps_space_factor(mean_type, s)


@lru_cache(maxsize=8)
def weight_table(cfg, device=None) -> "object | None":
    """float32 tensor [T] on ``device`` (default the CPU) of :func:`loss_weights` for a run config,
    or None for ``none`` (the paper's L_simple: no multiplication, so such runs stay bit-identical).
    Made once per (config, device): a captured step (``train.cuda_graph``) only gathers from it."""
    import torch

    from ..schedule import get_beta_schedule

    spec = cfg.train.loss_weighting
    if parse_loss_weighting(spec)[0] == "none":
        return None
    d = cfg.diffusion
    abar = np.cumprod(1.0 - get_beta_schedule(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end))
    return torch.from_numpy(loss_weights(spec, abar, d.mean_type)).float().to(device or "cpu")
