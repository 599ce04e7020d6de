"""One writer per run folder: an advisory ``flock`` on ``RUN/train.lock``, held while training.

The lock file names its holder (host, PID, start time) so that a second ``ddpm train`` on the
same folder can say who has it. The kernel drops a ``flock`` when its process dies, so a run
killed with ``kill -9`` leaves at most a stale file that the next trainer simply locks again:
a folder can never become unresumable. Readers (``ddpm sample``, ``ddpm eval``) take no lock;
checkpoints are renamed into place complete, so a reader never sees a partial one.

On release the lock file is removed, and so is the run folder if acquiring the lock created it
and nothing else was written (a run that failed before its first write leaves no trace).
``flock`` is per open file, and the file may be unlinked by a releasing holder between our
``open`` and our ``flock``; :meth:`RunLock.acquire` therefore checks that the file it locked is
still the one at the path, and retries if not.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import UserError

LOCK_NAME = "train.lock"


class RunLockedError(UserError):
    """Another live process is training into this run folder."""


class RunLock:
    """``with RunLock(run_dir): ...`` holds the folder's writer lock (non-blocking: raises
    :class:`RunLockedError` naming the holder when it is taken)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self._created_root = False

    def holder(self) -> str:
        """The holder as written in the lock file ("host H, PID P, since T"), or "unknown"."""
        try:
            info = json.loads(self.path.read_text())
            return f"PID {info['pid']} on host {info['host']}, since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (no holder information yet)"

    def acquire(self) -> "RunLock":
        try:
            return self._acquire()
        except OSError as e:
            self._drop_created_root()
            raise UserError(f"--out {self.root}: cannot create the run folder or its lock file "
                            f"{self.path.name}: {e.strerror or e}") from None

    def _acquire(self) -> "RunLock":
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root}: exists and is not a folder; expected a run folder")
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self._created_root = True
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._drop_created_root()
                raise RunLockedError(
                    f"{self.root} is already being trained by {self.holder()} (lock file {self.path}); "
                    f"wait for that run to finish or stop it (Ctrl-C / SIGTERM), or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file while we opened it: lock the new one
        else:  # pragma: no cover - would need 100 consecutive open/unlink races
            raise RunLockedError(f"{self.root}: could not take the lock {self.path}")
        self._fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before unlocking: nobody can lock this inode once it is gone
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._drop_created_root()

    def _drop_created_root(self) -> None:
        if self._created_root:
            try:
                self.root.rmdir()  # only succeeds if nothing was written
            except OSError:
                pass
            self._created_root = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
