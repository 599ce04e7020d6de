"""Rate–distortion of progressive lossy decompression (paper section 4.3, Fig. 5, Table 4).

Everything comes from one bits/dim run (:class:`ddpm.evaluate.nll.NLLResult`): the dataset
means of the VLB terms and of the x̂0 mean-squared error, per timestep.

Indexing (paper time t = 1..T, 0-based array index i = t-1, as everywhere in the package):

- ``terms[i]`` for i >= 1 is the paper's L_i = KL(q(x_i | x_{i+1}, x0) ‖ p(x_i | x_{i+1})): the
  cost of sending x_i to a receiver that already holds x_{i+1}; ``terms[0]`` is L0 (decoder).
- The receiver holds x_t after the prior L_T (sending x_T) and L_{T-1}, ..., L_t, so
  **rate(t) = prior + Σ_{i=t}^{T-1} terms[i]** bits/dim, after **T - t + 1 reverse steps**.
  rate(T) = prior; rate(1) = total - L0 (the "rate" of the paper's 1.78 + 1.97 = 3.75 split).
- ``mse[i]`` is the MSE of the (clipped) x̂0 predicted from x_{i+1} on the [-1, 1] scale, so
  **distortion(t) = 127.5·sqrt(mse[t-1])**, an RMSE on the 0..255 scale.

The paper does not say whether the RMSE is per-image averaged or from the dataset-mean MSE
(docs/DEVIATIONS.md); we use the dataset-mean MSE (the root of the mean squared error over all pixels of
all images, i.e. ``sqrt(‖x0 - x̂0‖²/D)`` with D counting every pixel of the set).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np


def rate_distortion(result) -> list[dict]:
    """Rows for t = T, T-1, ..., 1, i.e. reverse steps 1..T.

    Args:
        result: an ``NLLResult`` (uses ``prior_bpd``, ``terms_bpd`` [T] and ``mse`` [T], means
            over the dataset).
    Returns:
        list of T dicts ``{"reverse_steps": T-t+1, "t": t, "rate_bpd": ..., "distortion_rmse": ...}``
        in reverse-process order (rate non-decreasing, ending at total - L0).
    """
    terms = np.asarray(result.terms_bpd, np.float64)
    mse = np.asarray(result.mse, np.float64)
    T = terms.shape[0]
    if mse.shape != (T,):
        raise ValueError(f"terms_bpd and mse must both have shape [T], got {terms.shape} and {mse.shape}")
    # tail[i] = Σ_{j=i}^{T-1} terms[j]; tail[T] = 0.
    tail = np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])
    rows = []
    for t in range(T, 0, -1):
        rows.append({
            "reverse_steps": T - t + 1,
            "t": t,
            "rate_bpd": float(result.prior_bpd + tail[t]),
            "distortion_rmse": float(127.5 * np.sqrt(max(mse[t - 1], 0.0))),
        })
    return rows


def select_rows(rows: Sequence[dict], every: int = 100) -> list[dict]:
    """Rows whose reverse-step count is a multiple of ``every``, largest first (Table 4's layout)."""
    return [r for r in sorted(rows, key=lambda r: -r["reverse_steps"]) if r["reverse_steps"] % every == 0]


def format_table(rows: Sequence[dict], every: int = 100) -> str:
    """Markdown table like the paper's Table 4 (reverse steps, rate, distortion)."""
    lines = ["| Reverse process time (T-t+1) | Rate (bits/dim) | Distortion (RMSE, 0-255) |", "|---|---|---|"]
    for r in select_rows(rows, every):
        lines.append(f"| {r['reverse_steps']} | {r['rate_bpd']:.5f} | {r['distortion_rmse']:.5f} |")
    return "\n".join(lines)


def save_rd(rows: Sequence[dict], json_path: str | os.PathLike | None = None,
            csv_path: str | os.PathLike | None = None) -> None:
    """Write the rows as JSON (a list of objects) and/or CSV (header + one line per row), each atomically."""
    from ..atomic import atomic_write_json, atomic_write_text

    if json_path is not None:
        atomic_write_json(json_path, list(rows), indent=1)
    if csv_path is not None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=["reverse_steps", "t", "rate_bpd", "distortion_rmse"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames})
        atomic_write_text(csv_path, buf.getvalue())


def plot_rd(rows: Sequence[dict], png_path: str | os.PathLike, title: str | None = None) -> None:
    """The three panels of the paper's Fig. 5: distortion vs reverse steps, rate vs reverse
    steps, distortion vs rate. Written as a PNG (matplotlib, Agg)."""
    # A bare Figure renders with Agg and never touches pyplot's global backend state.
    from matplotlib.figure import Figure

    steps = np.array([r["reverse_steps"] for r in rows])
    rate = np.array([r["rate_bpd"] for r in rows])
    dist = np.array([r["distortion_rmse"] for r in rows])
    fig = Figure(figsize=(12, 3.6), dpi=100)
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, dist)
    axes[0].set(xlabel="Reverse process steps (T - t + 1)", ylabel="Distortion (RMSE [0, 255])")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="Reverse process steps (T - t + 1)", ylabel="Rate (bits/dim)")
    axes[2].plot(rate, dist)
    axes[2].set(xlabel="Rate (bits/dim)", ylabel="Distortion (RMSE [0, 255])")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from ..atomic import atomic_save_figure

    atomic_save_figure(png_path, fig)
