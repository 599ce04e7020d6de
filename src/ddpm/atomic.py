"""Every file the package writes goes through here: all or nothing, never a torn file.

A writer fills a temporary file in the target's own folder (``.NAME.XXXX.tmp``, so the rename
cannot cross filesystems), flushes and fsyncs it, renames it over the target (atomic on POSIX)
and fsyncs the folder so the rename itself survives a power cut. A crash, ``kill -9`` or a
second Ctrl-C at any moment leaves either the old file or the new one; an exception while
writing removes the temporary file and leaves the old file untouched; a full disk (ENOSPC,
EDQUOT) is reported as :class:`ddpm.errors.DiskFullError`, one line naming the file and the
space it needed. A ``kill -9`` can leave a
stray ``.NAME.*.tmp`` behind (never under the target's name); :func:`remove_stale_temps` clears
them.

    atomic_write_bytes(path, data)           any bytes
    atomic_write_text(path, text)            UTF-8 text
    atomic_write_json(path, obj, indent=2)   JSON plus a final newline
    atomic_write_npz(path, **arrays)         numpy .npz (np.savez, no pickles)
    atomic_save_image(path, pil_image)       PNG (or any format Pillow infers from the suffix)
    atomic_save_figure(path, fig)            a matplotlib figure
    atomic_writer(path)                      context manager yielding a binary file object
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .diskspace import disk_full_error, is_disk_full
from .errors import DiskFullError

_TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask; read from /proc where possible (os.umask can only read it by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, size: int | None = None) -> Iterator[BinaryIO]:
    """``with atomic_writer(p) as f: f.write(...)``: ``p`` appears complete when the block ends.

    The parent folder is created if missing. If the block raises (including KeyboardInterrupt),
    the temporary file is removed and the exception propagates; the old ``p`` is untouched.
    A write that fails for lack of space or quota (ENOSPC, EDQUOT) raises
    :class:`ddpm.errors.DiskFullError` naming ``p`` and ``size`` (the file's bytes, when known).
    """
    path = Path(path)
    try:
        with _writer(path) as f:
            yield f
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(path, size, e) from None
        raise


@contextlib.contextmanager
def _writer(path: Path) -> Iterator[BinaryIO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus umask),
        # so checkpoints and samples stay readable by whoever could read the run folder.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync folder)."""
    with atomic_writer(path, size=len(data)) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``json.dumps(obj, indent=indent)`` plus a newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez(path, **arrays)`` atomically (built in memory first; arrays never pickled)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(path: str | os.PathLike, image) -> None:
    """Save a PIL image; the format follows the suffix of ``path`` (``.png`` -> PNG)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_writer(path) as f:
        image.save(f, format=fmt)


def atomic_save_figure(path: str | os.PathLike, fig, **savefig_kwargs) -> None:
    """``fig.savefig(path)`` atomically; the format follows the suffix of ``path``."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_writer(path) as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.*.tmp`` files left in ``folder`` by writers that were killed; return them.

    Only call this while holding the folder's writer lock (no live writer can own them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.glob(f".*{_TMP_SUFFIX}"):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone
