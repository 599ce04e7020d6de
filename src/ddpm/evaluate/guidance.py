"""The fidelity-diversity trade-off of classifier-free guidance, measured on the digits.

For each guidance weight W (eps = eps_uncond + W (eps_cond - eps_uncond); W = 1 plain
conditional, W = 0 unconditional; Ho & Salimans 2022 write w = W - 1) a class-conditional digits
model draws N balanced samples (image k asks for class k mod 10, seed SEED + k, the same seeds
at every W), and the digits classifier of :mod:`ddpm.evaluate.digits_quality` scores them:

- ``agreement``: the fraction classified as the requested class (fidelity to the label);
- ``fd``: the Fréchet distance of its features to the real test digits (sample quality and
  diversity: too little diversity raises it too).

``ddpm eval guidance --ckpt RUN --guidance 0,1,2,3,5`` writes the table as JSON and CSV and the
two curves against W as a PNG, each atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["sample_labelled", "guidance_sweep", "save_guidance", "parse_weights"]

COLUMNS = ("guidance", "agreement", "fd", "confidence", "balance", "n")


def parse_weights(text: str, option: str = "--guidance") -> list[float]:
    """"0,1,2.5" -> [0.0, 1.0, 2.5]; each a finite number >= 0 (ConfigError naming ``option``)."""
    out = []
    for part in str(text).split(","):
        try:
            w = float(part)
        except ValueError:
            w = float("nan")
        if not (np.isfinite(w) and w >= 0):
            raise ConfigError(f"{option} {text!r}: expected comma-separated guidance weights >= 0, e.g. 0,1,2,3,5")
        out.append(w)
    return out


def sample_labelled(model, diffusion, cfg, n: int, weight: float, *, seed: int = 0, batch_size: int = 500,
                    device="cpu", amp_dtype=None, sampler: str = "ancestral", steps: Optional[int] = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` balanced guided samples: (uint8 [n, H, W, C], int64 [n] requested labels k mod C)."""
    from ..conditioning import guided_call
    from ..images import to_uint8
    from ..sampling import sample

    C = int(cfg.model.num_classes)
    labels = np.arange(n, dtype=np.int64) % C
    kwargs, guidance = guided_call(labels, weight, C)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    x = sample(diffusion, model, shape, list(range(seed, seed + n)), batch_size=batch_size, device=device,
               sampler=sampler, steps=steps, amp_dtype=amp_dtype, progress=progress, model_kwargs=kwargs,
               guidance=guidance)
    return to_uint8(x), labels


def check_digits_model(cfg, what: str) -> None:
    """The sweep scores samples with the digits classifier: a 10-class 8x8 model is required."""
    if cfg.model.num_classes != 10 or cfg.model.resolution != 8:
        raise ConfigError(f"{what}: ddpm eval guidance scores samples with the digits classifier and needs a "
                          f"class-conditional 8x8 digits model (model.num_classes=10, model.resolution=8); this one "
                          f"has num_classes={cfg.model.num_classes}, resolution={cfg.model.resolution}")


def guidance_sweep(model, diffusion, cfg, weights: Sequence[float], n: int = 500, *, seed: int = 0,
                   batch_size: int = 500, device="cpu", amp_dtype=None, sampler: str = "ancestral",
                   steps: Optional[int] = None, cache_dir: str | os.PathLike | None = None,
                   log: Optional[Callable[[str], Any]] = None, progress: bool = False) -> list[dict[str, Any]]:
    """One row per W: ``guidance``, ``agreement``, ``fd``, ``confidence``, ``balance``, ``n``,
    ``agreement_per_class`` (see the module doc)."""
    from .digits_quality import digits_quality

    check_digits_model(cfg, "model")
    rows = []
    for w in weights:
        images, labels = sample_labelled(model, diffusion, cfg, n, float(w), seed=seed, batch_size=batch_size,
                                         device=device, amp_dtype=amp_dtype, sampler=sampler, steps=steps,
                                         progress=progress)
        q = digits_quality(images, cache_dir, labels=labels)
        row = {"guidance": float(w), **{k: q[k] for k in COLUMNS[1:]}, "agreement_per_class": q["agreement_per_class"]}
        rows.append(row)
        if log is not None:
            log(f"W={w:g}: agreement {row['agreement']:.3f}, Fréchet distance {row['fd']:.3f}")
    return rows


def save_guidance(rows: Sequence[dict], json_path: str | os.PathLike, meta: Optional[dict] = None
                  ) -> tuple[Path, Path, Path]:
    """Write ``json_path`` ({"meta", "rows"}), the same stem's .csv (COLUMNS) and .png (agreement
    and Fréchet distance against W), each atomically. Returns the three paths."""
    from matplotlib.figure import Figure

    from ..atomic import atomic_save_figure, atomic_write_json, atomic_write_text

    json_path = Path(json_path)
    csv_path, png_path = json_path.with_suffix(".csv"), json_path.with_suffix(".png")
    lines = [",".join(COLUMNS)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in COLUMNS)
                                   for r in rows]
    w = np.array([r["guidance"] for r in rows])
    fig = Figure(figsize=(5.0, 3.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(w, [r["agreement"] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("guidance weight W (1 = conditional, 0 = unconditional)")
    ax.set_ylabel("classifier agreement", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(w, [r["fd"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("Fréchet distance (digits features)", color="tab:red")
    ax.set_title("classifier-free guidance: fidelity vs diversity")
    fig.tight_layout()
    atomic_write_json(json_path, {"meta": dict(meta or {}), "rows": list(rows)})
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    atomic_save_figure(png_path, fig)
    return json_path, csv_path, png_path
