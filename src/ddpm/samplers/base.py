"""What every sampler shares: the chain it walks (:class:`Chain`), the network as it sees it
(:class:`Denoiser`) and the unit it is written as (:class:`Sampler`).

A sampler walks a chain of K kept timesteps s_0 < ... < s_{K-1} of the model's T-step process
from x_{s_{K-1}} (x_T's stand-in; the first draw of every image's noise stream) down to x_0.
It calls the network only through a :class:`Denoiser`, which adds the timestep map, the
conditioning (``model_kwargs``), classifier-free guidance and the output check, so a sampler is
pure arithmetic on tensors and knows nothing of models, devices or batches.

Randomness: a sampler draws its step noise only from ``noise.next()`` (one [B, C, H, W] draw per
call from every image's own stream, :class:`ddpm.rng.ImageNoise`), so image k is the same at any
batch size. Per-step coefficients are gathered before the loop as 0-d float32 tensors on the
device, so the loop makes no host-device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from ..diffusion import GaussianDiffusion, StepCoefs, call_model
from ..respacing import respace
from ..vpred import x0_eps_from_v


class NoiseSource(Protocol):
    def next(self) -> torch.Tensor:
        """The next N(0, I) draw [B, C, H, W], one row per image."""


@dataclass(frozen=True)
class Chain:
    """The reverse chain a sampler walks.

    Attributes:
        diffusion: the model's own T-step process (what it was trained with).
        timesteps: the kept 0-based indices s_0 < ... < s_{K-1} (all of 0..T-1 for the full chain);
            the network sees s_k at chain step k.
        device: where the chain runs. dtype: of the gathered coefficients (float32).
        clip_denoised: clamp every x0 prediction to [-1, 1] (the official sampler does).
        eta: DDIM's stochasticity (Song et al. 2021, Eq. 16); samplers that do not use it ignore it.
        options: sampler-specific options by name (validated by the sampler).
    """

    diffusion: GaussianDiffusion
    timesteps: tuple[int, ...]
    device: torch.device
    clip_denoised: bool = True
    eta: float = 0.0
    dtype: torch.dtype = torch.float32
    options: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timesteps)

    @cached_property
    def spaced(self) -> GaussianDiffusion:
        """The K-step process through the kept steps (:func:`ddpm.respacing.respace`); the model's own
        process itself when every step is kept, so the full chain is bit-identical to Algorithm 2."""
        if list(self.timesteps) == list(range(self.diffusion.num_timesteps)):
            return self.diffusion
        return respace(self.diffusion, self.timesteps)[0]

    def table(self, values: Sequence[float] | np.ndarray) -> list[torch.Tensor]:
        """A float64 array [K] as K 0-d tensors of ``dtype`` on ``device`` (cast on the CPU first,
        exactly as the per-batch gather of :class:`GaussianDiffusion` casts; MPS has no float64)."""
        t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float64).to(self.dtype).to(self.device)
        return [t[k] for k in range(t.shape[0])]

    @cached_property
    def coefs(self) -> list[StepCoefs]:
        """The spaced process's :class:`StepCoefs` of every chain step k, 0-d tensors."""
        table = self.spaced.coef_table(self.device, self.dtype)
        return [table.at(k) for k in range(len(self))]


class Denoiser:
    """The network as a sampler calls it: ``denoiser(x, k)`` is the model output at chain step k.

    Args:
        model: ``model(x, t, **model_kwargs) -> out`` (usually a :class:`ddpm.fast.FastModel`).
        chain: the chain (gives the timestep map s_k and the output check).
        batch: images per call B.
        amp_dtype: run the network under autocast in this dtype (the math stays float32).
        model_kwargs: conditioning tensors with a leading batch dim B (e.g. ``{"y": labels}``).
        guidance: classifier-free guidance weight W (Ho & Salimans 2022), or None. With W, both
            branches run in one batched call of 2B images: the conditional one with
            ``model_kwargs`` and the unconditional one with ``null_kwargs``; the first C output
            channels become out_u + W (out_c - out_u) (W = 1: conditional, W = 0: unconditional;
            Ho & Salimans' w is W - 1), the variance channels of a learned-variance model are the
            conditional branch's. The combination is linear with weights summing to 1, so it is
            the same whether the channels predict eps, x0, the posterior mean or v (at fixed x_t, v,
            x0 and the mean are affine in eps with coefficients that do not depend on the model,
            so mixing any of them mixes eps by the same weights).
        null_kwargs: the unconditional branch's kwargs (default: every ``y`` replaced by
            ``model.num_classes``, the null class of :class:`ddpm.nets.unet.UNet`).
        on_call: called after every network call (progress bars).
    """

    def __init__(self, model: Callable, chain: Chain, batch: int, amp_dtype: torch.dtype | None = None,
                 model_kwargs: Mapping[str, torch.Tensor] | None = None, guidance: float | None = None,
                 null_kwargs: Mapping[str, torch.Tensor] | None = None, on_call: Callable[[], Any] | None = None):
        self.model, self.chain, self.amp_dtype, self.on_call = model, chain, amp_dtype, on_call
        self.kwargs = dict(model_kwargs or {})
        self.guidance = None if guidance is None else float(guidance)
        rows = 2 * batch if self.guidance is not None else batch
        # [K, rows] int64: row k is the network's timestep s_k at chain step k, made once.
        self.t_rows = torch.as_tensor(list(chain.timesteps), dtype=torch.int64,
                                      device=chain.device)[:, None].repeat(1, rows)
        if self.guidance is not None:
            if null_kwargs is None:
                null_kwargs = {k: torch.full_like(v, int(_null_label(model))) if k == "y" else v
                               for k, v in self.kwargs.items()}
            self.kwargs = {k: torch.cat([v, null_kwargs[k]]) for k, v in self.kwargs.items()}
        self.nfe = 0

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The model output [B, C or 2C, H, W] for x [B, C, H, W] at chain step k, as x's dtype."""
        if self.guidance is None:
            out = call_model(self.model, x, self.t_rows[k], self.amp_dtype, self.kwargs)
        else:
            both = call_model(self.model, torch.cat([x, x]), self.t_rows[k], self.amp_dtype, self.kwargs)
            cond, uncond = both.chunk(2)
            C = x.shape[1]
            guided = uncond[:, :C] + self.guidance * (cond[:, :C] - uncond[:, :C])
            out = torch.cat([guided, cond[:, C:]], dim=1) if cond.shape[1] > C else guided
        self.chain.spaced.check_output(out, x)
        self.nfe += 1
        if self.on_call is not None:
            self.on_call()
        return out

    def predict(self, x: torch.Tensor, k: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) predicted at chain step k, whatever the model's mean type.

        x0 is clamped to [-1, 1] when the chain clips, and eps is then recomputed from it
        (eps = (x / sqrt(abar) - x0) / sqrt(1/abar - 1), the inverse of paper Eq. 15), so the pair
        is consistent with x; without clipping an eps model's eps is returned as it came, and a v
        model's pair is (sigma x + alpha v, alpha x - sigma v) (Salimans & Ho 2022, section 4).
        """
        out = self(x, k) if out is None else out
        c = self.chain.coefs[k]
        d = self.chain.spaced
        if d.mean_type.value == "v" and not self.chain.clip_denoised:
            # Salimans & Ho section 4: the exact inverse rotation, no division by alpha or sigma.
            x0, eps = x0_eps_from_v(x, out[:, :x.shape[1]], c.sqrt_alphas_cumprod, c.sqrt_one_minus_alphas_cumprod)
            return eps, x0
        _, _, _, x0 = d.mean_variance_from_output(out, x, c, self.chain.clip_denoised)
        if d.mean_type.value == "eps" and not self.chain.clip_denoised:
            return out[:, :x.shape[1]], x0
        return (c.sqrt_recip_alphas_cumprod * x - x0) / c.sqrt_recipm1_alphas_cumprod, x0


def _null_label(model: Callable) -> int:
    for m in (model, getattr(model, "model", None)):  # FastModel keeps the network as .model
        n = getattr(m, "num_classes", None)
        if n:
            return int(n)
    raise ValueError("guidance needs a class-conditional model (model.num_classes > 0) or explicit null_kwargs")


Callback = Callable[[int, torch.Tensor], Any]


class Sampler:
    """One sampler: built once per chain (validates its options, gathers every coefficient), then
    run on batches.

    Subclasses set ``name`` and ``help`` and implement :meth:`run`; registering one with
    :func:`ddpm.samplers.register` makes it available to :func:`ddpm.sample` and ``ddpm sample
    --sampler``. ``nfe`` is the number of network calls per image for the chain.
    """

    name: str = ""
    help: str = ""

    def __init__(self, chain: Chain):
        self.chain = chain

    @classmethod
    def chain_steps(cls, nfe: int) -> int:
        """Kept timesteps for a budget of ``nfe`` network calls per image (``sample(steps=nfe)``):
        nfe itself for one call per kept timestep; a sampler with extra calls overrides it."""
        return nfe

    @property
    def nfe(self) -> int:
        return len(self.chain)

    def run(self, denoise: Denoiser, x: torch.Tensor, noise: NoiseSource, callback: Callback | None = None,
            start: int | None = None) -> torch.Tensor:
        """Walk the chain from x = x_{s_{K-1}} [B, C, H, W] to x_0; ``callback(k, pred_x0)`` after
        every chain step k (descending). ``start``: begin at chain step ``start`` instead of K-1
        (x is then x_{s_start}: interpolation decodes from an intermediate step); samplers that
        cannot start mid-chain raise :class:`ddpm.errors.SamplingOptionError`. Returns x_0 [B, C, H, W]."""
        raise NotImplementedError


class StepSampler(Sampler):
    """A sampler whose chain step k depends only on x_k, the model output at k and one noise draw
    (ancestral, DDIM): subclasses implement :meth:`step`; the walk, one network call and one
    ``noise.next()`` per step (also where the noise is unused, so image k's stream stays fixed),
    and mid-chain starts are shared here."""

    def step(self, k: int, x: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from chain index k given the model output ``out`` and the noise draw ``z``.
        Returns (x_{k-1}, pred_x0), both like x."""
        raise NotImplementedError

    def run(self, denoise: Denoiser, x: torch.Tensor, noise: NoiseSource, callback: Callback | None = None,
            start: int | None = None) -> torch.Tensor:
        for k in range(len(self.chain) - 1 if start is None else start, -1, -1):
            x, x0 = self.step(k, x, denoise(x, k), noise.next())
            if callback is not None:
                callback(k, x0)
        return x


def last_step_mask(chain: Chain) -> np.ndarray:
    """float64 [K]: 1, except 0 at chain step 0, where no noise is added (Algorithm 2: z = 0 at t = 1)."""
    mask = np.ones(len(chain))
    mask[0] = 0.0
    return mask
