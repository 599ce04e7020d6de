"""A folder of images, searched recursively, decoded lazily (one file per ``__getitem__``).

Files: every ``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp`` (any letter case) below the folder,
sorted by their path relative to it ('/'-separated), so the order is the same on every machine.
Hidden files and folders (name starting with '.') are ignored, symlinked files are followed,
symlinked folders are not (no cycles). An image folder has no split: ``test`` returns the same
images as ``train``.

Bad files are found in two places:

1. when the folder is opened, every file's header is read (cheap, no pixel decoding): empty
   files, non-images, formats other than PNG/JPEG/WebP, declared sizes over 8192x8192 and
   images smaller than the resolution are found here. With ``skip_bad`` they are dropped from
   the list (they are not part of ``len``); without it the first one raises.
2. when an item is decoded: a truncated or corrupt pixel stream. With ``skip_bad`` item ``i`` is
   replaced by the next readable file (i+1, i+2, ... wrapping around), which is deterministic;
   the bad file is remembered so it is decoded (and counted) once per process.

``skipped`` counts both kinds (per process: DataLoader workers keep their own counts).

Class labels: when every image lies inside a subfolder of the root, the top-level subfolder is
its class (``root/cat/x.png`` -> "cat"); ``class_names`` are those folder names sorted, and
``labels`` each file's index in that list (taken before bad files are skipped, so skipping
never renumbers the classes). Images directly in the root make the folder unlabelled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import ImageDataset
from .imageops import EXTENSIONS, decode_file, probe


def list_images(root: Path) -> list[Path]:
    """All image files under ``root`` (see module docstring for the rules), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class FolderDataset(ImageDataset):
    """Images from a folder, centre-cropped and area-resized to ``resolution``."""

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int, source: str, **kw):
        root = Path(root)
        super().__init__(root.resolve().name or str(root), source, resolution, channels, **kw)
        self.root = root
        files = list_images(root)
        if not files:
            raise DataError(f"image folder '{root}' contains no .png, .jpg, .jpeg or .webp files "
                            f"(searched recursively); expected at least one image")
        self.files: list[Path] = []
        for f in files:
            try:
                probe(f, self.resolution)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self._note_skip(f"skipping bad image: {exc}")
                continue
            self.files.append(f)
        if not self.files:
            raise DataError(f"image folder '{root}' has no readable images: all {len(files)} files were "
                            f"skipped as bad; expected PNG, JPEG or WebP images at least "
                            f"{self.resolution}x{self.resolution}")
        self._bad: set[int] = set()
        tops = [f.relative_to(root).parts for f in files]
        if all(len(parts) >= 2 for parts in tops):
            self.class_names = tuple(sorted({parts[0] for parts in tops}))
            index = {name: k for k, name in enumerate(self.class_names)}
            self.labels = np.array([index[f.relative_to(root).parts[0]] for f in self.files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._index(i)
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return decode_file(self.files[j], self.resolution, self.channels)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self._bad.add(j)
                self._note_skip(f"skipping bad image: {exc}")
        raise DataError(f"image folder '{self.root}' has no readable images: all {n} files failed to decode; "
                        f"expected valid PNG, JPEG or WebP images")
