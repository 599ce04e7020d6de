"""What a data source holds before anything is decoded: count, native sizes, modes, colour.

``survey(source)`` reads only headers (an image folder's files are opened lazily by Pillow, as
:class:`ddpm.datasets.folder.FolderDataset` does when it probes them), so it costs about one
file open per image. It decides the defaults of ``ddpm train --data X`` without ``--preset``:

- channels: 3 when any image is stored in a colour mode (RGB, RGBA, palette, CMYK, YCbCr, ...),
  else 1. The mode is the file's, not its content: an RGB file of grey pixels counts as colour
  (``--set model.in_channels=1`` turns such a folder grey);
- resolution: from the smallest shorter side (:func:`ddpm.sizes.auto_resolution`), since images
  are never enlarged.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class Survey:
    """Summary of a source. ``sizes`` counts (width, height) in pixels, ``modes`` Pillow modes."""

    source: str
    kind: str                       # folder | digits | cifar10 | array | prepared
    count: int
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    unreadable: int = 0             # files whose header could not be read (skipped here)
    prepared_resolution: int | None = None

    @property
    def colour(self) -> bool:
        return any(m not in GREY_MODES for m in self.modes)

    @property
    def channels(self) -> int:
        return 3 if self.colour else 1

    @property
    def min_side(self) -> int:
        return min(min(w, h) for w, h in self.sizes) if self.sizes else 0

    @property
    def square(self) -> bool:
        return all(w == h for w, h in self.sizes)

    def describe_sizes(self, limit: int = 3) -> str:
        common = self.sizes.most_common()
        text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common[:limit])
        return text + (f", {len(common) - limit} more sizes" if len(common) > limit else "")

    def describe_modes(self) -> str:
        return ", ".join(f"{m} ({n})" for m, n in self.modes.most_common())


def _array_shape(path: Path) -> tuple[int, ...]:
    from .arrays import load_array

    return tuple(load_array(path).shape)


def survey(source: str) -> Survey:
    """Survey ``source`` (any :func:`ddpm.data.open_dataset` source); DataError if unreadable."""
    src = str(source)
    if src == "digits":
        return Survey(src, "digits", 1500, Counter({(8, 8): 1500}), Counter({"L": 1500}))
    path = Path(os.path.expanduser(src))
    if not src or not path.exists():
        from ..data import open_dataset

        open_dataset(src)  # raises the usual one-line "not found / not recognised" DataError
    if path.is_dir():
        from .cifar import is_cifar_folder

        if is_cifar_folder(path):
            return Survey(src, "cifar10", 50_000, Counter({(32, 32): 50_000}), Counter({"RGB": 50_000}))
        return _survey_folder(path, src)
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return Survey(src, "cifar10", 50_000, Counter({(32, 32): 50_000}), Counter({"RGB": 50_000}))
    if name.endswith(".npy"):
        from .prepared import is_prepared, read_prepared

        if is_prepared(path):
            arr, meta = read_prepared(path, verify=False)
            n, h, w, c = arr.shape
            return Survey(src, "prepared", n, Counter({(w, h): n}), Counter({"RGB" if c == 3 else "L": n}),
                          prepared_resolution=h)
    if name.endswith((".npy", ".npz")) and path.is_file():
        n, h, w, c = (_array_shape(path) + (1,))[:4]
        return Survey(src, "array", n, Counter({(w, h): n}), Counter({"RGB" if c == 3 else "L": n}))
    from ..data import open_dataset

    open_dataset(src)  # raises the usual one-line DataError for an unknown source
    raise DataError(f"data source '{src}' cannot be surveyed")  # pragma: no cover


def _survey_folder(root: Path, src: str) -> Survey:
    from PIL import Image

    from .folder import list_images
    from .imageops import FORMATS

    files = list_images(root)
    if not files:
        raise DataError(f"image folder '{root}' contains no .png, .jpg, .jpeg or .webp files "
                        f"(searched recursively); expected at least one image")
    sv = Survey(src, "folder", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for f in files:
            try:
                with Image.open(f, formats=FORMATS) as im:
                    sv.sizes[im.size] += 1
                    sv.modes[im.mode] += 1
                    sv.count += 1
            except Exception:  # the loader reports (or skips) it with its own message
                sv.unreadable += 1
    return sv
