"""Free space: a full disk ends a write in one line, and long runs warn before it happens.

A write that fails with ENOSPC or EDQUOT becomes a :class:`ddpm.errors.DiskFullError` naming
the file, the bytes the write needed and the bytes free on that filesystem
(:func:`disk_full_error`, used by :mod:`ddpm.atomic`, so every writer of the package reports it
the same way, and the temporary file is removed as for any failed write). Periodic writers
(training checkpoints) call :func:`check_room` before a write and after it, with the size of
the previous file as the estimate of the next.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import DiskFullError

#: errno values that mean "no room": the filesystem is full, or the user's quota is.
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem of ``folder`` (its nearest existing parent), or None."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human(n: int | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "unknown"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def disk_full_error(path: str | os.PathLike, needed: int | None, e: OSError) -> DiskFullError:
    """The one-line error of a write to ``path`` that failed with ENOSPC/EDQUOT (``e``).

    ``needed``: the bytes of the whole file when known (else only "more than is free").
    """
    path = Path(path)
    what = e.strerror or os.strerror(e.errno or errno.ENOSPC)  # "No space left on device", "Disk quota exceeded"
    need = f"it needs {human(needed)}" if needed is not None else "it needs more than is free"
    return DiskFullError(f"could not write {path}: {what} ({need}, {human(free_bytes(path.parent))} free on that "
                         f"filesystem); nothing was written there: free some space and run the command again",
                         e.errno or errno.ENOSPC, str(path))


def check_room(folder: str | os.PathLike, needed: int, what: str, log: Callable[[str], Any]) -> bool:
    """Warn (through ``log``) when ``needed`` bytes for ``what`` will not fit in ``folder``'s free
    space; True when they fit (or the free space is unknown)."""
    free = free_bytes(folder)
    if free is None or free >= needed:
        return True
    log(f"warning: low disk space: {what} needs about {human(needed)} but only {human(free)} is free in "
        f"{folder}; that write will fail unless space is freed")
    return False


def checkpoint_bytes(tensors) -> int:
    """About the size of a safetensors file of ``tensors`` (their bytes plus a header allowance)."""
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values()) + (1 << 16)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` to a log file (metrics.jsonl); a write that fails for lack of space is cut
    back to the file's previous end (no torn record) and raised as :class:`DiskFullError`."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            if not is_disk_full(e):
                raise
            os.ftruncate(fd, end)
            raise disk_full_error(path, len(data), e) from None
    finally:
        os.close(fd)
