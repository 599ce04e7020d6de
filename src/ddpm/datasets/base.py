"""What every dataset shares: the uint8 NHWC item contract, skip counting, one-line errors."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError

Log = Optional[Callable[[str], None]]

SPLITS = ("train", "test")


def one_line(text: object) -> str:
    """Collapse whitespace (a decoder's multi-line message) so errors stay on one line."""
    return " ".join(str(text).split())


def check_request(split: str, resolution: int, channels: int) -> None:
    """Reject a split, resolution or channel count that no dataset can serve."""
    from ..errors import suggest

    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}{suggest(split, SPLITS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


class ImageDataset(Dataset):
    """A ``torch.utils.data.Dataset`` of uint8 images.

    ``ds[i]`` is a uint8 numpy array [H, W, C] with H = W = ``resolution`` and C = ``channels``.
    ``name`` is a short label (``digits``, ``cifar10``, a folder or file name), ``source`` the
    string the dataset was opened from, ``skipped`` how many bad files were skipped so far
    (only ever non-zero with ``skip_bad=True``).

    Class labels (for class-conditional models): ``labels`` is int64 [len] aligned with the
    items, or None when the data carries none; ``class_names`` the names of labels 0, 1, ...
    (or None when the source only has numbers); ``num_classes`` the count they imply.
    """

    labels: Optional[np.ndarray] = None
    class_names: Optional[tuple[str, ...]] = None

    @property
    def num_classes(self) -> int:
        """len(class_names), else 1 + the largest label, else 0 (unlabelled)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(np.max(self.labels)) + 1
        return 0

    def __init__(self, name: str, source: str, resolution: int, channels: int,
                 skip_bad: bool = False, log: Log = None):
        self.name = name
        self.source = source
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.skip_bad = bool(skip_bad)
        self.log = log
        self.skipped = 0

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 [len(indices), H, W, C]: the items at ``indices``, stacked (a batch gather)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.resolution, self.resolution, self.channels), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self[int(i)]
        return out

    def _index(self, i) -> int:
        """Normalise an index (negative counts from the end) or raise IndexError."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        return i

    def _note_skip(self, message: str) -> None:
        """Count one skipped bad file and report it through ``log`` or ``warnings``."""
        self.skipped += 1
        if self.log is not None:
            self.log(message)
        else:
            warnings.warn(message, stacklevel=3)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, resolution={self.resolution}, "
                f"channels={self.channels}, skipped={self.skipped})")


class ArrayDataset(ImageDataset):
    """Images already held as one uint8 array [N, H, W, C0] (in memory or memory-mapped).

    ``repeat_gray`` turns a one-channel array into three channels on the fly (C0 = 1, C = 3).
    """

    def __init__(self, array: np.ndarray, name: str, source: str, channels: int, **kw):
        super().__init__(name, source, array.shape[1], channels, **kw)
        self.array = array
        self.repeat_gray = array.shape[3] == 1 and channels == 3

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        x = np.asarray(self.array[self._index(i)])
        return np.repeat(x, 3, axis=2) if self.repeat_gray else x.copy()

    def take(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices out of range for a dataset of {n} images")
        x = np.asarray(self.array[idx % n if idx.size else idx])
        return np.repeat(x, 3, axis=3) if self.repeat_gray else x
