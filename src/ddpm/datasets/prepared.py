"""Prepared datasets: images decoded, cropped and resized once (``ddpm data prepare``).

``ddpm.prepare.prepare(src, out, resolution, channels)`` opens ``src`` exactly as training would
(:func:`ddpm.data.open_dataset`: a folder is centre-cropped and area-resized with Pillow's BOX
filter in float32, rounded once, see :mod:`ddpm.datasets.imageops`), and writes

- ``OUT.npy``: uint8 [N, resolution, resolution, C], the dataset's items in its own order, so
  training from it sees byte-for-byte the batches training from ``src`` would;
- ``OUT.json``: ``format``, ``source`` (absolute path), ``created`` (UTC), ``ddpm_version``,
  ``resolution``, ``channels``, ``count``, ``class_names`` (a folder's sorted top-level
  subfolders, or the dataset's own), ``labels_file``, ``sha256`` of the array's data bytes, and
  how the images were made (``processing``);
- ``OUT.labels.npy``: int64 [N] class labels, only when the source has them.

Every file is written atomically (temporary file + rename), the array streamed image by image,
so a source larger than RAM works and an interrupted run leaves no half-written ``OUT.npy``.

Reading (:class:`PreparedDataset`, chosen by :func:`ddpm.data.open_dataset` when a ``.npy`` has
its ``.json`` beside it): the array is memory-mapped (no decoding, no copy until a batch is
gathered). Refused with one line: a file shorter or longer than its header says (truncated), a
JSON that does not match the array, a resolution other than the one asked for, three channels
when one is asked for, and data whose sha256 differs from the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .arrays import _npy_header
from .base import ArrayDataset

FORMAT = "ddpm-prepared-1"
PROCESSING = ("decoded once with Pillow (EXIF orientation applied, 16-bit and transparency handled as in training), "
              "converted to L or RGB, centre-cropped to a square, area-resized (Image.BOX in float32, "
              "rounded once); no flips (flips are drawn at training time)")
_CHUNK = 1 << 24


def sidecar(path: str | os.PathLike) -> Path:
    """``x.npy`` -> ``x.json`` (the prepared dataset's description)."""
    return Path(path).with_suffix(".json")


def labels_path(path: str | os.PathLike) -> Path:
    """``x.npy`` -> ``x.labels.npy``."""
    return Path(path).with_suffix(".labels.npy")


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``.npy`` with a ``ddpm data prepare`` JSON beside it."""
    p = Path(path)
    if p.suffix.lower() != ".npy" or not sidecar(p).is_file():
        return False
    try:
        return json.loads(sidecar(p).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _data_sha256(path: Path, offset: int, nbytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def read_prepared(path: str | os.PathLike, resolution: Optional[int] = None, channels: Optional[int] = None,
                  verify: bool = True) -> tuple[np.ndarray, dict]:
    """(memory-mapped uint8 [N, H, W, C], the JSON dict) of a prepared ``.npy``; DataError if unusable."""
    path = Path(path)
    meta_path = sidecar(path)
    try:
        meta = json.loads(meta_path.read_text())
        res, ch, count = int(meta["resolution"]), int(meta["channels"]), int(meta["count"])
        want_sha = str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"'{meta_path}' is not a readable `ddpm data prepare` description; expected the JSON "
                        f"written beside '{path.name}' (prepare it again)") from None
    again = f"run `ddpm data prepare {meta.get('source', 'SRC')} {path} --resolution {resolution or res}`"
    if resolution is not None and res != resolution:
        raise DataError(f"'{path}' was prepared at {res}x{res}, but the model wants {resolution}x{resolution}; "
                        f"{again}, or train at --resolution {res}")
    if channels is not None and not (ch == channels or (ch == 1 and channels == 3)):
        raise DataError(f"'{path}' was prepared with {ch} channels, but the model wants {channels}; "
                        f"{again} --channels {channels}")
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _npy_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except Exception:
        raise DataError(f"cannot read '{path}' as a .npy file; {again}") from None
    expected_shape = (count, res, res, ch)
    if tuple(shape) != expected_shape or np.dtype(dtype) != np.uint8 or fortran:
        raise DataError(f"'{path}' holds {np.dtype(dtype).name} {list(shape)}, but '{meta_path.name}' describes "
                        f"uint8 {list(expected_shape)}; {again}")
    nbytes = count * res * res * ch
    if size != offset + nbytes:
        raise DataError(f"'{path}' is {'truncated' if size < offset + nbytes else 'longer than its header says'}: "
                        f"{size - offset} data bytes for {count} images of {res}x{res}x{ch}, expected {nbytes}; "
                        f"{again}")
    if verify and _data_sha256(path, offset, nbytes) != want_sha:
        raise DataError(f"'{path}' does not match the sha256 recorded in '{meta_path.name}' (the file changed "
                        f"or is damaged); {again}")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return arr, meta


class PreparedDataset(ArrayDataset):
    """A ``ddpm data prepare`` output: memory-mapped uint8 [N, resolution, resolution, C]."""

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int, source: str, **kw):
        arr, meta = read_prepared(path, resolution, channels)
        super().__init__(arr, Path(path).stem, source, channels, **kw)
        self.path = Path(path)
        self.meta = meta
        names = meta.get("class_names")
        self.class_names = tuple(names) if names else None
        if meta.get("labels_file"):
            lab = self.path.parent / meta["labels_file"]
            try:
                y = np.load(lab, allow_pickle=False)
            except Exception:
                raise DataError(f"cannot read the labels '{lab}' of '{self.path}'; expected the .labels.npy "
                                f"written by `ddpm data prepare` (prepare it again)") from None
            if y.dtype.kind not in "iu" or y.shape != (len(self),):
                raise DataError(f"'{lab}' holds {y.dtype.name} {list(y.shape)}; expected {len(self)} int64 labels")
            self.labels = y.astype(np.int64)
