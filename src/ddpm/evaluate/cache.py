"""Where evaluation caches live (reference statistics, the digits classifier) and how they are written.

Caches are plain ``.npz`` files (no pickle), written atomically so that a crash or two ranks
writing at once never leave a half-written file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddpm.atomic import atomic_write_npz


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$DDPM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpm`` or ``~/.cache/ddpm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DDPM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ddpm"


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed npz, atomically."""
    atomic_write_npz(path, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an npz written by :func:`save_npz` (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
