"""Analytic-DPM (Bao et al. 2022, ICLR): the reverse variance that maximises the bound, from one
Monte Carlo statistic of the trained network, without retraining.

For a reverse step from kept index s_k to s_{k-1} whose mean is built from x0_hat (paper Eq. 11
of Ho et al.; DDIM's Eq. 12 for eta-type steps) with "lambda^2" the variance the mean's
coefficients assume, Theorem 1 of Analytic-DPM gives the optimal variance

    sigma*_k^2 = lambda_k^2 + (sqrt((1 - abar_k)/a_k) - sqrt(1 - abar_{k-1} - lambda_k^2))^2 (1 - Gamma_{s_k})

with abar_k = abar_{s_k}, a_k = abar_k / abar_{k-1} (the respaced chain's step alpha, Bao et al.
section 4) and Gamma_n = E_{x0, eps} ||eps_theta(x_n, n)||^2 / d (the score-norm statistic of
Theorem 1 times 1 - abar_n). For the DDPM step (lambda^2 = beta~_k) it reduces to
beta~_k + beta_k^2 / (a_k (1 - abar_k)) (1 - Gamma). It is clipped to Theorem 2's bounds:
below by lambda^2, above by lambda^2 + (first bracket)^2 (Gamma = 0; beta_k / a_k for DDPM) and,
for data in [-1, 1], by lambda^2 + (sqrt(abar_{k-1}) - sqrt(1 - abar_{k-1} - lambda^2)
sqrt(abar_k / (1 - abar_k)))^2 (the posterior-mean coefficient of x0 squared for DDPM).

- :func:`estimate_gamma`: Gamma_n for every n of the model's T steps over training images, with
  its standard error. :func:`load_or_estimate` keeps it in ``RUN/checkpoints/analytic_var.json``, keyed on the
  checkpoint's digest and T.
- :func:`analytic_variance`: sigma*^2 for a chain's kept steps (the samplers' ``var: analytic``).
- :func:`bound_bpd`: the variational bound in bits/dim on the full or a respaced chain with the
  analytic and both fixed variances, from the same network outputs and noise (paired).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .diffusion import GaussianDiffusion, call_model
from .errors import CheckpointError, SamplingOptionError
from .likelihood import LN2, discretized_gaussian_log_likelihood, meanflat, normal_kl
from .options import REVERSE_VARIANCES as VAR_CHOICES
from .rng import ImageNoise

GAMMA_FILE = "analytic_var.json"


def _eps_from_output(diffusion: GaussianDiffusion, out: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    """The eps the network implies at 0-based step i (unclipped), whatever its mean type."""
    t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
    return diffusion.predict_xstart_eps(out, x, t, clip_denoised=False)[1]


@torch.inference_mode()
def estimate_gamma(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, batch_size: int = 250,
                   seed: int = 0, amp_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, Any]:
    """Gamma_n = E ||eps_theta(x_n, n)||^2 / d for every 0-based n, by Monte Carlo (Bao et al. Eq. 8).

    Args:
        x0: training images [N, C, H, W] in [-1, 1] on the model's device (N >= 2).
        seed: image k draws x_n's noise from ``ImageNoise(seed + k)``, one draw per n in
            descending n, so the estimate does not depend on the batch size.
    Returns: dict ``gamma`` and ``stderr`` (float64 [T]: the mean over the N images and its
        standard error std/sqrt(N), one noise draw per image and step), ``n`` (N), ``seed``.
    """
    N, T = x0.shape[0], diffusion.num_timesteps
    if N < 2:
        raise ValueError(f"estimate_gamma needs at least 2 images for a standard error, got {N}")
    s1 = np.zeros(T)
    s2 = np.zeros(T)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=((N + batch_size - 1) // batch_size) * T, desc="Gamma_n")
    for lo in range(0, N, batch_size):
        xb = x0[lo:lo + batch_size]
        B = xb.shape[0]
        noise = ImageNoise(range(seed + lo, seed + lo + B), xb.shape[1:], xb.device, torch.float32)
        rows = []
        for i in range(T - 1, -1, -1):
            t = torch.full((B,), i, dtype=torch.int64, device=xb.device)
            x = diffusion.q_sample(xb, t, noise=noise.next())
            eps = _eps_from_output(diffusion, call_model(model, x, t, amp_dtype), x, i)
            rows.append(meanflat(eps.double() ** 2))  # [B], ||eps||^2 / d
            if bar is not None:
                bar.update(1)
        sq = torch.stack(rows[::-1], dim=1).cpu().numpy()  # [B, T], ascending n
        s1 += sq.sum(0)
        s2 += (sq ** 2).sum(0)
    if bar is not None:
        bar.close()
    mean = s1 / N
    var = np.maximum(s2 / N - mean ** 2, 0.0) * N / (N - 1)
    return {"gamma": mean, "stderr": np.sqrt(var / N), "n": int(N), "seed": int(seed)}


def analytic_variance(diffusion: GaussianDiffusion, gamma: Sequence[float] | np.ndarray, timesteps: Sequence[int],
                      lam2: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """sigma*_k^2 (float64 [K]) of Theorem 1 for the chain through the kept 0-based ``timesteps``.

    Args:
        diffusion: the model's own T-step process; gamma: Gamma_n for all T steps (float [T]).
        timesteps: the kept indices s_0 < ... < s_{K-1}.
        lam2: lambda_k^2 [K], the variance the step's mean assumes: None = the (respaced) DDPM
            posterior variance beta~_k (ancestral); DDIM with eta: its sigma_k^2 (Eq. 16), 0 at eta = 0.
    Entry 0 (the step to x_0) follows the same formula (abar_{-1} = 1); the samplers add no noise
    there and :func:`bound_bpd` floors the decoder's variance (see there).
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    T = diffusion.num_timesteps
    if gamma.shape != (T,) or not np.all(np.isfinite(gamma)):
        raise SamplingOptionError(f"analytic variance: gamma must be {T} finite numbers (one per timestep of the "
                                  f"model), got shape {gamma.shape}")
    s = np.asarray(list(timesteps), dtype=np.int64)
    abar = diffusion.alphas_cumprod[s]
    abar_prev = np.append(1.0, abar[:-1])
    a = abar / abar_prev
    if lam2 is None:
        lam2 = (1.0 - a) * (1.0 - abar_prev) / (1.0 - abar)  # beta~ of the respaced chain
    lam2 = np.asarray(lam2, dtype=np.float64)
    rest = np.sqrt(np.maximum(1.0 - abar_prev - lam2, 0.0))
    c2 = (np.sqrt((1.0 - abar) / a) - rest) ** 2
    # Theorem 2 with data in [-1, 1] ((b - a)/2 = 1): the variance of x0 given x_n is at most 1.
    data_bound = (np.sqrt(abar_prev) - rest * np.sqrt(abar / (1.0 - abar))) ** 2
    sigma2 = lam2 + c2 * (1.0 - gamma[s])
    return np.clip(sigma2, lam2, lam2 + np.minimum(c2, data_bound))


def chain_variance(chain, lam2: np.ndarray | None = None) -> np.ndarray:
    """sigma*^2 [K] for a sampler's :class:`ddpm.samplers.base.Chain` whose ``options`` hold
    ``var`` = "analytic" and ``gamma`` (the model's [T] Gamma_n)."""
    if "gamma" not in chain.options:
        raise SamplingOptionError("var='analytic' needs sampler_options['gamma'] (Gamma_n of the model, "
                                  "from ddpm.analytic.load_or_estimate or `ddpm eval analytic`)")
    return analytic_variance(chain.diffusion, chain.options["gamma"], chain.timesteps, lam2)


def check_var_option(options) -> str:
    """The ``var`` sampler option: "model" (default: the model's own variance) or "analytic"."""
    var = options.get("var", "model")
    if var not in VAR_CHOICES:
        raise SamplingOptionError(f"unknown sampler option var={var!r}; expected one of {', '.join(VAR_CHOICES)}")
    return var


# ---------------------------------------------------------------------------------------------- the bound

@torch.inference_mode()
def bound_bpd(diffusion: GaussianDiffusion, model: Callable, x0: torch.Tensor, gamma: np.ndarray,
              timesteps: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
              clip_denoised: bool = False, amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The variational bound (Ho et al. Eq. 5) in bits/dim on the chain through ``timesteps``
    (default all T) with three reverse variances: ``analytic`` (sigma*^2 of every KL term and of
    the decoder), ``fixedlarge`` (beta, beta~_2 at the decoder) and ``fixedsmall`` (beta~), all
    from the same x_{s_k} and network outputs, so their differences are paired.

    The decoder (k = 0) is the discretized Gaussian of Eq. 13 with sigma*_0^2 floored at the
    fixed variances' own decoder value beta~ of the second kept step (beta~_0 = 0 would make the
    decoder a point mass; Bao et al. also clip the last step's variance).

    Args:
        x0: [B, C, H, W] on the 256-level grid in [-1, 1]. seeds: one per image (image k's noise
            is ``ImageNoise(seeds[k])``, one draw per kept step, descending), default range(B).
        clip_denoised: clamp x0_hat in the means (the official bound does not).
    Returns: dict name -> total bits/dim [B] float64 (``analytic``, ``fixedlarge``, ``fixedsmall``).
    """
    T = diffusion.num_timesteps
    kept = list(range(T)) if timesteps is None else sorted(int(s) for s in timesteps)
    if kept == list(range(T)):
        spaced = diffusion
    else:
        from .respacing import respace
        spaced = respace(diffusion, kept)[0]
    B, K = x0.shape[0], len(kept)
    seeds = list(range(B)) if seeds is None else list(seeds)
    noise = ImageNoise(seeds, x0.shape[1:], x0.device, x0.dtype)
    floor = float(np.exp(spaced.posterior_log_variance_clipped[0]))
    sig = analytic_variance(diffusion, gamma, kept)
    sig[0] = max(sig[0], floor)
    variances = {"analytic": sig, "fixedlarge": spaced.fixedlarge_variance,
                 "fixedsmall": np.exp(spaced.posterior_log_variance_clipped)}
    totals = {n: torch.zeros(B, dtype=torch.float64, device=x0.device) for n in variances}
    coefs = spaced.coef_table(x0.device, x0.dtype)
    for k in range(K - 1, -1, -1):
        t_net = torch.full((B,), kept[k], dtype=torch.int64, device=x0.device)
        tk = torch.full((B,), k, dtype=torch.int64, device=x0.device)
        xt = diffusion.q_sample(x0, t_net, noise=noise.next())  # x_{s_k}: the same marginal on both chains
        out = call_model(model, xt, t_net, amp_dtype)
        spaced.check_output(out, xt)
        mean = spaced.mean_variance_from_output(out, xt, coefs.at(k), clip_denoised)[0]
        true_mean, _, true_log_var = spaced.q_posterior_mean_variance(x0, xt, tk)
        for name, v in variances.items():
            log_v = torch.tensor(math.log(float(v[k])), dtype=x0.dtype, device=x0.device)
            if k == 0:
                term = -meanflat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_v.expand_as(x0)))
            else:
                term = meanflat(normal_kl(true_mean, true_log_var, mean, log_v))
            totals[name] += term.double() / LN2
    prior = spaced.prior_bpd(x0).double()
    return {n: v + prior for n, v in totals.items()}


# ---------------------------------------------------------------------------------------------- storage

def _key(meta: dict, file: Path, T: int) -> dict[str, Any]:
    return {"checkpoint": file.name, "sha256": meta.get("sha256"), "step": meta.get("step"), "T": int(T)}


def gamma_path(run: str | Path) -> Path:
    """Where Gamma_n of a run folder (or of a checkpoint file's folder) is kept."""
    run = Path(run)
    return (run if run.is_dir() else run.parent) / GAMMA_FILE


def read_gamma(path: Path, key: dict[str, Any]) -> np.ndarray | None:
    """The stored Gamma_n if ``path`` holds an entry for ``key`` (checkpoint digest and T), else None."""
    import json

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable Analytic-DPM statistics ({e}); delete it to re-estimate") from None
    for entry in data.get("entries", []):
        if all(entry.get(k) == v for k, v in key.items()):
            return np.asarray(entry["gamma"], dtype=np.float64)
    return None


def write_gamma(path: Path, key: dict[str, Any], est: dict[str, Any]) -> None:
    """Add (or replace) the entry for ``key`` in ``path``, atomically; other checkpoints' entries stay."""
    import json

    from .atomic import atomic_write_json

    entries = []
    if path.exists():
        try:
            entries = [e for e in json.loads(path.read_text()).get("entries", [])
                       if not all(e.get(k) == v for k, v in key.items())]
        except (OSError, ValueError):
            entries = []
    entries.append({**key, "n": est["n"], "seed": est["seed"],
                    "gamma": [float(g) for g in est["gamma"]], "stderr": [float(s) for s in est["stderr"]]})
    atomic_write_json(path, {"what": "Gamma_n = E||eps_theta(x_n, n)||^2/d (Analytic-DPM, Bao et al. 2022), "
                                     "mean over n training images, one noise draw each; stderr = std/sqrt(n)",
                             "entries": entries})


def load_or_estimate(ckpt: str | Path, model: Callable, diffusion: GaussianDiffusion, cfg, meta: dict,
                     device, n: int = 500, batch_size: int = 250, seed: int = 0, force: bool = False,
                     progress: bool = True, log: Callable[[str], Any] | None = print,
                     source: str | None = None) -> np.ndarray:
    """Gamma_n [T] of the checkpoint ``ckpt`` (file or run folder): read from
    ``RUN/checkpoints/analytic_var.json`` if stored for this checkpoint's digest and T, else estimated over the
    first ``n`` training images of ``source`` (default: the run's dataset) and stored (with a
    message saying so)."""
    from .checkpoint import resolve_checkpoint
    from .data import load_images
    from .images import to_model

    file = resolve_checkpoint(ckpt)
    path = gamma_path(file)
    key = _key(meta, file, diffusion.num_timesteps)
    gamma = None if force else read_gamma(path, key)
    if gamma is not None:
        return gamma
    images = load_images(source or cfg.data.source, "train", cfg.model.resolution, cfg.model.in_channels, n=n)
    if log is not None:
        log(f"estimating the Analytic-DPM statistic Gamma_n over {len(images)} training images "
            f"({diffusion.num_timesteps} network calls per batch); it is stored in {path}")
    est = estimate_gamma(diffusion, model, to_model(images, device), batch_size=batch_size, seed=seed,
                         progress=progress)
    write_gamma(path, key, est)
    return est["gamma"]


def evaluate_bound(diffusion: GaussianDiffusion, model: Callable, gamma: np.ndarray, images_u8: np.ndarray, *,
                   steps: int | None = None, batch_size: int = 64, seed: int = 0, device="cpu",
                   amp_dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`bound_bpd` over uint8 NHWC images in batches (image k uses seed ``seed + k``).

    Returns: a JSON-able dict: ``n``, ``steps`` (K), ``timesteps``, per variance its mean
    ``total_bpd`` and ``stderr`` (std/sqrt(n)), and ``paired``: the mean per-image difference
    analytic - fixed (and its standard error) for both fixed variances.
    """
    from .images import to_model
    from .respacing import space_timesteps

    T = diffusion.num_timesteps
    kept = list(range(T)) if steps is None else space_timesteps(T, steps, "trailing")
    per: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(images_u8), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts), desc=f"bound ({len(kept)} steps)")
    for lo in starts:
        x0 = to_model(images_u8[lo:lo + batch_size], device)
        r = bound_bpd(diffusion, model, x0, gamma, kept, seeds=range(seed + lo, seed + lo + x0.shape[0]),
                      amp_dtype=amp_dtype)
        for k, v in r.items():
            per.setdefault(k, []).append(v.cpu().numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    per = {k: np.concatenate(v) for k, v in per.items()}
    n = len(per["analytic"])

    def stat(a: np.ndarray) -> dict[str, float]:
        return {"mean": float(a.mean()), "stderr": float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}

    return {"n": n, "steps": len(kept), "timesteps": kept,
            **{k: {"total_bpd": stat(v)["mean"], "stderr": stat(v)["stderr"]} for k, v in per.items()},
            "paired": {f"analytic - {f}": stat(per["analytic"] - per[f]) for f in ("fixedlarge", "fixedsmall")}}


def command_estimate(args) -> None:
    """``ddpm eval analytic``: (re-)estimate Gamma_n over ``--n`` training images and store it."""
    from .api import load
    from .checkpoint import resolve_checkpoint
    from .cliutil import device as _device

    dev = _device(args.device)
    model, diffusion, cfg, meta = load(args.ckpt, device=dev)
    gamma = load_or_estimate(args.ckpt, model, diffusion, cfg, meta, dev, n=args.n, batch_size=args.batch_size,
                             seed=args.seed, force=True, source=args.data)
    print(f"Gamma_n over {args.n} training images: min {gamma.min():.4f}, max {gamma.max():.4f}; "
          f"wrote {gamma_path(resolve_checkpoint(args.ckpt))}")


def command_nll(args) -> None:
    """``ddpm eval nll --var analytic [--steps K]``: the paired bound with the three variances."""
    from .api import load
    from .atomic import atomic_write_json
    from .cliutil import amp_dtype as _amp, check_suffix as _check_suffix, device as _device
    from .data import load_images

    out = _check_suffix(args.out, ".json", "--out")
    dev = _device(args.device)
    model, diffusion, cfg, meta = load(args.ckpt, device=dev)
    T = diffusion.num_timesteps
    if args.steps is not None and not 2 <= args.steps <= T:
        raise SamplingOptionError(f"--steps {args.steps}: expected 2..{T}")
    src = args.data or cfg.data.source
    images = load_images(src, args.split, cfg.model.resolution, cfg.model.in_channels, n=args.n)
    gamma = load_or_estimate(args.ckpt, model, diffusion, cfg, meta, dev, progress=not args.no_progress,
                             source=args.data)
    res = evaluate_bound(diffusion, model, gamma, images, steps=args.steps, batch_size=args.batch_size,
                         seed=args.seed, device=dev, amp_dtype=_amp(args.precision), progress=not args.no_progress)
    res["data"] = f"{src} ({args.split})"
    atomic_write_json(out, res)
    p = res["paired"]
    print(f"bits/dim on {src} ({args.split}, {res['n']} images), {res['steps']}-step chain: "
          + "  ".join(f"{k} {res[k]['total_bpd']:.4f} ± {res[k]['stderr']:.4f}"
                      for k in ("analytic", "fixedlarge", "fixedsmall")))
    print("  paired: " + "  ".join(f"{k} {v['mean']:+.4f} ± {v['stderr']:.4f}" for k, v in p.items()))
    print(f"wrote {out}")
