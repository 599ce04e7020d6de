"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits.

Values 0..16 become uint8 by round(x * 255 / 16) (half rounds up), so 16 -> 255.
The split is FIXED: ``train_test_split(arange(1797), test_size=297, random_state=0,
stratify=labels)``, each side sorted by original index -> 1,500 train and 297 test images,
disjoint, identical on every machine and run.

At another resolution the 8x8 image is resized with Pillow in float32, rounded once:
``Image.BOX`` (area averaging) when shrinking, ``Image.BILINEAR`` when enlarging (area
resampling would only make blocks).
With 3 channels the grey value is repeated into R, G and B.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .base import ArrayDataset
from .imageops import resize_u8

NUM_TEST = 297
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.floor(d.images * (255.0 / 16.0) + 0.5).astype(np.uint8)  # [1797, 8, 8]
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=NUM_TEST, random_state=SPLIT_SEED,
                              stratify=labels)
    return images, labels, {"train": np.sort(tr), "test": np.sort(te)}


def digits_indices(split: str) -> np.ndarray:
    """int64 indices into ``sklearn.datasets.load_digits()`` of ``split``'s images, in order."""
    return _digits()[2][split].copy()


def digits_labels(split: str = "train") -> np.ndarray:
    """int64 [N] class labels 0..9 aligned with ``open_dataset("digits", split)``."""
    from .base import check_request

    check_request(split, 8, 1)
    images, labels, idx = _digits()
    return labels[idx[split]].copy()


@lru_cache(maxsize=8)
def _digits_array(split: str, resolution: int, channels: int) -> np.ndarray:
    images, _, idx = _digits()
    x = images[idx[split]]
    if resolution != 8:
        method = Image.BOX if resolution < 8 else Image.BILINEAR
        x = np.stack([resize_u8(im[:, :, None], resolution, method)[:, :, 0] for im in x])
    x = x[..., None]
    if channels == 3:
        x = np.repeat(x, 3, axis=3)
    x.setflags(write=False)  # shared by every dataset opened with these arguments
    return x


class DigitsDataset(ArrayDataset):
    """``digits``: 1,500 train / 297 test uint8 images [resolution, resolution, channels]."""

    def __init__(self, split: str, resolution: int, channels: int, source: str = "digits", **kw):
        super().__init__(_digits_array(split, int(resolution), int(channels)), "digits", source, channels, **kw)
        self.labels = digits_labels(split)
        self.class_names = tuple(str(k) for k in range(10))
