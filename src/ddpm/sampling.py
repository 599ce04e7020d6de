"""Sampling: Algorithm 2 as the official code runs it, respaced chains, DDIM, progressive
x0 predictions (Fig. 6), shared-latent chains (Fig. 7) and interpolation (Fig. 8/9); spec section 6.

Randomness: image k of a run draws from its own stream ``ImageNoise(seeds[k])``: x_T is the first
draw, then one draw per reverse step (also at the last step, where the noise is masked, and for
DDIM with eta = 0, where it is unused), so image k is the same whatever the batch size.

Speed: every per-step coefficient is gathered once, before the loop, as float32 tensors on the
device (float64 -> float32 exactly as the per-batch gather of :class:`GaussianDiffusion` does), and
the loop makes no host-device synchronisation and no per-image Python work. The network runs
through :class:`ddpm.fast.FastModel`: by default with channels_last weights and inputs (an
``nn.Module`` on CPU/CUDA), optionally ``compile``-d with inductor and, on CUDA, replayed from a
CUDA graph (``cuda_graph``); on the CPU its wide 3x3 convolutions run as Winograd F(4x4, 3x3)
(``winograd``, :mod:`ddpm.winograd`). These change the results only by float rounding.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .diffusion import GaussianDiffusion, StepCoefs, call_model
from .errors import ConfigError, suggest
from .fast import FastModel, channels_last as _channels_last_weights, lowp_weights
from .rng import ImageNoise
from .winograd import winograd_convs

SAMPLERS = ("ancestral", "ddim")
SPACINGS = ("trailing", "leading", "linspace")


class SamplingOptionError(ConfigError, ValueError):
    """A bad sampling option (a ``ValueError`` and a ``ConfigError``)."""


# ----------------------------------------------------------------------------------------------
# Respacing (improved-diffusion's SpacedDiffusion; diffusers' timestep spacings)
def space_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The ``steps`` kept 0-based timestep indices out of ``num_timesteps``, ascending.

    ``trailing`` (default): round(T - k T/steps) - 1 for k < steps; always keeps T-1 (diffusers'
    "trailing"). ``leading``: k * (T // steps), starts at 0. ``linspace``: round(linspace(0, T-1, steps)).
    """
    T = int(num_timesteps)
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= T:
        raise SamplingOptionError(f"sampling steps must be an integer in 1..{T}, got {steps!r}")
    steps = int(steps)
    if spacing == "trailing":
        ratio = T / steps
        kept = np.round(T - np.arange(steps) * ratio).astype(np.int64) - 1
    elif spacing == "leading":
        kept = np.arange(steps, dtype=np.int64) * (T // steps)
    elif spacing == "linspace":
        kept = np.linspace(0, T - 1, steps).round().astype(np.int64)
    else:
        raise SamplingOptionError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}"
                                  f"{suggest(spacing, SPACINGS)}")
    out = sorted(set(int(i) for i in kept))
    if len(out) != steps or out[0] < 0 or out[-1] > T - 1:  # pragma: no cover - guarded by the formulas
        raise SamplingOptionError(f"spacing {spacing!r} gives {out} for T={T}, steps={steps}")
    return out


def respace(diffusion: GaussianDiffusion, use_timesteps: Sequence[int]) -> tuple[GaussianDiffusion, list[int]]:
    """A shorter chain through the kept steps s_0 < s_1 < ... (improved-diffusion's SpacedDiffusion).

    beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar_{s_{-1}} = 1), so the kept marginals
    q(x_{s_k} | x_0) are unchanged. Where s_k = s_{k-1} + 1 that ratio is exactly alpha_{s_k}, and
    beta_{s_k} itself is used, so keeping every step reproduces the original chain bit for bit.

    Returns: (diffusion over len(use_timesteps) steps with the same options, timestep_map) where
        timestep_map[k] = s_k is the original index the network must see; wrap a model with
        :class:`TimestepMapModel` to call it with the new indices.
    """
    T = diffusion.num_timesteps
    use = sorted(set(int(i) for i in use_timesteps))
    if not use or use[0] < 0 or use[-1] >= T:
        raise SamplingOptionError(f"kept timesteps must be a non-empty subset of 0..{T - 1}, got {list(use_timesteps)}")
    if len(use) < 2:
        raise SamplingOptionError("sampling steps must be >= 2: a respaced chain needs at least 2 steps")
    betas, prev, last_abar = [], -1, 1.0
    for i in use:
        betas.append(diffusion.betas[i] if i == prev + 1 else 1.0 - diffusion.alphas_cumprod[i] / last_abar)
        prev, last_abar = i, diffusion.alphas_cumprod[i]
    spaced = GaussianDiffusion(np.array(betas, dtype=np.float64), mean_type=diffusion.mean_type,
                               var_type=diffusion.var_type, loss_type=diffusion.loss_type)
    return spaced, use


class TimestepMapModel:
    """Calls ``model(x, timestep_map[t])``: a respaced chain's index k becomes the original s_k."""

    def __init__(self, model: Callable, timestep_map: Sequence[int]):
        self.model = model
        self.timestep_map = list(timestep_map)
        self._maps: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self._maps.get(str(t.device))
        if m is None:
            m = self._maps[str(t.device)] = torch.as_tensor(self.timestep_map, dtype=torch.int64, device=t.device)
        return self.model(x, m[t])


def _chain(diffusion: GaussianDiffusion, steps: int | None, spacing: str) -> tuple[GaussianDiffusion, list[int]]:
    T = diffusion.num_timesteps
    if steps is None:
        if spacing not in SPACINGS:
            space_timesteps(T, T, spacing)  # raises with the list of choices
        return diffusion, list(range(T))
    return respace(diffusion, space_timesteps(T, steps, spacing))


# ----------------------------------------------------------------------------------------------
# One reverse step with pre-gathered coefficients
class Stepper:
    """The reverse step x_t -> x_{t-1} of one chain, every coefficient gathered before the loop.

    ``ancestral``: p_sample of the official code (spec 6.1): the mean from
    :meth:`GaussianDiffusion.mean_variance_from_output` (with the clipped x0 when
    ``clip_denoised``), plus sigma_k z with the noise masked at k = 0, so the last output is the
    (clipped) x0 prediction.
    ``ddim`` (Song et al. 2021, Eq. 12): x_{k-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
    s = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev); eps is recomputed from the
    (clipped) x0. eta = 1 gives s^2 = beta~, the ancestral step with fixedsmall; eta = 0 is deterministic.
    """

    def __init__(self, diffusion: GaussianDiffusion, device, sampler: str = "ancestral", eta: float = 0.0,
                 clip_denoised: bool = True, dtype: torch.dtype = torch.float32):
        if sampler not in SAMPLERS:
            raise SamplingOptionError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}"
                                      f"{suggest(str(sampler), SAMPLERS)}")
        if not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
            raise SamplingOptionError(f"eta must be a number >= 0, got {eta!r}")
        self.diffusion, self.sampler, self.clip_denoised = diffusion, sampler, clip_denoised
        S = diffusion.num_timesteps
        device = torch.device(device)

        def table(a: np.ndarray) -> list[torch.Tensor]:
            t = torch.as_tensor(a, dtype=torch.float64).to(dtype).to(device)  # cast on the CPU (MPS has no float64)
            return [t[k] for k in range(S)]

        coef_table = diffusion.coef_table(device, dtype)
        self.coefs: list[StepCoefs] = [coef_table.at(k) for k in range(S)]
        mask = np.ones(S)
        mask[0] = 0.0  # no noise at the last step (Algorithm 2: z = 0 at t = 1)
        self.mask = table(mask)
        if sampler == "ancestral":
            fixed_log = diffusion._coef_arrays["fixed_log_variance"]
            self.std = table(mask * np.exp(0.5 * fixed_log))
        else:
            abar, abar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev) * mask
            self.sigma = table(sigma)
            self.sqrt_abar_prev = table(np.sqrt(abar_prev))
            self.dir_coef = table(np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.0)))

    def step(self, k: int, x: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor):
        """Step from chain index k. Returns (x_{k-1}, pred_xstart), both like x."""
        d, c = self.diffusion, self.coefs[k]
        mean, _, log_var, pred_xstart = d.mean_variance_from_output(model_output, x, c, self.clip_denoised)
        if self.sampler == "ancestral":
            if d.learned_variance:
                return mean + self.mask[k] * torch.exp(0.5 * log_var) * noise, pred_xstart
            return mean + self.std[k] * noise, pred_xstart
        eps = (c.sqrt_recip_alphas_cumprod * x - pred_xstart) / c.sqrt_recipm1_alphas_cumprod
        return self.sqrt_abar_prev[k] * pred_xstart + self.dir_coef[k] * eps + self.sigma[k] * noise, pred_xstart


def _run_chain(stepper: Stepper, model: Callable, x: torch.Tensor, noise, t_rows: torch.Tensor, start: int,
               amp_dtype: torch.dtype | None, on_step: Callable | None = None, pbar=None) -> torch.Tensor:
    """Reverse steps k = start .. 0. ``noise.next()`` gives one [B, C, H, W] draw per step;
    ``t_rows[k]`` is the int64 [B] timestep the network sees at step k."""
    d = stepper.diffusion
    for k in range(start, -1, -1):
        out = call_model(model, x, t_rows[k], amp_dtype)
        d._check_output(out, x)
        x, pred_xstart = stepper.step(k, x, out, noise.next())
        if on_step is not None:
            on_step(k, pred_xstart)
        if pbar is not None:
            pbar.update(1)
    return x


def _t_rows(timestep_map: Sequence[int], batch: int, device) -> torch.Tensor:
    """[S, B] int64: row k is the network's timestep at chain step k, contiguous."""
    return torch.as_tensor(list(timestep_map), dtype=torch.int64, device=device)[:, None].repeat(1, batch)


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SamplingOptionError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    return shape


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, np.integer)):
        raise SamplingOptionError("seeds must be a sequence with one integer per image (e.g. range(16)), got an int")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SamplingOptionError("seeds is empty: give one integer seed per image")
    return seeds


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


@contextlib.contextmanager
def _fast_model(model: Callable, device, shape, channels_last: bool | None, compile: bool, cuda_graph: bool,
                amp_dtype: torch.dtype | None = None, winograd: bool | None = None) -> Iterator[Callable]:
    """``model`` wrapped in :class:`ddpm.fast.FastModel` for (C, H, W) images; for the block its
    weights are channels_last (if chosen), under autocast already in ``amp_dtype`` (cast once,
    not every step), and its large 3x3 convolutions run as Winograd F(4x4, 3x3) on the CPU
    (``winograd``; None = on for eager float32 CPU runs, see :mod:`ddpm.winograd`)."""
    if winograd and compile:
        raise SamplingOptionError("winograd=True cannot be combined with compile=True (inductor compiles the "
                                  "direct convolution); choose one")
    if winograd is None:
        winograd = torch.device(device).type == "cpu" and not compile and amp_dtype is None
    fm = FastModel(model, device, channels_last=channels_last, compile=compile, cuda_graph=cuda_graph,
                   image_hw=tuple(shape[-2:]))
    with (_channels_last_weights(model, enabled=fm.channels_last), lowp_weights(model, amp_dtype),
          winograd_convs(model, enabled=bool(winograd))):
        yield fm


def _sample_impl(diffusion, model, shape, seeds, batch_size, device, sampler, steps, spacing, eta, clip_denoised,
                 amp_dtype, progress, every=None, fast=None):
    shape, seeds = _check_shape(shape), _check_seeds(seeds)
    batch_size = len(seeds) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise SamplingOptionError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    chain, tmap = _chain(diffusion, steps, spacing)
    stepper = Stepper(chain, device, sampler=sampler, eta=eta, clip_denoised=clip_denoised)
    S = chain.num_timesteps
    n_slots = None if every is None else (S - 1) // int(every) + 1
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    pbar = _progress(progress, len(batches) * S, "sampling")
    finals, records = [], []
    with _fast_model(model, device, shape, **(fast or {}), amp_dtype=amp_dtype) as model:
        for b_seeds in batches:
            _sample_batch(stepper, model, shape, b_seeds, device, tmap, S, amp_dtype, pbar, every, n_slots,
                          finals, records)
    if pbar is not None:
        pbar.close()
    final = torch.cat(finals)
    if every is None:
        return final
    return final, torch.cat(records), [tmap[every * j] for j in range(n_slots)]


def _sample_batch(stepper, model, shape, b_seeds, device, tmap, S, amp_dtype, pbar, every, n_slots, finals, records):
    """One batch of :func:`_sample_impl`: appends its final images (and x0 records) to the lists."""
    noise = ImageNoise(b_seeds, shape, device, torch.float32)
    x = noise.next()  # x_T ~ N(0, I): the first draw of every image's stream
    rec, on_step = None, None
    if every is not None:
        rec = torch.empty((len(b_seeds), n_slots, *shape), dtype=torch.float32, device=device)

        def on_step(k, pred_xstart, rec=rec):
            if k % every == 0:  # descending loop: slot j ends at k = every*j (spec 6.3)
                rec[:, k // every] = pred_xstart

    x = _run_chain(stepper, model, x, noise, _t_rows(tmap, len(b_seeds), device), S - 1, amp_dtype, on_step, pbar)
    finals.append(x.to("cpu", torch.float32))
    if rec is not None:
        records.append(rec.to("cpu", torch.float32))


@torch.inference_mode()
def sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seeds: Sequence[int], *,
           batch_size: int | None = None, device="cpu", sampler: str = "ancestral", steps: int | None = None,
           spacing: str = "trailing", eta: float = 0.0, clip_denoised: bool = True,
           amp_dtype: torch.dtype | None = None, progress: bool = False, compile: bool = False,
           channels_last: bool | None = None, cuda_graph: bool = False,
           winograd: bool | None = None) -> torch.Tensor:
    """Draw one image per seed (paper Algorithm 2 as the official code runs it, spec 6.1-6.2).

    Args:
        shape: (C, H, W); seeds: one int per image; batch_size: images per batch (default all).
        device: where the model lives and the chain runs.
        sampler: ``ancestral`` (p_sample) or ``ddim`` (with ``eta``).
        steps: None = all T steps; else a respaced chain of ``steps`` steps (``spacing``:
            trailing | leading | linspace, see :func:`space_timesteps`).
        clip_denoised: clamp the x0 prediction to [-1, 1] at every step (official default).
        amp_dtype: run the network under autocast with this dtype (the math stays float32).
        compile: run the network through ``torch.compile`` (inductor; :class:`ddpm.fast.FastModel`).
            One compilation per architecture and batch shape (minutes for the CIFAR-10 U-Net on a
            CPU), then the compiled code is reused by later calls in the process.
        channels_last: NHWC weights and inputs for the network during the call (the module is
            restored afterwards); None = :func:`ddpm.fast.wants_channels_last` (an ``nn.Module``
            on CUDA, or on the CPU for images of at least 32x32).
        cuda_graph: on CUDA, replay the network from a CUDA graph (ignored elsewhere).
        winograd: run the 3x3 convolutions with >= 128 channels as Winograd F(4x4, 3x3)
            (:mod:`ddpm.winograd`; float32, ~1.3x faster than oneDNN's direct convolution for
            the CIFAR-10 U-Net at batch 64, rounding error ~2x the direct one's). None = on for
            eager float32 runs on the CPU (not with ``compile`` or ``amp_dtype``); False =
            oneDNN's direct convolution.

    Returns: float32 CPU tensor [N, C, H, W]; in [-1, 1] when clip_denoised (the final sample is
        the clipped x0 prediction).
    """
    return _sample_impl(diffusion, model, shape, seeds, batch_size, device, sampler, steps, spacing, eta,
                        clip_denoised, amp_dtype, progress,
                        fast=dict(channels_last=channels_last, compile=compile, cuda_graph=cuda_graph,
                                  winograd=winograd))


@torch.inference_mode()
def sample_progressive(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seeds: Sequence[int],
                       every: int = 50, *, batch_size: int | None = None, device="cpu", sampler: str = "ancestral",
                       steps: int | None = None, spacing: str = "trailing", eta: float = 0.0,
                       clip_denoised: bool = True, amp_dtype: torch.dtype | None = None, progress: bool = False,
                       compile: bool = False, channels_last: bool | None = None, cuda_graph: bool = False,
                       winograd: bool | None = None):
    """:func:`sample`, also recording the x0 prediction at chain steps k = every*j (spec 6.3, Fig. 6).

    Returns: (final [N, C, H, W], xstart [N, S, C, H, W], ts) with S = (T'-1)//every + 1 for a
        chain of T' steps; slot j holds x0 predicted at chain step every*j, whose original 0-based
        timestep is ts[j] (ts = [0, 50, ..., 950] for the full T = 1000 chain). Slot 0 is the final
        sample. ``final`` equals what :func:`sample` returns for the same arguments.
    """
    if isinstance(every, bool) or int(every) != every or every < 1:
        raise SamplingOptionError(f"every must be a positive integer, got {every!r}")
    return _sample_impl(diffusion, model, shape, seeds, batch_size, device, sampler, steps, spacing, eta,
                        clip_denoised, amp_dtype, progress, every=int(every),
                        fast=dict(channels_last=channels_last, compile=compile, cuda_graph=cuda_graph,
                                  winograd=winograd))


def _child_seeds(seed: int, n: int) -> list[int]:
    """n seeds derived from ``seed`` (numpy SeedSequence), independent of the seed's own stream."""
    if int(seed) < 0:
        raise SamplingOptionError(f"seed must be a non-negative integer, got {seed}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n)]


class _SharedThenSplit:
    """Per-step noise of :func:`sample_chains`: row r takes the shared draw while
    T - i <= split[r] (i = chain step), then its own chain's draw."""

    def __init__(self, shared: ImageNoise, own: ImageNoise, share: torch.Tensor, copies: int):
        self.shared, self.own, self.share, self.copies = shared, own, share, copies
        self.k = share.shape[0] - 1

    def next(self) -> torch.Tensor:
        s, o = self.shared.next(), self.own.next().repeat(self.copies, 1, 1, 1)
        z = torch.where(self.share[self.k].view(-1, 1, 1, 1), s.expand_as(o), o)
        self.k -= 1
        return z


class _Repeat:
    """One stream's draws, expanded to ``n`` rows."""

    def __init__(self, src: ImageNoise, n: int):
        self.src, self.n = src, n

    def next(self) -> torch.Tensor:
        z = self.src.next()
        return z.expand(self.n, *z.shape[1:])


@torch.inference_mode()
def sample_chains(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seed: int, n: int,
                  split_steps: Sequence[int] = (0, 250, 500, 750), *, device="cpu", clip_denoised: bool = True,
                  amp_dtype: torch.dtype | None = None, progress: bool = False, compile: bool = False,
                  channels_last: bool | None = None, cuda_graph: bool = False,
                  winograd: bool | None = None) -> torch.Tensor:
    """Chains that share x_T and the first reverse steps' noise, then split (spec 6.4, Fig. 7).

    For split s (the official ``repeat_noise_steps``), the noise of step i (0-based) is shared by
    the n chains while T - i <= s, then independent; so s = 0 shares only x_T and s = 250 shares
    everything down to paper x_750. Every row uses the same shared stream (from ``seed``) and
    chain j the same own stream, so the result is a deterministic function of ``seed``.

    ``compile``, ``channels_last``, ``cuda_graph``, ``winograd``: as in :func:`sample`.

    Returns: float32 CPU [len(split_steps), n, C, H, W].
    """
    shape = _check_shape(shape)
    T, n = diffusion.num_timesteps, int(n)
    splits = [int(s) for s in split_steps]
    if n < 1 or not splits or any(not 0 <= s <= T for s in splits):
        raise SamplingOptionError(f"need n >= 1 and split_steps in 0..{T}, got n={n}, split_steps={list(split_steps)}")
    device = torch.device(device)
    R = len(splits) * n
    shared = ImageNoise([int(seed)], shape, device)
    own = ImageNoise(_child_seeds(seed, n), shape, device)
    x = shared.next().expand(R, *shape).clone()  # one x_T for every chain
    own.next()  # keep own streams aligned with the shared one: draw k+1 is step k's noise
    split_rows = torch.as_tensor(splits, device=device).repeat_interleave(n)  # [R]
    steps_left = T - torch.arange(T, device=device)  # T - i
    share = steps_left[:, None] <= split_rows[None, :]  # [T, R]
    stepper = Stepper(diffusion, device, "ancestral", clip_denoised=clip_denoised)
    pbar = _progress(progress, T, "chains")
    with _fast_model(model, device, shape, channels_last, compile, cuda_graph, amp_dtype, winograd) as fm:
        x = _run_chain(stepper, fm, x, _SharedThenSplit(shared, own, share, len(splits)),
                       _t_rows(range(T), R, device), T - 1, amp_dtype, pbar=pbar)
    if pbar is not None:
        pbar.close()
    return x.to("cpu", torch.float32).reshape(len(splits), n, *shape)


@torch.inference_mode()
def interpolate(diffusion: GaussianDiffusion, model: Callable, x0_a: torch.Tensor, x0_b: torch.Tensor, t: int,
                lambdas: Sequence[float], seed: int, *, device="cpu", clip_denoised: bool = True,
                amp_dtype: torch.dtype | None = None, progress: bool = False, compile: bool = False,
                channels_last: bool | None = None, cuda_graph: bool = False,
                winograd: bool | None = None) -> torch.Tensor:
    """Interpolate two images in latent space (spec 6.5, paper section 4.4, Fig. 8/9).

    x_t = q_sample(x0_a, t), x_t' = q_sample(x0_b, t) with independent fixed noise (from ``seed``),
    mixed as (1 - lambda) x_t + lambda x_t' (the latents, not x0: the paper's formula is a typo),
    then decoded by the reverse chain i = t .. 0 with the same reverse noise for every lambda.

    Args:
        x0_a, x0_b: images [C, H, W] or [1, C, H, W] in [-1, 1]; t: 0-based index in 0..T-1.
        compile, channels_last, cuda_graph, winograd: as in :func:`sample`.

    Returns: float32 CPU [len(lambdas), C, H, W].
    """
    T = diffusion.num_timesteps
    if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < T:
        raise SamplingOptionError(f"interpolation t must be a 0-based index in 0..{T - 1}, got {t!r}")
    t = int(t)
    a, b = (v.reshape(1, *v.shape[-3:]) if v.ndim in (3, 4) else v for v in (x0_a, x0_b))
    if a.ndim != 4 or a.shape != b.shape or a.shape[0] != 1:
        raise SamplingOptionError(f"x0_a and x0_b must be two images [C, H, W] of the same shape, "
                                  f"got {tuple(x0_a.shape)} and {tuple(x0_b.shape)}")
    device = torch.device(device)
    a, b = a.to(device, torch.float32), b.to(device, torch.float32)
    shape = tuple(a.shape[1:])
    lam = torch.as_tensor([float(v) for v in lambdas], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    L = lam.shape[0]
    if L < 1:
        raise SamplingOptionError("lambdas is empty")
    seed_a, seed_b, seed_rev = _child_seeds(seed, 3)
    tt = torch.full((1,), t, dtype=torch.int64, device=device)
    xt_a = diffusion.q_sample(a, tt, noise=ImageNoise([seed_a], shape, device).next())
    xt_b = diffusion.q_sample(b, tt, noise=ImageNoise([seed_b], shape, device).next())
    x = (1.0 - lam) * xt_a + lam * xt_b  # [L, C, H, W]
    stepper = Stepper(diffusion, device, "ancestral", clip_denoised=clip_denoised)
    pbar = _progress(progress, t + 1, "interpolate")
    with _fast_model(model, device, shape, channels_last, compile, cuda_graph, amp_dtype, winograd) as fm:
        x = _run_chain(stepper, fm, x, _Repeat(ImageNoise([seed_rev], shape, device), L),
                       _t_rows(range(T), L, device), t, amp_dtype, pbar=pbar)
    if pbar is not None:
        pbar.close()
    return x.to("cpu", torch.float32)
