"""Sampling: the public entry points (paper Algorithm 2 and section 4.3-4.4's figures).

- :func:`sample`: one image per seed with any registered sampler (:mod:`ddpm.samplers`:
  ``ancestral`` = Algorithm 2 as the official code runs it, ``ddim``, ...), on the full chain or
  a respaced one of ``steps`` network calls, optionally conditional (``model_kwargs``) and
  guided (``guidance``), from the seeds' own x_T or a given one (``x_T``).
- :func:`sample_progressive`: the same, recording the x0 prediction every ``every`` steps (Fig. 6).
- :func:`sample_chains`: chains sharing x_T and their first steps' noise, then split (Fig. 7).
- :func:`interpolate`: decode a mix of two noised images (section 4.4, Fig. 8/9).

Randomness: image k of a run draws from its own stream ``ImageNoise(seeds[k])``: x_T is the first
draw (also when ``x_T`` is given, which then replaces it), then the sampler's step noise, so image
k is the same whatever the batch size.

Speed: how the network runs is one :class:`ddpm.speed.Speed` (channels_last, compile, CUDA
graphs, Winograd); every coefficient is gathered before the loop, and the loop makes no
host-device synchronisation and no per-image Python work.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from . import samplers
from .autospacing import resolve_spacing
from .diffusion import GaussianDiffusion
from .errors import SamplingOptionError
from .respacing import check_spacing, respace, space_timesteps
from .rng import ImageNoise
from .samplers.base import Chain, Denoiser
from .speed import Speed, fast_network

log = logging.getLogger(__name__)

__all__ = ["sample", "sample_progressive", "sample_chains", "interpolate", "space_timesteps", "respace",
           "Speed", "SamplingOptionError"]


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


def _check_per_image(name: str, value: torch.Tensor, n: int, shape: tuple | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != n:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise SamplingOptionError(f"{name} must be a tensor with one row per seed ({n}), got {got}")
    if shape is not None and tuple(value.shape[1:]) != shape:
        raise SamplingOptionError(f"{name} must have shape [{n}, {', '.join(map(str, shape))}], got {tuple(value.shape)}")
    return value


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


def make_chain(diffusion: GaussianDiffusion, device, steps: int | None = None, spacing: str = "auto",
               clip_denoised: bool = True, eta: float = 0.0, options: Mapping[str, Any] | None = None) -> Chain:
    """The chain of a sampling run: every step (``steps=None``) or ``steps`` kept ones by ``spacing``
    (``auto`` here knows no sampler and is trailing; :func:`sample` resolves it per sampler first)."""
    T = diffusion.num_timesteps
    if steps is None:
        check_spacing(spacing)
        kept = list(range(T))
    else:
        kept = space_timesteps(T, steps, spacing, diffusion.alphas_cumprod)
        if len(kept) < 2:
            raise SamplingOptionError("sampling steps must be >= 2: a respaced chain needs at least 2 steps")
    return Chain(diffusion, tuple(kept), torch.device(device), clip_denoised=bool(clip_denoised), eta=eta,
                 options=dict(options or {}))


def _recorder(rec: torch.Tensor, every: int):
    """The sampler callback of :func:`sample_progressive`: x0 at chain step k = every*j into slot j."""
    def record(k: int, pred_xstart: torch.Tensor) -> None:
        if k % every == 0:  # descending loop: slot j ends at k = every*j
            rec[:, k // every] = pred_xstart
    return record


def _sample_impl(diffusion, model, shape, seeds, *, batch_size, device, sampler, steps, spacing, eta, clip_denoised,
                 amp_dtype, progress, speed, x_T, model_kwargs, guidance, sampler_options, every=None):
    shape, seeds = _check_shape(shape), _check_seeds(seeds)
    N = len(seeds)
    batch_size = N if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise SamplingOptionError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    cls = samplers.get(sampler)
    check_spacing(spacing)
    used = resolve_spacing(spacing, sampler, steps)
    if used != spacing:
        log.info("spacing auto -> %s (%s, %s network calls)", used, sampler, steps)
    # steps counts network calls; a sampler with extra calls per chain (pndm) walks fewer timesteps
    chain = make_chain(diffusion, device, None if steps is None else cls.chain_steps(steps), used,
                       clip_denoised, eta, sampler_options)
    unit = cls(chain)
    if x_T is not None:
        x_T = _check_per_image("x_T", x_T, N, shape)
    kwargs = {k: _check_per_image(f"model_kwargs[{k!r}]", v, N) for k, v in (model_kwargs or {}).items()}
    if guidance is not None and not kwargs:
        raise SamplingOptionError("guidance needs conditioning: pass model_kwargs (e.g. {'y': labels})")
    S = len(chain)
    n_slots = None if every is None else (S - 1) // int(every) + 1
    starts = range(0, N, batch_size)
    pbar = _progress(progress, len(starts) * unit.nfe, "sampling")
    finals, records = [], []
    # guidance runs the conditional and unconditional halves as one batch of 2B rows
    rows = min(batch_size, N) * (2 if guidance is not None else 1)
    with fast_network(model, device, shape, speed, amp_dtype, batch=rows) as net:
        for i in starts:
            b_seeds = seeds[i:i + batch_size]
            B = len(b_seeds)
            noise = ImageNoise(b_seeds, shape, device, torch.float32)
            x = noise.next()  # x_T ~ N(0, I): the first draw of every image's stream
            if x_T is not None:
                x = x_T[i:i + B].to(device, torch.float32)
            denoise = Denoiser(net, chain, B, amp_dtype, {k: v[i:i + B].to(device) for k, v in kwargs.items()},
                               guidance, on_call=None if pbar is None else (lambda: pbar.update(1)))
            rec = None if every is None else torch.empty((B, n_slots, *shape), dtype=torch.float32, device=device)
            callback = None if rec is None else _recorder(rec, every)
            finals.append(unit.run(denoise, x, noise, callback).to("cpu", torch.float32))
            if rec is not None:
                records.append(rec.to("cpu", torch.float32))
    if pbar is not None:
        pbar.close()
    final = torch.cat(finals)
    if every is None:
        return final
    return final, torch.cat(records), [chain.timesteps[every * j] for j in range(n_slots)]


@torch.inference_mode()
def sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seeds: Sequence[int], *,
           batch_size: int | None = None, device="cpu", sampler: str = "ancestral", steps: int | None = None,
           spacing: str = "auto", eta: float = 0.0, clip_denoised: bool = True,
           amp_dtype: torch.dtype | None = None, progress: bool = False, speed: Speed | None = None,
           x_T: torch.Tensor | None = None, model_kwargs: Mapping[str, torch.Tensor] | None = None,
           guidance: float | None = None, sampler_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Draw one image per seed (paper Algorithm 2 as the official code runs it, or another sampler).

    Args:
        shape: (C, H, W); seeds: one int per image; batch_size: images per batch (default all).
        device: where the model lives and the chain runs.
        sampler: a name from :func:`ddpm.samplers.names` (``ancestral``: Algorithm 2; ``ddim``
            with ``eta``; ...).
        steps: None = all T steps; else a respaced chain of ``steps`` network calls (``spacing``:
            auto | trailing | leading | linspace | quadratic | logsnr, see
            :func:`ddpm.respacing.space_timesteps`; ``auto``, the default, is the spacing measured
            best for this sampler and number of calls, :func:`ddpm.autospacing.resolve_spacing`).
        clip_denoised: clamp the x0 prediction to [-1, 1] at every step (official default).
        amp_dtype: run the network under autocast with this dtype (the math stays float32).
        speed: how the network runs (:class:`ddpm.speed.Speed`: channels_last, compile, CUDA
            graphs, Winograd); None = the defaults.
        x_T: optional starting noise [N, C, H, W] (it replaces the first draw of every image's stream;
            the step noise is unchanged), e.g. for parity checks against another sampler.
        model_kwargs: conditioning tensors with one row per image, passed to the model as keyword
            arguments (class labels: ``{"y": int64 [N]}``).
        guidance: classifier-free guidance weight W (needs ``model_kwargs``): the network output is
            out_uncond + W (out_cond - out_uncond), both branches in one batched call
            (:class:`ddpm.samplers.base.Denoiser`).
        sampler_options: sampler-specific options by name.

    Returns: float32 CPU tensor [N, C, H, W]; in [-1, 1] when clip_denoised (the final sample is
        the clipped x0 prediction for ``ancestral`` and ``ddim``).
    """
    return _sample_impl(diffusion, model, shape, seeds, batch_size=batch_size, device=device, sampler=sampler,
                        steps=steps, spacing=spacing, eta=eta, clip_denoised=clip_denoised, amp_dtype=amp_dtype,
                        progress=progress, speed=speed, x_T=x_T, model_kwargs=model_kwargs, guidance=guidance,
                        sampler_options=sampler_options)


@torch.inference_mode()
def sample_progressive(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seeds: Sequence[int],
                       every: int = 50, **kwargs):
    """:func:`sample` (same keyword arguments), also recording the x0 prediction at chain steps
    k = every*j (paper Fig. 6).

    Returns: (final [N, C, H, W], xstart [N, S, C, H, W], ts) with S = (T'-1)//every + 1 for a
        chain of T' steps; slot j holds x0 predicted at chain step every*j, whose original 0-based
        timestep is ts[j] (ts = [0, 50, ..., 950] for the full T = 1000 chain). Slot 0 is the final
        sample. ``final`` equals what :func:`sample` returns for the same arguments.
    """
    if isinstance(every, bool) or int(every) != every or every < 1:
        raise SamplingOptionError(f"every must be a positive integer, got {every!r}")
    opts = dict(batch_size=None, device="cpu", sampler="ancestral", steps=None, spacing="auto", eta=0.0,
                clip_denoised=True, amp_dtype=None, progress=False, speed=None, x_T=None, model_kwargs=None,
                guidance=None, sampler_options=None)
    unknown = set(kwargs) - set(opts)
    if unknown:
        raise TypeError(f"sample_progressive() got unexpected keyword arguments {sorted(unknown)}")
    opts.update(kwargs)
    return _sample_impl(diffusion, model, shape, seeds, every=int(every), **opts)


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


def _ancestral(diffusion: GaussianDiffusion, device, clip_denoised: bool):
    chain = make_chain(diffusion, device, clip_denoised=clip_denoised)
    return chain, samplers.get("ancestral")(chain)


@torch.inference_mode()
def sample_chains(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], seed: int, n: int,
                  split_steps: Sequence[int] = (0, 250, 500, 750), *, device="cpu", clip_denoised: bool = True,
                  amp_dtype: torch.dtype | None = None, progress: bool = False,
                  speed: Speed | None = None) -> torch.Tensor:
    """Chains that share x_T and the first reverse steps' noise, then split (paper Fig. 7).

    For split s (the official ``repeat_noise_steps``), the noise of step i (0-based) is shared by
    the n chains while T - i <= s, then independent; so s = 0 shares only x_T and s = 250 shares
    everything down to paper x_750. Every row uses the same shared stream (from ``seed``) and
    chain j the same own stream, so the result is a deterministic function of ``seed``.

    ``speed``: as in :func:`sample`. Returns: float32 CPU [len(split_steps), n, C, H, W].
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
    chain, unit = _ancestral(diffusion, device, clip_denoised)
    pbar = _progress(progress, T, "chains")
    with fast_network(model, device, shape, speed, amp_dtype, batch=R) as net:
        denoise = Denoiser(net, chain, R, amp_dtype, on_call=None if pbar is None else (lambda: pbar.update(1)))
        x = unit.run(denoise, x, _SharedThenSplit(shared, own, share, len(splits)))
    if pbar is not None:
        pbar.close()
    return x.to("cpu", torch.float32).reshape(len(splits), n, *shape)


@torch.inference_mode()
def interpolate(diffusion: GaussianDiffusion, model: Callable, x0_a: torch.Tensor, x0_b: torch.Tensor, t: int,
                lambdas: Sequence[float], seed: int, *, device="cpu", clip_denoised: bool = True,
                amp_dtype: torch.dtype | None = None, progress: bool = False,
                speed: Speed | None = None) -> torch.Tensor:
    """Interpolate two images in latent space (paper section 4.4, Fig. 8/9).

    x_t = q_sample(x0_a, t), x_t' = q_sample(x0_b, t) with independent fixed noise (from ``seed``),
    mixed as (1 - lambda) x_t + lambda x_t' (the latents, not x0: the paper's formula is a typo),
    then decoded by the reverse chain i = t .. 0 with the same reverse noise for every lambda.

    Args:
        x0_a, x0_b: images [C, H, W] or [1, C, H, W] in [-1, 1]; t: 0-based index in 0..T-1.
        speed: as in :func:`sample`.

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
    chain, unit = _ancestral(diffusion, device, clip_denoised)
    pbar = _progress(progress, t + 1, "interpolate")
    with fast_network(model, device, shape, speed, amp_dtype, batch=L) as net:
        denoise = Denoiser(net, chain, L, amp_dtype, on_call=None if pbar is None else (lambda: pbar.update(1)))
        x = unit.run(denoise, x, _Repeat(ImageNoise([seed_rev], shape, device), L), start=t)
    if pbar is not None:
        pbar.close()
    return x.to("cpu", torch.float32)
