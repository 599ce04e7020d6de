"""Images stored as one uint8 array in a ``.npy`` file or an ``.npz`` archive.

``.npz``: the array under key ``images``, else ``arr_0`` (what ``np.savez(f, x)`` and the
ADM evaluator's sample files use), else the first array in the archive. The array must be uint8
[N, H, W, C] (or [N, H, W], read as C = 1) with H = W = resolution and C = channels; C = 1 with
channels = 3 is repeated into RGB. Nothing is resized: a mismatch is a :class:`DataError`
naming the expected shape. Pickled (object) arrays are never loaded. A ``.npy`` is memory-mapped,
so a large file costs no RAM until its images are read; an ``.npz`` member is read into memory
after its header has been checked (dtype, shape and byte count) without reading the data.

Class labels (class-conditional models only): an ``.npz`` may hold an integer array [N] under
``arr_1`` (``np.savez(f, images, labels)``, the ADM evaluator's sample files), ``labels`` or
``y``; it is read, and checked, the first time ``labels`` is asked for. A ``.npy`` is unlabelled.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .base import ArrayDataset, one_line

PREFERRED_KEYS = ("images", "arr_0")
LABEL_KEYS = ("arr_1", "labels", "y")


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_array(shape, dtype, what: str, resolution: Optional[int] = None, channels: Optional[int] = None) -> None:
    """Raise a DataError unless (shape, dtype) describe uint8 images this request can use.

    ``resolution``/``channels`` None accept any square-or-not size and C in {1, 3}.
    """
    want = (f"[N, {resolution}, {resolution}, {channels}]" if resolution is not None and channels is not None
            else "[N, H, W, C] with C = 1 or 3")
    if np.dtype(dtype) != np.uint8:
        raise DataError(f"'{what}' holds {np.dtype(dtype).name} values; expected uint8 images {want} (0..255)")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise DataError(f"'{what}' has shape {_shape_text(shape)}; expected uint8 images {want} (or [N, H, W] grey)")
    n, h, w = shape[:3]
    c = shape[3] if len(shape) == 4 else 1
    if n < 1:
        raise DataError(f"'{what}' holds no images (shape {_shape_text(shape)}); expected uint8 images {want}")
    hint = ""
    if len(shape) == 4 and shape[1] in (1, 3) and shape[2] == shape[3] and c not in (1, 3):
        hint = " (it looks like NCHW; store images as NHWC)"
    if c not in (1, 3):
        raise DataError(f"'{what}' has shape {_shape_text(shape)} with {c} channels; expected {want}{hint}")
    if resolution is not None and (h != resolution or w != resolution):
        raise DataError(f"'{what}' has shape {_shape_text(shape)}; expected {want} (arrays are not resized){hint}")
    if channels is not None and not (c == channels or (c == 1 and channels == 3)):
        raise DataError(f"'{what}' has {c} channels (shape {_shape_text(shape)}); expected {want}")


def _npy_header(f):
    """(shape, fortran_order, dtype, header_end) from an open .npy stream, versions 1 and 2."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, fortran, dtype


def _load_npz(path: Path, resolution, channels) -> tuple[np.ndarray, str]:
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not members:
            raise DataError(f"'{path}' contains no arrays; expected uint8 images under key 'images' or 'arr_0'")
        by_key = {i.filename[:-4]: i for i in members}
        key = next((k for k in PREFERRED_KEYS if k in by_key), members[0].filename[:-4])
        info = by_key[key]
        what = f"{path}' array '{key}"
        with zf.open(info) as f:
            shape, _, dtype = _npy_header(f)
            check_array(shape, dtype, what, resolution, channels)
            need = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if info.file_size - f.tell() < need:
                raise DataError(f"'{what}' is truncated: {info.file_size - f.tell()} data bytes for shape "
                                f"{_shape_text(shape)}, expected {need}")
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False), key


def load_array(path: str | os.PathLike, resolution: Optional[int] = None,
               channels: Optional[int] = None) -> np.ndarray:
    """The validated uint8 image array of a .npy/.npz file (3-D arrays get a channel axis)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PK"):
            arr, key = _load_npz(path, resolution, channels)
            what = f"{path}' array '{key}"
        elif magic == b"\x93NUMPY":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            what = str(path)
        else:
            raise DataError(f"'{path}' is neither a .npy nor a .npz file (its first bytes are {magic!r}); "
                            f"expected uint8 images saved with numpy.save or numpy.savez")
        check_array(arr.shape, arr.dtype, what, resolution, channels)
    except DataError:
        raise
    except Exception as exc:  # zipfile/numpy errors on a damaged file: the file is bad data
        raise DataError(f"cannot read '{path}': {one_line(exc) or type(exc).__name__}; expected uint8 images "
                        f"saved with numpy.save or numpy.savez") from None
    return arr[..., None] if arr.ndim == 3 else arr


def load_labels(path: str | os.PathLike, n: int) -> Optional[np.ndarray]:
    """int64 [n] class labels of an ``.npz`` (first of ``LABEL_KEYS`` present), or None.

    Raises DataError when the label array is not n integers >= 0.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not f.read(2).startswith(b"PK"):
                return None
        with zipfile.ZipFile(path) as zf:
            names = {i.filename[:-4] for i in zf.infolist() if i.filename.endswith(".npy")}
            key = next((k for k in LABEL_KEYS if k in names), None)
            if key is None:
                return None
            with zf.open(key + ".npy") as f:
                y = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read the labels of '{path}': {one_line(exc) or type(exc).__name__}") from None
    what = f"'{path}' array '{key}'"
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} holds {y.dtype.name} {_shape_text(y.shape)}; expected {n} integer class labels "
                        f"(one per image)")
    if n and int(y.min()) < 0:
        raise DataError(f"{what} has a negative label {int(y.min())}; expected class labels 0, 1, ...")
    return y.astype(np.int64)


class ArrayFileDataset(ArrayDataset):
    """A ``.npy``/``.npz`` of uint8 images [N, resolution, resolution, C] (labels: see the module doc)."""

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int, source: str, **kw):
        arr = load_array(path, resolution, channels)
        super().__init__(arr, Path(path).stem, source, channels, **kw)
        self.path = Path(path)
        self._labels: Optional[np.ndarray] = None
        self._labels_read = False

    @property
    def labels(self) -> Optional[np.ndarray]:  # read on first use: unconditional runs never need them
        if not self._labels_read:
            self._labels = load_labels(self.path, len(self))
            self._labels_read = True
        return self._labels
