"""Decode one image file (Pillow) into uint8 [H, W, C]: mode, centre crop, area resize.

The order is fixed: open (only PNG, JPEG and WebP decoders are allowed), refuse huge declared
sizes before decoding, decode fully (a truncated file raises instead of coming back half grey),
apply the EXIF orientation, convert to ``L`` or ``RGB``, centre-crop to a square, then shrink to
``resolution`` with ``Image.BOX``, which averages every source pixel in a target pixel's
footprint (area resampling), computed exactly (whole factors) or in float32 and rounded once
(see :func:`resize_u8`). For a non-whole factor Pillow's BOX gives each source pixel wholly to
the target pixel whose footprint holds its centre (no fractional weights). Images never get enlarged: a side shorter than ``resolution`` is
a :class:`DataError`.

Mode conversion, chosen so that every input mode reaches 0..255 with its meaning intact:

- 16-bit greyscale (``I;16*``, ``I``): value / 257, rounded (65535 -> 255). Pillow's own
  ``convert("L")`` clips at 255 instead, which would turn most of such an image white.
- anything with transparency (``RGBA``, ``LA``, ``PA``, a palette or ``L``/``RGB`` image with a
  tRNS entry): alpha-composited over white, so fully transparent pixels become white whatever
  colour they happen to store.
- palette, bilevel, CMYK (Adobe-inverted CMYK JPEGs included) and YCbCr: Pillow's RGB conversion.
- RGB -> L uses Pillow's ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .base import one_line

# Declared width x height above which a file is refused before decoding (8192 x 8192).
MAX_PIXELS = 8192 * 8192
# Decoders Pillow may use (the JPEG one also opens MPO, the multi-picture JPEG of many phones).
FORMATS = ("PNG", "JPEG", "WEBP")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _open(path: str | os.PathLike) -> Image.Image:
    """Open lazily (header only) with the allowed decoders; refuse oversized declarations."""
    with warnings.catch_warnings():
        # Our own limit below is lower than Pillow's warning threshold; keep its warning quiet.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path, formats=FORMATS)
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise DataError(f"image '{path}' declares {w}x{h} pixels, over the limit of {MAX_PIXELS} "
                        f"(8192x8192); refusing to decode it (expected a normal-sized PNG, JPEG or WebP)")
    return im


def _failure(path, exc: BaseException) -> DataError:
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"'{path}' is not a PNG, JPEG or WebP image (Pillow cannot identify it; "
                         f"expected a valid PNG, JPEG or WebP file)")
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"image '{path}' is too large to decode safely: {one_line(exc)}")
    reason = one_line(exc) or type(exc).__name__
    return DataError(f"cannot read image '{path}': {reason} (expected a valid PNG, JPEG or WebP file)")


def _check_size(path, w: int, h: int, resolution: int) -> None:
    if min(w, h) < resolution:
        raise DataError(f"image '{path}' is {w}x{h} pixels, smaller than the resolution {resolution} "
                        f"(expected both sides >= {resolution}; images are never enlarged)")


def probe(path: str | os.PathLike, resolution: int) -> tuple[int, int]:
    """Read only the header of ``path``; return (width, height) or raise :class:`DataError`.

    Catches what can be known without decoding: a missing, empty or non-image file, a format
    other than PNG/JPEG/WebP, a decompression bomb, an image smaller than ``resolution``.
    """
    try:
        with _open(path) as im:
            w, h = im.size
    except Exception as exc:  # any decoder failure on a user's file is bad data
        raise _failure(path, exc) from None
    _check_size(path, w, h, resolution)
    return w, h


def to_channels(im: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded image of any mode to ``L`` (channels=1) or ``RGB`` (channels=3)."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.floor(a / 257.0 + 0.5), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.floor(np.asarray(im) + 0.5), 0, 255).astype(np.uint8))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    target = "L" if channels == 1 else "RGB"
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im if im.mode == target else im.convert(target)


def resize_u8(image: np.ndarray, size: int, method=Image.BOX) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C], resampled in float32 and rounded once.

    Pillow resamples 8-bit images in two passes with an 8-bit intermediate, so its BOX output
    can be 0.75 away from the true block mean ([[0, 0], [0, 1]] -> 1). Each channel is therefore
    resampled as a 32-bit float ("F") image and rounded (half up) only at the end. A BOX shrink
    by a whole factor f (e.g. 1024 -> 256) is the exact mean of f x f blocks, computed in
    integers instead (several times faster, and exact on .5 ties).
    """
    h, w, c = image.shape
    if method == Image.BOX and h == w and h % size == 0:
        f = h // size
        rows = image.astype(np.uint32).reshape(size, f, w, c)
        acc = rows[:, 0].copy()
        for k in range(1, f):  # f strided adds beat numpy's multi-axis sum several times over
            acc += rows[:, k]
        cols = acc.reshape(size, size, f, c)
        sums = cols[:, :, 0].copy()
        for k in range(1, f):
            sums += cols[:, :, k]
        return ((2 * sums + f * f) // (2 * f * f)).astype(np.uint8)  # mean, rounded half up
    out = np.empty((size, size, image.shape[2]), dtype=np.uint8)
    for c in range(image.shape[2]):
        f = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
        out[:, :, c] = np.clip(np.floor(np.asarray(f.resize((size, size), method)) + 0.5), 0, 255)
    return out


def crop_resize(im: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square (odd excess: the extra pixel is dropped right/bottom), then
    area-resize (BOX) to ``resolution``; returns uint8 [resolution, resolution, C]."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        im = im.crop((left, top, left + s, top + s))
    a = as_hwc(im)
    return a if s == resolution else resize_u8(a, resolution, Image.BOX)


def as_hwc(im: Image.Image) -> np.ndarray:
    """An ``L`` or ``RGB`` image as a contiguous uint8 [H, W, C] array."""
    a = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(a[:, :, None] if a.ndim == 2 else a)


def decode_file(path: str | os.PathLike, resolution: int, channels: int) -> np.ndarray:
    """Decode ``path`` to uint8 [resolution, resolution, channels] or raise :class:`DataError`."""
    try:
        with _open(path) as im:
            _check_size(path, *im.size, resolution)
            im.load()  # full decode: a truncated file raises here
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # a malformed EXIF block does not make the pixels bad
                im2 = im
            return crop_resize(to_channels(im2, channels), resolution)
    except Exception as exc:
        raise _failure(path, exc) from None


def fit_array(image: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """A uint8 [H, W, C] array (C in 1, 3) through the same conversion/crop/area resize."""
    im = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    return crop_resize(to_channels(im, channels), resolution)


GREY_MODES = ("1", "L", "LA", "La", "I", "F") + _SIXTEEN_BIT


def decode_native(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """Decode ``path`` at its own size to uint8 [H, W, C] (C = 1 for grey modes unless ``channels``)."""
    try:
        with _open(path) as im:
            im.load()
            c = channels or (1 if im.mode in GREY_MODES else 3)
            return as_hwc(to_channels(im, c))
    except Exception as exc:
        raise _failure(path, exc) from None
