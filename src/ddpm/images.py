"""The one place where images change representation.

Outside the model, images are ``uint8`` arrays in NHWC layout (0..255). Inside, they are
``float32`` tensors in NCHW layout scaled to [-1, 1] by ``x / 127.5 - 1`` (the official code's
normalisation, paper section 3.3 and Appendix B). ``to_uint8`` is its exact inverse on the 256 bin centres:
it clips to [-1, 1] and rounds to the nearest integer, so ``to_uint8(to_model(u)) == u``.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [N, H, W, C] (0..255) -> float32 [N, C, H, W] in [-1, 1]."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"expected images of shape [N, H, W, C], got {tuple(t.shape)}")
    t = t.to(device) if device is not None else t
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] numpy array (clip, round)."""
    if x.ndim != 4:
        raise ValueError(f"expected a tensor of shape [N, C, H, W], got {tuple(x.shape)}")
    u = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one uint8 [H', W', C] grid, ``nrow`` images per row.

    ``nrow`` defaults to ceil(sqrt(N)). Empty cells and the padding are ``pad_value``.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol_rows = int(np.ceil(n / nrow))
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def grid_scale(resolution: int) -> int:
    """The nearest-neighbour enlargement that makes a grid of ``resolution``-pixel images viewable
    (8x8 digits: x8; 64x64 and larger: x1)."""
    return max(1, 64 // int(resolution))


def save_grid(images: np.ndarray, path, nrow: int | None = None, scale: int = 1) -> None:
    """Save uint8 [N, H, W, C] images as one PNG grid, atomically; ``scale`` enlarges small images (nearest)."""
    from PIL import Image

    from .atomic import atomic_save_image

    grid = make_grid(images, nrow=nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    mode = "L" if grid.shape[2] == 1 else ("RGBA" if grid.shape[2] == 4 else "RGB")
    atomic_save_image(path, Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode))
