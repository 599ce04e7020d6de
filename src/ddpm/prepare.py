"""``ddpm data prepare``: decode an image source once into a prepared dataset.

The writer of the format that :mod:`ddpm.datasets.prepared` reads (see that module for the files
and their checks). It sits above :mod:`ddpm.data` because it opens the source exactly as training
would (:func:`ddpm.data.open_dataset`), so the prepared array holds byte-for-byte the images
training from the source would see.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .atomic import atomic_write_json, atomic_writer
from .data import open_dataset
from .datasets.base import Log
from .datasets.prepared import FORMAT, PROCESSING, labels_path, sidecar

__all__ = ["prepare"]


def prepare(src: str, out: str | os.PathLike, resolution: int, channels: int, log: Log = None,
            progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Decode ``src`` once into ``out`` (a ``.npy`` path) and its JSON; returns the JSON dict.

    Args:
        src: any :func:`ddpm.data.open_dataset` source (an image folder in practice).
        out: the ``.npy`` to write; ``out`` with ``.json`` (and ``.labels.npy``) beside it.
        resolution: pixels (images are never enlarged: smaller ones are a DataError).
        channels: 1 (grey) or 3 (RGB).
        progress: called as ``progress(done, total)`` after every image.
    """
    out = Path(out)
    ds = open_dataset(src, "train", resolution, channels, log=log)
    n = len(ds)
    shape = (n, int(resolution), int(resolution), int(channels))
    digest = hashlib.sha256()
    with atomic_writer(out) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                 "fortran_order": False, "shape": shape})
        for i in range(n):
            item = np.ascontiguousarray(ds[i], dtype=np.uint8)
            buf = item.tobytes()
            digest.update(buf)
            f.write(buf)
            if progress is not None:
                progress(i + 1, n)
    labels = getattr(ds, "labels", None)
    class_names = getattr(ds, "class_names", None)
    lab_file = None
    if labels is not None:
        lab_file = labels_path(out)
        with atomic_writer(lab_file) as f:
            np.save(f, np.asarray(labels, dtype=np.int64), allow_pickle=False)
    meta = {
        "format": FORMAT,
        "source": str(Path(os.path.expanduser(str(src))).resolve()) if src != "digits" else "digits",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ddpm_version": __version__,
        "resolution": int(resolution),
        "channels": int(channels),
        "count": n,
        "class_names": list(class_names) if class_names is not None else None,
        "labels_file": lab_file.name if lab_file is not None else None,
        "sha256": digest.hexdigest(),
        "processing": PROCESSING,
    }
    atomic_write_json(sidecar(out), meta)
    return meta
