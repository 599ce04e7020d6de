"""Training and evaluation images as uint8 [H, W, C] (paper section 3.3 and Appendix B).

``open_dataset(source, split, resolution, channels)`` recognises ``source`` as:

- ``digits`` (the embedded default; the exact string wins over a folder of that name, write
  ``./digits`` for the folder): scikit-learn's 1,797 real 8x8 digits, fixed split 1,500 train /
  297 test, see :mod:`ddpm.datasets.digits`. ``digits_labels(split)`` gives their classes.
- a CIFAR-10 python archive (``*.tar.gz``/``*.tgz``/``*.tar``) or its ``cifar-10-batches-py``
  folder: train 50,000 / test 10,000 at 32x32x3, read with a restricted unpickler
  (:mod:`ddpm.datasets.cifar`).
- any other folder: images found recursively, decoded lazily, centre-cropped and area-resized
  (:mod:`ddpm.datasets.folder`); it has no split, ``test`` gives the same images.
- a ``.npz``/``.npy`` of uint8 [N, H, W, C] images of exactly the requested size
  (:mod:`ddpm.datasets.arrays`); no split either. A ``.npy`` written by ``ddpm data prepare``
  (a ``.json`` beside it) is checked against that description (:mod:`ddpm.datasets.prepared`).

Every item is a uint8 numpy array [resolution, resolution, channels]; ``ddpm.images.to_model``
turns a batch into the network's [-1, 1] NCHW floats. Unreadable data raises
:class:`ddpm.errors.DataError` with a one-line message naming the file; ``skip_bad=True`` skips
bad image files of a folder instead, counts them in ``dataset.skipped`` and reports each
through ``log`` (a callable taking a str) or ``warnings.warn``. A bad CIFAR archive or array
file is always an error: it is one file, there is nothing to skip to.

Class labels (class-conditional models): every dataset has ``labels`` (int64 [N] aligned with
the items, or None), ``class_names`` and ``num_classes``: the digits' and CIFAR-10's classes, an
image folder's top-level subfolders (sorted), an ``.npz``'s ``arr_1``/``labels``/``y`` array;
:func:`ddpm.conditioning.dataset_labels` checks them against ``model.num_classes``.

Training order: :class:`EpochSampler` (per-epoch permutations and flip bits from
``default_rng([seed, epoch])``, resumable) and :func:`apply_flips`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .datasets.arrays import load_array
from .datasets.base import ImageDataset, Log, check_request
from .datasets.digits import digits_indices, digits_labels
from .datasets.sampler import EpochSampler, apply_flips
from .errors import DataError

__all__ = ["open_dataset", "load_images", "read_samples", "digits_labels", "digits_indices",
           "EpochSampler", "apply_flips", "ImageDataset", "DataError"]

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_EXPECTED = ("expected digits, a cifar-10-python.tar.gz archive or folder, an image folder, "
             "or a .npz/.npy file")


def open_dataset(source: str, split: str = "train", resolution: int = 32, channels: int = 3,
                 skip_bad: bool = False, log: Log = None) -> ImageDataset:
    """Open ``source`` as a dataset of uint8 [resolution, resolution, channels] images.

    Raises :class:`DataError` (one line, naming the file and what was expected) for a source
    that is missing or not recognised, and for bad data (see the module docstring).
    """
    check_request(split, resolution, channels)
    kw = dict(skip_bad=skip_bad, log=log)
    src = str(source)
    if src == "digits":
        from .datasets.digits import DigitsDataset

        return DigitsDataset(split, resolution, channels, source=src, **kw)
    path = Path(os.path.expanduser(src))
    if not src or not path.exists():
        hint = ""
        if src.lower().replace("-", "").replace("_", "") in ("cifar10", "cifar"):
            hint = (" (download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                    "and pass its path)")
        raise DataError(f"data source '{src}' not found / not recognised; {_EXPECTED}{hint}")
    name = path.name.lower()
    if path.is_dir():
        from .datasets.cifar import is_cifar_folder

        if is_cifar_folder(path):
            from .datasets.cifar import CifarDataset

            return CifarDataset(path, split, resolution, channels, source=src, **kw)
        from .datasets.folder import FolderDataset

        return FolderDataset(path, resolution, channels, source=src, **kw)
    if name.endswith(".npy"):
        from .datasets.prepared import PreparedDataset, is_prepared

        if is_prepared(path):  # `ddpm data prepare` output: checked against its JSON
            return PreparedDataset(path, resolution, channels, source=src, **kw)
    if name.endswith((".npz", ".npy")):
        from .datasets.arrays import ArrayFileDataset

        return ArrayFileDataset(path, resolution, channels, source=src, **kw)
    if name.endswith(_ARCHIVE_SUFFIXES):
        from .datasets.cifar import CifarDataset

        return CifarDataset(path, split, resolution, channels, source=src, **kw)
    raise DataError(f"data source '{src}' not found / not recognised; {_EXPECTED} "
                    f"(a single file must end in .tar.gz, .tgz, .tar, .npz or .npy)")


def load_images(source: str, split: str = "test", resolution: int = 32, channels: int = 3,
                n: Optional[int] = None, skip_bad: bool = False, log: Log = None) -> np.ndarray:
    """uint8 [N, H, W, C]: the first ``n`` images of ``split`` in the dataset's fixed order.

    ``n`` None (or more than the dataset holds) returns all of them.
    """
    ds = open_dataset(source, split, resolution, channels, skip_bad=skip_bad, log=log)
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise DataError(f"number of images must be a non-negative integer, got {n!r}")
    count = len(ds) if n is None else min(int(n), len(ds))
    return ds.take(np.arange(count))


def read_samples(source: str) -> np.ndarray:
    """Generated samples as uint8 [N, H, W, C], at their own size (nothing is resized).

    ``source`` is an ``.npz`` (key ``images``, else ``arr_0``, else the first array) or ``.npy``
    of uint8 [N, H, W, C] / [N, H, W], or a folder of same-sized PNG/JPEG/WebP images (grey if
    the first one is grey, else RGB).
    """
    from .datasets.folder import list_images
    from .datasets.imageops import decode_native

    path = Path(os.path.expanduser(str(source)))
    if path.is_file() and path.name.lower().endswith((".npz", ".npy")):
        return np.asarray(load_array(path))
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise DataError(f"samples folder '{path}' contains no .png, .jpg, .jpeg or .webp files")
        first = decode_native(files[0])
        out = np.empty((len(files),) + first.shape, dtype=np.uint8)
        out[0] = first
        for k, f in enumerate(files[1:], start=1):
            x = decode_native(f, first.shape[2])
            if x.shape != first.shape:
                raise DataError(f"sample image '{f}' is {x.shape[1]}x{x.shape[0]}, but '{files[0]}' is "
                                f"{first.shape[1]}x{first.shape[0]}; expected images of one size")
            out[k] = x
        return out
    raise DataError(f"samples '{source}' not found / not recognised; expected an .npz/.npy of uint8 images "
                    f"or a folder of images")
