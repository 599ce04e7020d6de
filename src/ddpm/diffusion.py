"""The Gaussian diffusion of Ho et al. (2020): forward process, posterior, reverse-process
mean/variance, training losses and the bits/dim bound (paper sections 2-3, Eq. 1-15).

Conventions (docs/ARCHITECTURE.md): ``t`` is an int64 tensor [B] of 0-based indices (index i is
the paper's t = i + 1); schedule buffers are float64 numpy arrays, gathered at ``t`` in float64
and only then cast to the dtype of ``x`` and reshaped to [B, 1, 1, 1]. The model is any callable
``model(x, t) -> out`` with ``out`` [B, C or 2C, H, W]; it is called in one place
(:func:`call_model`) so that mixed precision can wrap it while the diffusion math stays
float32/float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from . import vpred
from .errors import ConfigError, suggest
from .likelihood import LN2, discretized_gaussian_log_likelihood, meanflat, normal_kl
from .rng import ImageNoise

if TYPE_CHECKING:  # pragma: no cover
    from .config import DiffusionConfig


class DiffusionOptionError(ConfigError, ValueError):
    """An unknown diffusion option or an invalid combination (a ``ValueError`` and a ``ConfigError``)."""


class MeanType(str, Enum):
    """What the first C output channels predict (paper section 3.2, Eq. 11)."""

    EPS = "eps"        # the noise epsilon (the paper's choice)
    XSTART = "xstart"  # x_0
    XPREV = "xprev"    # the posterior mean mu~(x_t, x_0) directly ("mu~ prediction")
    V = "v"            # v = alpha_t eps - sigma_t x0 (Salimans & Ho, ICLR 2022, section 4)


class VarType(str, Enum):
    """The reverse-process variance Sigma_theta(x_t, t) = sigma_t^2 I (paper section 3.2; Nichol & Dhariwal 2021)."""

    FIXEDLARGE = "fixedlarge"        # beta_t, with beta~_2 at index 0 (official CIFAR default)
    FIXEDSMALL = "fixedsmall"        # beta~_t, clipped log at index 0
    LEARNED = "learned"              # raw log-variance from the second C channels
    LEARNED_RANGE = "learned_range"  # improved-DDPM interpolation between log beta~ and log beta


class LossType(str, Enum):
    """Training objective (paper Eq. 14; Nichol & Dhariwal 2021)."""

    MSE = "mse"                  # meanflat squared error of the mean part (L_simple for eps)
    KL = "kl"                    # the VLB term L_t at the sampled t, bits/dim
    RESCALED_KL = "rescaled_kl"  # KL * T (an estimate of the whole VLB)
    HYBRID = "hybrid"            # improved-DDPM: mse + VLB term with stop-gradient mean, * T/1000


LEARNED_VARS = (VarType.LEARNED, VarType.LEARNED_RANGE)


def _parse(enum: type[Enum], value, option: str):
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = [m.value for m in enum]
        raise DiffusionOptionError(f"invalid value for diffusion.{option}: {value!r}; expected one of "
                                   f"{', '.join(choices)}{suggest(str(value), choices)}") from None


def check_options(mean_type, var_type, loss_type) -> tuple[MeanType, VarType, LossType]:
    """Parse and cross-check the three options; raises :class:`DiffusionOptionError`."""
    mean_type = _parse(MeanType, mean_type, "mean_type")
    var_type = _parse(VarType, var_type, "var_type")
    loss_type = _parse(LossType, loss_type, "loss_type")
    if loss_type == LossType.MSE and var_type in LEARNED_VARS:
        raise DiffusionOptionError(
            f"diffusion.loss_type='mse' cannot train diffusion.var_type='{var_type.value}' (the MSE ignores the "
            f"variance); use loss_type='hybrid', 'kl' or 'rescaled_kl', or a fixed var_type")
    if loss_type == LossType.HYBRID and var_type not in LEARNED_VARS:
        raise DiffusionOptionError(
            f"diffusion.loss_type='hybrid' needs diffusion.var_type='learned_range' or 'learned', got "
            f"var_type='{var_type.value}'; use loss_type='mse' with a fixed variance")
    return mean_type, var_type, loss_type


def call_model(model: Callable, x: torch.Tensor, t: torch.Tensor, amp_dtype: torch.dtype | None = None,
               model_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``model(x, t, **model_kwargs)``, under ``torch.autocast(amp_dtype)`` when given; the output
    is cast to x's dtype.

    The single place the network is called from the math, so that mixed precision touches only
    the network and never the diffusion arithmetic. ``model_kwargs`` is the conditioning hook
    (improved-diffusion's ``model_kwargs``): per-example tensors with a leading batch dim, such as
    class labels ``{"y": int64 [B]}``; every loss, bound and sampler passes it through unchanged.
    """
    kw = model_kwargs or {}
    if amp_dtype is None:
        out = model(x, t, **kw)
    else:
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype):
            out = model(x, t, **kw)
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclass(frozen=True)
class StepCoefs:
    """Per-timestep coefficients of the reverse step, as tensors that broadcast against x.

    Either [B, 1, 1, 1] (gathered at a batch of t) or 0-d (one step, pre-gathered by a sampler).
    """

    sqrt_alphas_cumprod: torch.Tensor          # alpha_t = sqrt(abar) (v-prediction)
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # sigma_t = sqrt(1 - abar) (v-prediction)
    sqrt_recip_alphas_cumprod: torch.Tensor    # 1/sqrt(abar)
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # sqrt(1/abar - 1)
    posterior_mean_coef1: torch.Tensor         # multiplies x0 in mu~
    posterior_mean_coef2: torch.Tensor         # multiplies x_t in mu~
    recip_coef1: torch.Tensor                  # 1/coef1 (x0 from x_prev)
    coef2_over_coef1: torch.Tensor             # coef2/coef1 (x0 from x_prev)
    fixed_variance: torch.Tensor               # sigma^2 of the fixed var types
    fixed_log_variance: torch.Tensor           # log sigma^2 of the fixed var types
    min_log: torch.Tensor                      # log beta~ (clipped): learned_range at v = -1
    max_log: torch.Tensor                      # log beta: learned_range at v = +1

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class CoefTable:
    """All :class:`StepCoefs` of a chain as [T] tensors of one dtype/device (pre-gathered once)."""

    def __init__(self, arrays: dict[str, np.ndarray], device, dtype: torch.dtype):
        # float64 -> dtype happens here, once, exactly as the per-batch gather would do it.
        # (Cast on the CPU, then move: some devices, e.g. MPS, have no float64.)
        self.tensors = {k: torch.as_tensor(v, dtype=torch.float64).to(dtype).to(device) for k, v in arrays.items()}

    def at(self, k: int) -> StepCoefs:
        """0-d views for step k (no host-device synchronisation)."""
        return StepCoefs(**{n: self.tensors[n][k] for n in StepCoefs.names()})


class GaussianDiffusion:
    """Forward process q, posterior, p_theta mean/variance, losses and bits/dim.

    Args:
        betas: float64 [T] (T >= 2), betas[i] = beta_{i+1}, all in (0, 1].
        mean_type: ``eps`` | ``xstart`` | ``xprev`` | ``v``; var_type: ``fixedlarge`` | ``fixedsmall`` |
            ``learned`` | ``learned_range``; loss_type: ``mse`` | ``kl`` | ``rescaled_kl`` | ``hybrid``.

    Buffers (float64 numpy [T], names as in improved-diffusion, paper Eq. 4-7): betas, alphas,
    alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
    posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2.
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, mean_type: str = "eps", var_type: str = "fixedlarge",
                 loss_type: str = "mse"):
        self.mean_type, self.var_type, self.loss_type = check_options(mean_type, var_type, loss_type)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise DiffusionOptionError(f"betas must be a 1-D array with at least 2 entries, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise DiffusionOptionError(f"betas must lie in (0, 1], got min {betas.min():.3g}, max {betas.max():.3g}")
        self.num_timesteps = int(betas.shape[0])

        # Spec section 3, all float64. A schedule with beta_T = 1 (jsd) has abar_T = 0 and so
        # infinite 1/sqrt(abar) at the last index, as in the official code.
        with np.errstate(divide="ignore"):
            self.betas = betas
            self.alphas = 1.0 - betas
            self.alphas_cumprod = np.cumprod(self.alphas)
            self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
            self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
            self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
            self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
            self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
            # beta~_1 = 0, so index 0 of the log takes beta~_2 (index 1), the official rule.
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                                   self.posterior_variance[1:]))
            self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
            self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

        # fixedlarge: sigma^2 = beta_t, except index 0 takes beta~_2 (better decoder likelihood,
        # paper section 3.2). Like improved-diffusion (and unlike the TF code, whose "variance" output
        # keeps the raw beta_1), both the variance and its log use the modified array.
        self.fixedlarge_variance = np.append(self.posterior_variance[1], betas[1:])
        if self.var_type == VarType.FIXEDLARGE:
            fixed_var, fixed_log = self.fixedlarge_variance, np.log(self.fixedlarge_variance)
        else:  # fixedsmall; the learned types never read these
            fixed_var, fixed_log = self.posterior_variance, self.posterior_log_variance_clipped
        with np.errstate(divide="ignore"):
            self._coef_arrays = {
                "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
                "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
                "sqrt_recip_alphas_cumprod": self.sqrt_recip_alphas_cumprod,
                "sqrt_recipm1_alphas_cumprod": self.sqrt_recipm1_alphas_cumprod,
                "posterior_mean_coef1": self.posterior_mean_coef1,
                "posterior_mean_coef2": self.posterior_mean_coef2,
                "recip_coef1": 1.0 / self.posterior_mean_coef1,
                "coef2_over_coef1": self.posterior_mean_coef2 / self.posterior_mean_coef1,
                "fixed_variance": fixed_var,
                "fixed_log_variance": fixed_log,
                "min_log": self.posterior_log_variance_clipped,
                "max_log": np.log(betas),
            }
        self._q_variance = 1.0 - self.alphas_cumprod
        self._torch_cache: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: "DiffusionConfig") -> "GaussianDiffusion":
        """Build from a :class:`ddpm.config.DiffusionConfig`."""
        from .schedule import get_beta_schedule

        betas = get_beta_schedule(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        return cls(betas, mean_type=cfg.mean_type, var_type=cfg.var_type, loss_type=cfg.loss_type)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type.value}, "
                f"var_type={self.var_type.value}, loss_type={self.loss_type.value})")

    @property
    def learned_variance(self) -> bool:
        return self.var_type in LEARNED_VARS

    def model_output_channels(self, channels: int) -> int:
        """Channels the network must output for C-channel images: 2C with a learned variance, else C."""
        return 2 * channels if self.learned_variance else channels

    # ------------------------------------------------------------------------------------------
    def _buffer(self, name: str, array: np.ndarray, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        buf = self._torch_cache.get(key)
        if buf is None:
            # MPS has no float64: gather there on the CPU instead.
            dev = device if device.type != "mps" else torch.device("cpu")
            buf = torch.as_tensor(array, dtype=torch.float64).to(dev)
            self._torch_cache[key] = buf
        return buf

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor, array: np.ndarray | None = None) -> torch.Tensor:
        """buffer[t] gathered in float64, cast to x.dtype, shaped [B, 1, 1, 1] (1s for x's other dims)."""
        arr = getattr(self, name) if array is None else array
        buf = self._buffer(name, arr, t.device)
        out = buf[t.to(buf.device)].to(device=x.device, dtype=x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    @property
    def coef_arrays(self) -> dict[str, np.ndarray]:
        """The float64 [T] arrays behind :class:`StepCoefs`, by field name (read-only use)."""
        return self._coef_arrays

    def _coefs_at(self, t: torch.Tensor, x: torch.Tensor) -> StepCoefs:
        return StepCoefs(**{n: self._extract("_c_" + n, t, x, self._coef_arrays[n]) for n in StepCoefs.names()})

    def coef_table(self, device, dtype: torch.dtype = torch.float32) -> CoefTable:
        """Every step's coefficients as [T] tensors on ``device`` (for samplers: gather once, before the loop)."""
        return CoefTable(self._coef_arrays, device, dtype)

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be an int64 tensor [B] with B = {x.shape[0]}, got shape {tuple(t.shape)}")

    # ------------------------------------------------------------------------------------------
    # Forward process q(x_t | x_0) (paper Eq. 4)
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """(mean, variance, log_variance) of q(x_t | x_0): sqrt(abar) x0, 1 - abar, log(1 - abar)."""
        self._check_t(t, x0)
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        var = self._extract("_q_variance", t, x0, self._q_variance).expand_as(x0)
        log_var = self._extract("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, var, log_var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (paper Eq. 4); noise ~ N(0, I) when None."""
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) (paper Eq. 6-7): (mean, variance beta~, clipped log beta~), each like x."""
        self._check_t(t, xt)
        mean = (self._extract("posterior_mean_coef1", t, xt) * x0
                + self._extract("posterior_mean_coef2", t, xt) * xt)
        var = self._extract("posterior_variance", t, xt).expand_as(xt)
        log_var = self._extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, var, log_var

    # ------------------------------------------------------------------------------------------
    # The v parameterisation (Salimans & Ho, ICLR 2022, section 4 and Appendix D); ``vpred`` holds
    # the formulas, these gather alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) at t.
    def alpha_sigma(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at 0-based t [B], each [B, 1, 1, 1] in x's dtype."""
        self._check_t(t, x)
        return self._extract("sqrt_alphas_cumprod", t, x), self._extract("sqrt_one_minus_alphas_cumprod", t, x)

    def v_from_xstart_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x0 (Salimans & Ho section 4), like x0; the v model's training target."""
        return vpred.v_from_x0_eps(x0, eps, *self.alpha_sigma(t, x0))

    def xstart_eps_from_v(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) = (alpha_t x_t - sigma_t v, sigma_t x_t + alpha_t v) (Salimans & Ho section 4), unclipped."""
        return vpred.x0_eps_from_v(xt, v, *self.alpha_sigma(t, xt))

    def predict_xstart_eps(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                           clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a model output [B, C or 2C, H, W] at 0-based t [B], whatever the mean type.

        Without clipping a v model's pair is Salimans & Ho's exact inverse (section 4) and an eps
        model's eps is its output; otherwise x0 is the (clamped) prediction of
        :meth:`p_mean_variance` and eps = (x_t / alpha_t - x0) / (sigma_t / alpha_t) the noise that
        is consistent with it (inverse of paper Eq. 4).
        """
        C = xt.shape[1]
        if not clip_denoised and self.mean_type == MeanType.V:
            return self.xstart_eps_from_v(xt, out[:, :C], t)
        x0 = self.p_mean_variance(None, xt, t, clip_denoised=clip_denoised, model_output=out)["pred_xstart"]
        if not clip_denoised and self.mean_type == MeanType.EPS:
            return x0, out[:, :C]
        eps = ((self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0)
               / self._extract("sqrt_recipm1_alphas_cumprod", t, xt))
        return x0, eps

    # ------------------------------------------------------------------------------------------
    # Reverse process p_theta(x_{t-1} | x_t)
    def check_output(self, out: torch.Tensor, x: torch.Tensor) -> None:
        C = x.shape[1]
        want = self.model_output_channels(C)
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[1] != want or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output has shape {tuple(out.shape)}; expected "
                             f"{(x.shape[0], want, *x.shape[2:])} for var_type={self.var_type.value}")

    def mean_variance_from_output(self, out: torch.Tensor, xt: torch.Tensor, c: StepCoefs, clip_denoised: bool):
        """The reverse step's (mean, variance, log_variance, pred_xstart) from a model output.

        Shared by :meth:`p_mean_variance` (c gathered [B,1,1,1]) and the samplers (c 0-d), so both
        run the very same arithmetic. With ``eps`` the mean is the posterior mean at the
        (optionally clipped) x0 prediction, which without clipping equals paper Eq. 11.
        """
        C = xt.shape[1]
        if self.learned_variance:
            mean_out, var_out = out[:, :C], out[:, C:]
            if self.var_type == VarType.LEARNED:
                log_var = var_out
            else:  # improved-DDPM Eq. 15: frac = (v + 1)/2 interpolates log beta~ .. log beta
                frac = (var_out + 1.0) / 2.0
                log_var = frac * c.max_log + (1.0 - frac) * c.min_log
            var = torch.exp(log_var)
        else:
            mean_out = out
            var, log_var = c.fixed_variance.expand_as(xt), c.fixed_log_variance.expand_as(xt)

        def process(x0: torch.Tensor) -> torch.Tensor:
            return x0.clamp(-1.0, 1.0) if clip_denoised else x0

        if self.mean_type == MeanType.XPREV:
            # x0 = (x_prev - coef2 x_t) / coef1, only reported; clipping does not touch the mean.
            pred_xstart = process(c.recip_coef1 * mean_out - c.coef2_over_coef1 * xt)
            mean = mean_out
        else:
            if self.mean_type == MeanType.XSTART:
                pred_xstart = process(mean_out)
            elif self.mean_type == MeanType.V:  # Salimans & Ho section 4: x0 = alpha_t x_t - sigma_t v
                pred_xstart = process(c.sqrt_alphas_cumprod * xt - c.sqrt_one_minus_alphas_cumprod * mean_out)
            else:  # paper Eq. 15: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
                pred_xstart = process(c.sqrt_recip_alphas_cumprod * xt - c.sqrt_recipm1_alphas_cumprod * mean_out)
            mean = c.posterior_mean_coef1 * pred_xstart + c.posterior_mean_coef2 * xt
        return mean, var, log_var, pred_xstart

    def p_mean_variance(self, model: Callable | None, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_output: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> dict:
        """Mean and variance of p_theta(x_{t-1} | x_t) (paper section 3.2, Eq. 11).

        Args:
            xt: [B, C, H, W]; t: int64 [B] (0-based).
            clip_denoised: clamp the x0 prediction to [-1, 1] before forming the mean (official default).
            model_output: a precomputed ``model(xt, t)`` (then ``model`` is not called).
            model_kwargs: conditioning passed to the model (see :func:`call_model`).

        Returns: dict ``mean``, ``variance``, ``log_variance``, ``pred_xstart``, each like xt.
            For fixedlarge, ``variance`` is exp(``log_variance``) = [beta~_2, beta_2, ..., beta_T]
            (improved-diffusion); the TF code would report the raw beta_1 at index 0 instead.
        """
        self._check_t(t, xt)
        out = call_model(model, xt, t, amp_dtype, model_kwargs) if model_output is None else model_output
        self.check_output(out, xt)
        mean, var, log_var, pred_xstart = self.mean_variance_from_output(out, xt, self._coefs_at(t, xt), clip_denoised)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------------------------------
    # Variational bound (paper Eq. 5)
    def vb_terms_bpd(self, model: Callable | None, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = True, model_output: torch.Tensor | None = None,
                     amp_dtype: torch.dtype | None = None, model_kwargs: Mapping[str, Any] | None = None) -> dict:
        """The VLB term at t in bits/dim (paper Eq. 5): the decoder NLL -log p(x0 | x1) where t == 0
        (paper Eq. 13), else KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)).

        Returns: dict ``output`` [B] (bits/dim), ``pred_xstart`` [B, C, H, W].
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model, xt, t, clip_denoised=clip_denoised, model_output=model_output,
                                   amp_dtype=amp_dtype, model_kwargs=model_kwargs)
        kl = meanflat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / LN2
        nll = -meanflat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / LN2
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, [B] (paper Eq. 5, L_T). Has no parameters."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return meanflat(normal_kl(mean, log_var, 0.0, 0.0)) / LN2

    @torch.inference_mode()
    def calc_bpd_loop(self, model: Callable, x0: torch.Tensor, clip_denoised: bool = True,
                      seeds: Sequence[int] | None = None, progress: bool = False,
                      amp_dtype: torch.dtype | None = None, model_kwargs: Mapping[str, Any] | None = None) -> dict:
        """The full variational bound in bits/dim (paper Eq. 5), one Monte Carlo x_t per timestep.

        Loops i = T-1 .. 0; at each i draws FRESH noise, x_t = q_sample(x0, i), and evaluates the
        VLB term (the decoder NLL at i = 0, the KL L_i otherwise) and the MSE of the (clipped) x0
        prediction on the [-1, 1] scale. That is T network evaluations per image.

        Args:
            x0: data [B, C, H, W] on the 256-level grid in [-1, 1].
            seeds: optional, one int per image; image k's noise is then the stream
                ``ImageNoise(seeds, x0.shape[1:], device)`` in loop order, so its result does not
                depend on which other images share the batch. Without seeds, noise comes from
                torch's global RNG.
            model_kwargs: conditioning for the model (e.g. ``{"y": labels [B]}``: class-conditional bits/dim).

        Returns: dict with ``total_bpd`` [B] (= sum of terms + prior), ``prior_bpd`` [B] (L_T),
            ``terms_bpd`` [B, T] (column i is the term at 0-based index i), ``mse`` [B, T];
            float32 (float64 if x0 is float64), on x0's device.
        """
        B, T = x0.shape[0], self.num_timesteps
        noise_src = None
        if seeds is not None:
            if len(seeds) != B:
                raise ValueError(f"calc_bpd_loop: got {len(seeds)} seeds for a batch of {B} images; "
                                 f"expected one per image")
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
            xt = self.q_sample(x0, t, noise=noise)
            out = self.vb_terms_bpd(model, x0, xt, t, clip_denoised=clip_denoised, amp_dtype=amp_dtype,
                                    model_kwargs=model_kwargs)
            terms[:, i] = out["output"]
            mse[:, i] = meanflat((out["pred_xstart"] - x0) ** 2)
        prior = self.prior_bpd(x0)
        # Sum the T terms in float64: T float32 additions would lose ~T*eps relative accuracy.
        total = (terms.double().sum(dim=1) + prior.double()).to(x0.dtype)
        return {"total_bpd": total, "prior_bpd": prior, "terms_bpd": terms, "mse": mse}

    # ------------------------------------------------------------------------------------------
    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                        amp_dtype: torch.dtype | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Per-example training loss [B] at the given t (paper section 3.4, Eq. 14, Algorithm 1).

        - ``mse``: meanflat((target - output)^2), target eps / x0 / mu~ / v by mean_type; for eps this
          is L_simple (paper Eq. 14), a per-pixel mean, not a sum. For v (Salimans & Ho 2022,
          section 4) the target is v = alpha_t eps - sigma_t x0, and ||v - v_hat||^2 =
          (1 + SNR_t) ||x0 - x0_hat||^2: the x0 error weighted by SNR + 1, finite as SNR -> 0.
        - ``kl``: the VLB term at t in bits/dim, no x0 clipping, not rescaled.
        - ``rescaled_kl``: kl * T.
        - ``hybrid``: mse + T/1000 * VLB term, the VLB seeing a stop-gradient mean, so it trains
          only the variance (improved-diffusion's RESCALED_MSE).

        ``model_kwargs``: conditioning passed to the model (see :func:`call_model`).
        Returned in x0's dtype (float32 in training).
        """
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise=noise)
        out = call_model(model, xt, t, amp_dtype, model_kwargs)
        self.check_output(out, x0)
        T = self.num_timesteps
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            loss = self.vb_terms_bpd(None, x0, xt, t, clip_denoised=False, model_output=out)["output"]
            return loss * T if self.loss_type == LossType.RESCALED_KL else loss
        C = x0.shape[1]
        mean_out = out[:, :C]
        if self.mean_type == MeanType.EPS:
            target = noise
        elif self.mean_type == MeanType.XSTART:
            target = x0
        elif self.mean_type == MeanType.V:
            target = self.v_from_xstart_eps(x0, noise, t)
        else:
            target = self.q_posterior_mean_variance(x0, xt, t)[0]
        loss = meanflat((target - mean_out) ** 2)
        if self.loss_type == LossType.HYBRID:
            frozen = torch.cat([mean_out.detach(), out[:, C:]], dim=1)
            vb = self.vb_terms_bpd(None, x0, xt, t, clip_denoised=False, model_output=frozen)["output"]
            loss = loss + vb * (T / 1000.0)
        return loss
