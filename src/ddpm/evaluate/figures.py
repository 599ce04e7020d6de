"""PNG figures of the paper from sampler outputs (Fig. 6 progressive x̂0, Fig. 7 shared-latent
chains, Fig. 8/9 interpolations).

Inputs are float tensors in [-1, 1] (NCHW, as the samplers return them); they are quantised
with :func:`ddpm.images.to_uint8` and tiled with :func:`ddpm.images.make_grid` (1-pixel white
padding). A grid of R rows and K columns of HxW images, enlarged ``scale`` times, is
``scale·(R·(H+1)+1)`` pixels high and ``scale·(K·(W+1)+1)`` wide.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ddpm.images import save_grid, to_uint8


def _u8(x) -> np.ndarray:
    """float [..., C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (leading dims flattened)."""
    t = torch.as_tensor(x)
    if t.ndim < 3:
        raise ValueError(f"expected images [..., C, H, W], got shape {tuple(t.shape)}")
    return to_uint8(t.reshape(-1, *t.shape[-3:]))


def save_progressive(xstart, ts: Sequence[int], path: str | os.PathLike, scale: int = 1) -> None:
    """Fig. 6: x̂0 predicted along the reverse process.

    Args:
        xstart: float [N, S, C, H, W] in [-1, 1]; ``xstart[n, s]`` is x̂0 of image n at timestep ts[s].
        ts: the S (0-based) timesteps of the snapshots.
        path: PNG file. Rows = images, columns = snapshots from the noisiest (largest t) on the
            left to the final sample on the right, whatever order ``ts`` is in.
    """
    x = torch.as_tensor(xstart)
    if x.ndim != 5 or x.shape[1] != len(ts):
        raise ValueError(f"expected xstart [N, S={len(ts)}, C, H, W], got {tuple(x.shape)}")
    order = np.argsort(-np.asarray(ts), kind="stable")
    x = x[:, torch.as_tensor(order)]
    save_grid(_u8(x), path, nrow=x.shape[1], scale=scale)


def save_chains(out, split_steps: Sequence[int], path: str | os.PathLike, scale: int = 1) -> None:
    """Fig. 7: samples that share the reverse chain up to a split point.

    Args:
        out: float [K, n, C, H, W]; ``out[k]`` are n samples sharing their latents up to
            ``split_steps[k]`` reverse steps.
        split_steps: the K split points (rows, in the given order).
        path: PNG file; row k shows the n samples of split k.
    """
    x = torch.as_tensor(out)
    if x.ndim != 5 or x.shape[0] != len(split_steps):
        raise ValueError(f"expected out [K={len(split_steps)}, n, C, H, W], got {tuple(x.shape)}")
    save_grid(_u8(x), path, nrow=x.shape[1], scale=scale)


def save_interpolation(x0_a, x0_b, interp, lambdas: Sequence[float], path: str | os.PathLike,
                       scale: int = 1) -> None:
    """Fig. 8/9: source image, decoded interpolations for each λ, other source image.

    Args:
        x0_a, x0_b: float [C, H, W] (or [1, C, H, W]) source images in [-1, 1].
        interp: float [L, C, H, W] decoded mixtures for the L values of ``lambdas``, or
            [R, L, C, H, W] for R rows (e.g. several diffusion depths t as in Fig. 9).
        path: PNG file; each row is x0_a, interp[..., 0], ..., interp[..., L-1], x0_b.
    """
    x = torch.as_tensor(interp)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != len(lambdas):
        raise ValueError(f"expected interp [L={len(lambdas)}, C, H, W] or [R, L, C, H, W], got {tuple(x.shape)}")
    a = torch.as_tensor(x0_a).reshape(1, 1, *x.shape[-3:]).to(x.dtype)
    b = torch.as_tensor(x0_b).reshape(1, 1, *x.shape[-3:]).to(x.dtype)
    r = x.shape[0]
    rows = torch.cat([a.expand(r, -1, -1, -1, -1), x, b.expand(r, -1, -1, -1, -1)], dim=1)
    save_grid(_u8(rows), path, nrow=rows.shape[1], scale=scale)


def save_labelled_grid(images, path: str | os.PathLike, row_labels: Sequence[str] | None = None,
                       col_labels: Sequence[str] | None = None, title: str | None = None,
                       cell_inches: float = 0.9) -> None:
    """A grid with text labels (matplotlib, Agg), e.g. timesteps over the columns of Fig. 6.

    Args:
        images: float [R, K, C, H, W] in [-1, 1].
        row_labels / col_labels: R / K strings (optional).
    """
    from matplotlib.figure import Figure

    x = torch.as_tensor(images)
    if x.ndim != 5:
        raise ValueError(f"expected images [R, K, C, H, W], got {tuple(x.shape)}")
    r, k = x.shape[:2]
    u8 = _u8(x)
    u8 = u8.reshape(r, k, *u8.shape[1:])
    fig = Figure(figsize=(cell_inches * k + 0.8, cell_inches * r + 0.6), dpi=100)
    axes = np.asarray(fig.subplots(r, k, squeeze=False))
    for i in range(r):
        for j in range(k):
            ax = axes[i, j]
            img = u8[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_labels is not None:
                ax.set_title(str(col_labels[j]), fontsize=8)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    from ddpm.atomic import atomic_save_figure

    atomic_save_figure(path, fig)


__all__ = ["save_progressive", "save_chains", "save_interpolation", "save_labelled_grid"]
