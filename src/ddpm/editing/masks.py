"""Inpainting masks: named regions, seeded random pixel masks, mask files, and their checks.

Convention at the user boundary (as diffusers' inpainting pipelines): **1 / white = generate,
0 / black = keep**. RePaint (Lugmayr et al., CVPR 2022, Eq. 8) writes the opposite, m = 1 on
the known pixels; :func:`ddpm.editing.inpaint.inpaint` turns one into the other internally.

Everything here is numpy (no torch): a mask is float32 [N, 1, H, W] with values 0 or 1, one
per image, the same for every channel. Bad masks raise :class:`ddpm.errors.DataError` (files)
or :class:`ddpm.errors.ConfigError` (a mistyped region) with a one-line message naming the
mask and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError, suggest
from ..options import MASK_REGIONS as REGIONS

__all__ = ["REGIONS", "region_mask", "random_mask", "check_mask", "load_mask", "describe_spec"]

def region_mask(name: str, height: int, width: int) -> np.ndarray:
    """float32 [H, W], 1 where a named region is generated.

    ``left``/``right``: the left/right half of the columns (floor(W/2) of them); ``top``/``bottom``
    likewise for rows; ``center``: the central rectangle of half the height and width (rows
    floor(H/4) .. floor(H/4)+ceil(H/2)-1, likewise columns); ``border``: everything but that
    rectangle (1 - center).
    """
    H, W = int(height), int(width)
    m = np.zeros((H, W), dtype=np.float32)
    h2, w2 = H // 2, W // 2
    if name == "left":
        m[:, :w2] = 1
    elif name == "right":
        m[:, W - w2:] = 1
    elif name == "top":
        m[:h2, :] = 1
    elif name == "bottom":
        m[H - h2:, :] = 1
    elif name in ("center", "border"):
        r0, c0 = H // 4, W // 4
        m[r0:r0 + (H - h2), c0:c0 + (W - w2)] = 1
        if name == "border":
            m = 1 - m
    else:
        raise ConfigError(f"--mask {name!r}: unknown region; expected one of {', '.join(REGIONS)}, random:P "
                          f"or a mask file{suggest(name, REGIONS)}")
    return m


def random_mask(p: float, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
    """float32 [N, 1, H, W]: image k generates each pixel independently with probability ``p``,
    drawn from ``numpy.random.default_rng(seeds[k])`` (so image k's mask depends only on its seed).

    An image whose draw generated no pixel or every pixel gets one pixel flipped (the first),
    so every mask both keeps and generates something.
    """
    H, W = int(height), int(width)
    out = np.empty((len(seeds), 1, H, W), dtype=np.float32)
    for k, s in enumerate(seeds):
        m = (np.random.default_rng(int(s)).random((H, W)) < p).astype(np.float32)
        if m.min() == m.max():
            m.flat[0] = 1 - m.flat[0]
        out[k, 0] = m
    return out


def describe_spec(spec: str) -> tuple[str, object]:
    """Parse a ``--mask`` value: ("region", name) | ("random", P) | ("file", Path)."""
    text = str(spec).strip()
    low = text.lower()
    if low in REGIONS:
        return "region", low
    if low.startswith("random:"):
        try:
            p = float(low.split(":", 1)[1])
        except ValueError:
            p = float("nan")
        if not 0.0 < p < 1.0:
            raise ConfigError(f"--mask {spec!r}: random:P needs a fraction of pixels to generate 0 < P < 1, "
                              f"e.g. random:0.5")
        return "random", p
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise ConfigError(f"--mask {spec!r}: no such file or folder; expected a mask image, a folder of them, "
                          f"a .npz/.npy array, one of {', '.join(REGIONS)}, or random:P{suggest(low, REGIONS)}")
    return "file", path


def check_mask(mask: np.ndarray, n: int, height: int, width: int, what: str) -> np.ndarray:
    """A mask array as float32 [N, 1, H, W] of 0/1, after the user-facing checks.

    Accepts [H, W] or [1, H, W] (one mask for all N images), [N, H, W], [N, H, W, 1] or
    [N, 1, H, W]; values must be binary: {0, 1} (bool, ints or floats) or {0, 255} (uint8 images).
    Raises DataError naming ``what`` for another size, another count, non-binary values, or an
    image's mask that generates nothing (keeps everything) or generates everything (keeps nothing).
    """
    a = np.asarray(mask)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "uif":
        raise DataError(f"{what}: mask has dtype {a.dtype}; expected 0/1 or 0/255 values")
    if a.ndim == 4 and a.shape[-1] == 1 and a.shape[1] != 1:
        a = a[..., 0]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise DataError(f"{what}: mask has shape {a.shape}; expected [H, W] or [N, H, W] (one per image)")
    if a.shape[1:] != (height, width):
        raise DataError(f"{what}: mask is {a.shape[2]}x{a.shape[1]} (WxH) but the images are {width}x{height}; "
                        f"expected a mask of the images' size")
    if a.shape[0] not in (1, n):
        raise DataError(f"{what}: {a.shape[0]} masks for {n} images; expected one mask for all or one per image")
    values = np.unique(a)
    scale = 255.0 if values.max(initial=0) > 1 else 1.0
    if not set(values.tolist()) <= {0.0, scale}:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(f"{what}: mask is not binary (values {shown}); expected only 0 (keep) and "
                        f"{'255' if scale > 1 else '1'} (generate)")
    m = (a / scale).astype(np.float32)
    m = np.broadcast_to(m, (n, height, width)) if m.shape[0] == 1 else m
    gen = m.reshape(m.shape[0], -1).sum(1)
    for k in range(m.shape[0]):
        if gen[k] == 0:
            raise DataError(f"{what}: mask{_which(k, a)} generates nothing (all black/0 keeps every pixel); "
                            f"expected white/1 where pixels are to be generated")
        if gen[k] == height * width:
            raise DataError(f"{what}: mask{_which(k, a)} generates everything (all white/1 keeps no pixel); "
                            f"expected black/0 on the pixels to keep (to generate whole images use ddpm sample)")
    return np.ascontiguousarray(m[:, None])


def _which(k: int, a: np.ndarray) -> str:
    return "" if a.shape[0] == 1 else f" of image {k}"


def load_mask(spec: str, n: int, height: int, width: int, seeds: Sequence[int]) -> np.ndarray:
    """float32 [N, 1, H, W] (1 = generate) from a ``--mask`` value.

    ``spec``: a region name (:data:`REGIONS`), ``random:P`` (:func:`random_mask` with ``seeds``),
    one image file (every image), a folder of image files (one per image, sorted by name), or a
    ``.npz``/``.npy`` array ([H, W] for all, [N, H, W] one per image). Image files are read as
    greyscale; every mask goes through :func:`check_mask`.
    """
    kind, value = describe_spec(spec)
    if kind == "region":
        return check_mask(region_mask(value, height, width), n, height, width, f"--mask {value}")
    if kind == "random":
        return check_mask(random_mask(value, seeds, height, width), n, height, width, f"--mask {spec}")
    path: Path = value
    what = f"--mask {path}"
    if path.is_dir():
        from ..datasets.folder import list_images

        files = list_images(path)
        if len(files) != n:
            raise DataError(f"{what}: folder holds {len(files)} mask images for {n} images; expected one per "
                            f"image (matched in sorted order) or a single mask file for all")
        a = np.stack([_read_grey(f, height, width) for f in files])
    elif path.name.lower().endswith((".npz", ".npy")):
        a = _read_array(path)
    else:
        a = _read_grey(path, height, width)
    return check_mask(a, n, height, width, what)


def _read_grey(path: Path, height: int, width: int) -> np.ndarray:
    from ..datasets.imageops import decode_native

    im = decode_native(path, 1)[..., 0]
    if im.shape != (height, width):
        raise DataError(f"--mask {path}: mask is {im.shape[1]}x{im.shape[0]} (WxH) but the images are "
                        f"{width}x{height}; expected a mask of the images' size")
    return im


def _read_array(path: Path) -> np.ndarray:
    try:
        if path.name.lower().endswith(".npy"):
            return np.asarray(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            keys = [k for k in ("mask", "masks", "arr_0") if k in z.files] or list(z.files)
            if not keys:
                raise DataError(f"--mask {path}: the .npz holds no array; expected key 'mask' or 'arr_0'")
            return np.asarray(z[keys[0]])
    except (OSError, ValueError) as e:
        raise DataError(f"--mask {path}: cannot read the array ({e}); expected a .npy or .npz of 0/1 values") from None
