"""Sample quality against the number of network calls (NFE), per sampler: ``ddpm eval steps``.

For every sampler, spacing, clipping choice and NFE budget, the same seeds are sampled with the
largest step count whose network calls fit the budget, scored by ``quality`` (the digits
Fréchet distance of :mod:`ddpm.evaluate.digits_quality`, or FID through the ``fid`` extra) and
timed. :func:`save_steps` writes steps.json, steps.csv and steps.png (quality against NFE, one
line per sampler setting, log-scaled NFE axis), each atomically.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import SamplingOptionError

COLUMNS = ("sampler", "full", "spacing", "spacing_used", "clip", "var", "nfe", "steps", "quality", "metric",
           "seconds_per_image", "n")


def steps_for_nfe(diffusion, sampler: str, nfe: int, spacing: str = "auto", clip: bool = True,
                  eta: float = 0.0, options: Mapping[str, Any] | None = None) -> int:
    """The largest step count K whose chain costs at most ``nfe`` network calls per image with
    ``sampler`` (K = NFE for one-call-per-step samplers; fewer for multi-call steps)."""
    from .. import samplers
    from ..autospacing import resolve_spacing
    from ..sampling import make_chain

    spacing = resolve_spacing(spacing, sampler, nfe)
    cls = samplers.get(sampler)
    T = diffusion.num_timesteps
    for k in range(min(int(nfe), T), 1, -1):
        unit = cls(make_chain(diffusion, "cpu", k, spacing, clip, eta, options))
        if unit.nfe <= nfe:
            return k
    raise SamplingOptionError(f"sampler {sampler!r} cannot run in {nfe} network calls (needs a chain of >= 2 steps)")


def run_steps(diffusion, model, shape: Sequence[int], quality: Callable[[np.ndarray], tuple[float, str]], *,
              samplers: Sequence[str], nfes: Sequence[int], n: int, spacings: Sequence[str] = ("auto",),
              clips: Sequence[bool] = (True,), seed: int = 0, batch_size: int = 250, device="cpu",
              eta: float = 0.0, var: str = "model", gamma: np.ndarray | None = None, full_chain: bool = False,
              amp_dtype=None, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (sampler, spacing, clip, NFE); image k uses seed ``seed + k`` in every row.

    Args:
        quality: uint8 NHWC samples -> (score, metric name[, dict of further numbers for the row]),
            lower is better.
        var: "analytic" applies Analytic-DPM's variance (``gamma``: Gamma_n [T]) to ancestral and ddim.
        full_chain: add the T-step ancestral chain (Algorithm 2) as the reference row.
    Returns: rows with the keys of :data:`COLUMNS` (seconds_per_image: the sampling wall time / n;
        spacing_used: the concrete spacing ``auto`` resolved to, else the spacing itself).
    """
    from .. import samplers as registry
    from ..autospacing import resolve_spacing
    from ..images import to_uint8
    from ..sampling import make_chain, sample

    for name in samplers:
        registry.get(name)  # unknown names fail before any sampling
    jobs = []
    if full_chain:
        jobs.append(("ancestral", "trailing", True, None))
    for name in samplers:
        for spacing in spacings:
            for clip in clips:
                for nfe in nfes:
                    jobs.append((name, spacing, clip, int(nfe)))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="eval steps")
    rows = []
    for name, spacing, clip, nfe in jobs:
        use_var = var if name in ("ancestral", "ddim") else "model"
        options = {"var": "analytic", "gamma": gamma} if use_var == "analytic" else None
        # auto is resolved here, on the budget (network calls), and the concrete spacing is sampled
        used = "trailing" if nfe is None else resolve_spacing(spacing, name, nfe)
        steps = None if nfe is None else steps_for_nfe(diffusion, name, nfe, used, clip, eta, options)
        # sample() counts network calls, steps_for_nfe kept timesteps: they differ for pndm (one extra call)
        calls = None if steps is None else registry.get(name)(make_chain(diffusion, "cpu", steps, used, clip, eta,
                                                                         options)).nfe
        t0 = time.perf_counter()
        x = sample(diffusion, model, shape, range(seed, seed + n), batch_size=batch_size, device=device,
                   sampler=name, steps=calls, spacing=used, eta=eta, clip_denoised=clip, amp_dtype=amp_dtype,
                   sampler_options=options)
        secs = time.perf_counter() - t0
        score, metric, *extra = quality(to_uint8(x))
        rows.append({"sampler": name, "full": nfe is None, "spacing": spacing, "spacing_used": used,
                     "clip": bool(clip), "var": use_var,
                     "nfe": diffusion.num_timesteps if nfe is None else nfe,
                     "steps": diffusion.num_timesteps if steps is None else steps, "quality": float(score),
                     "metric": metric, "seconds_per_image": secs / n, "n": int(n), **(extra[0] if extra else {})})
        if bar is not None:
            bar.set_postfix_str(f"{name} {nfe or 'full'}: {metric} {score:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _label(row: Mapping[str, Any]) -> str:
    if row["full"]:
        return f"ancestral, full {row['nfe']}-step chain"
    if row["sampler"] == "distilled":
        eta = row.get("eta") or 0
        return "distilled student (DDIM" + (f" eta {eta:g})" if eta else ")")
    if row["sampler"] == "distilled-stochastic":
        return "distilled student (stochastic)"
    extra = [row["spacing"], "clip" if row["clip"] else "no clip"]
    if row["var"] == "analytic":
        extra.append("analytic var")
    return f"{row['sampler']} ({', '.join(extra)})"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: one line per row."""
    lines = [f"{'sampler':<34} {'NFE':>5} {'steps':>5} {'quality':>9} {'s/image':>9}"]
    for r in rows:
        lines.append(f"{_label(r):<34} {r['nfe']:>5} {r['steps']:>5} {r['quality']:>9.3f} "
                     f"{r['seconds_per_image']:>9.4f}")
    return "\n".join(lines)


def save_steps(rows: Sequence[Mapping[str, Any]], out: str | Path,
               meta: Mapping[str, Any] | None = None) -> tuple[Path, Path, Path]:
    """Write ``out`` (.json: rows and ``meta``), its .csv and its .png (quality against NFE, log x axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_save_figure, atomic_write_json, atomic_write_text

    out = Path(out)
    csv_path, png_path = out.with_suffix(".csv"), out.with_suffix(".png")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in COLUMNS})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups: dict[str, list] = {}
    for r in rows:
        if r["full"]:  # the T-step chain: a horizontal reference line
            ax.axhline(r["quality"], color="k", ls="--", lw=1, label=f"full {r['nfe']}-step ancestral")
        else:
            groups.setdefault(_label(r), []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rs], [r["quality"] for r in rs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("network calls per image (NFE)")
    metric = rows[0]["metric"] if rows else "quality"
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_json(out, {"meta": dict(meta or {}), "rows": [dict(r) for r in rows]})
    atomic_write_text(csv_path, buf.getvalue())
    atomic_save_figure(png_path, fig, dpi=120)
    plt.close(fig)
    return out, csv_path, png_path


def parse_names(text: str) -> list[str]:
    """``a,b,c`` -> the registered sampler names, checked; an unknown one is a one-line error."""
    from .. import samplers as registry

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SamplingOptionError(f"--samplers: expected a comma-separated list of {', '.join(registry.names())}")
    for s in names:
        registry.get(s)
    return names


def parse_ints(text: str, option: str) -> list[int]:
    """``5,10,20`` -> [5, 10, 20] (each >= 2); a one-line error otherwise."""
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 2:
        raise SamplingOptionError(f"{option}: expected comma-separated integers >= 2, got {text!r}")
    return vals


def digits_quality_fn(cache_dir=None) -> Callable[[np.ndarray], tuple[float, str]]:
    from .digits_quality import digits_quality

    return lambda u8: (digits_quality(u8, cache_dir)["fd"], "digits FD")


def fid_quality_fn(ref: str, split: str, device, inception_weights=None, cache_dir=None):
    from .fid import compute_fid

    def quality(u8):
        r = compute_fid(u8, ref, split=split, cache_dir=cache_dir, inception_weights=inception_weights, device=device)
        return r["fid"], "FID", {"kid_mean": r["kid_mean"], "kid_std": r["kid_std"], "is_mean": r["is_mean"]}

    return quality


def command(args) -> None:
    """``ddpm eval steps``: parse the lists, sample every point, score, write steps.json/.csv/.png."""
    from ..api import load
    from ..cliutil import amp_dtype as _amp, check_suffix as _check_suffix, device as _device

    out = _check_suffix(args.out, ".json", "--out")
    names = parse_names(args.samplers)
    nfes = parse_ints(args.nfe, "--nfe")
    from ..respacing import check_spacing

    spacings = [check_spacing(s.strip()) for s in args.spacing.split(",") if s.strip()]
    clips = {"on": [True], "off": [False], "both": [True, False]}[args.clip]
    dev = _device(args.device)
    from ..distill.evaluate import student_rows, teacher_path

    # a distillation run: the solvers sample its teacher, its students add their own rows
    model, diffusion, cfg, meta = load(teacher_path(args.ckpt), device=dev)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    if args.ref is not None:
        quality = fid_quality_fn(args.ref, args.split, dev, args.inception_weights)
    elif cfg.data.source == "digits":
        quality = digits_quality_fn()
    else:
        raise SamplingOptionError(f"--ref is required for a {cfg.data.source!r} model (the digits measure only "
                                  f"judges 8x8 digits); e.g. --ref cifar10:train with the fid extra")
    gamma = None
    if args.var == "analytic":
        from ..analytic import load_or_estimate

        gamma = load_or_estimate(args.ckpt, model, diffusion, cfg, meta, dev, progress=not args.no_progress)
    rows = run_steps(diffusion, model, shape, quality, samplers=names, nfes=nfes, n=args.n, spacings=spacings,
                     clips=clips, seed=args.seed, batch_size=args.batch_size, device=dev, eta=args.eta, var=args.var,
                     gamma=gamma, full_chain=args.full, amp_dtype=_amp(args.precision),
                     progress=not args.no_progress)
    rows += student_rows(args.ckpt, quality, n=args.n, seed=args.seed, batch_size=args.batch_size, device=dev,
                         max_nfe=max(nfes), amp_dtype=_amp(args.precision), eta=args.eta)
    meta_out = {"ckpt": str(args.ckpt), "step": meta.get("step"), "n": args.n, "seed": args.seed, "eta": args.eta}
    paths = save_steps(rows, out, meta_out)
    print(format_table(rows))
    print("wrote " + ", ".join(str(p) for p in paths))
