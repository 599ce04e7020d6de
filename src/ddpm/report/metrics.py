"""Reading ``RUN/metrics.jsonl`` (what :mod:`ddpm.training.observe` writes) into columns, and
thinning curves for a page.

:class:`MetricsLog` reads the file incrementally: each :meth:`MetricsLog.refresh` parses only
the bytes appended since the last one, so the trainer's live report and the local server pay
for each line once. A resumed run rewrites the file (a new inode, or a shorter one): the log
then starts over.

A last line without its newline is a write in progress or the trace of a killed writer: it is
left out and reported (:attr:`MetricsLog.torn`), never an error. Any other line that is not a
JSON object with an integer ``step`` is garbage and raises :class:`~ddpm.errors.DataError`
naming the file and the line.

Curves of an 800k-step run hold up to 800k points; :func:`decimate` keeps at most a few
thousand of them (the first and last, and each bucket's minimum and maximum, so spikes stay
visible), :func:`smooth` is the debiased exponential moving average TensorBoard draws.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["MetricsLog", "read_metrics", "decimate", "smooth", "smoothing_weight"]


class MetricsLog:
    """The records of one metrics.jsonl, as columns.

    Attributes:
        path: the file.
        columns: name -> list of float (NaN where a record lacks the key or has null), one entry
            per record, in file order. ``columns["step"]`` is always present once a record is.
        torn: bytes of an incomplete last line (0 when the file ends with a newline).
        exists: whether the file exists.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self.columns: dict[str, list[float]] = {}
        self.count = 0
        self.torn = 0
        self.exists = False
        self._offset = 0
        self._line = 0
        self._ino: int | None = None

    def __len__(self) -> int:
        return self.count

    def refresh(self) -> "MetricsLog":
        """Parse what was appended since the last call (all of it the first time)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reset()
            return self
        if st.st_ino != self._ino or st.st_size < self._offset:
            self._reset()  # rewritten (a resume truncates it) or replaced: start over
        self.exists, self._ino = True, st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only; 0 when none is
        for raw in data[:end].split(b"\n")[:-1]:
            self._line += 1
            if raw.strip():
                self._add(self._parse(raw))
        self._offset += end
        self.torn = len(data) - end if data[end:].strip() else 0
        return self

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}: line {self._line} is not JSON ({e}); expected one JSON object per "
                            f"line, as ddpm train writes") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise DataError(f"{self.path}: line {self._line} is not a metrics record; expected a JSON object with "
                            f"an integer \"step\", as ddpm train writes")
        return rec

    def _add(self, rec: dict[str, Any]) -> None:
        for k, v in rec.items():
            col = self.columns.get(k)
            if col is None:
                col = self.columns[k] = [math.nan] * self.count
            col.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
        self.count += 1
        for col in self.columns.values():
            if len(col) < self.count:
                col.append(math.nan)

    def array(self, name: str) -> np.ndarray:
        """float64 [count] of one column (all NaN when no record has it)."""
        col = self.columns.get(name)
        return np.full(self.count, np.nan) if col is None else np.asarray(col, dtype=np.float64)

    def has(self, name: str) -> bool:
        """Whether any record holds a finite value for ``name``."""
        return bool(np.isfinite(self.array(name)).any()) if self.count else False

    def last(self, name: str) -> float | None:
        """The last finite value of a column, or None."""
        a = self.array(name)
        ok = np.flatnonzero(np.isfinite(a))
        return float(a[ok[-1]]) if ok.size else None


def read_metrics(path: str | os.PathLike) -> MetricsLog:
    """A :class:`MetricsLog` of the whole file."""
    return MetricsLog(path).refresh()


def decimate(x: Sequence[float], y: Sequence[float], max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of the curve (x, y) that look like all of it.

    Non-finite y are dropped. When more points remain, x is cut into ``max_points // 2`` buckets
    of equal counts and each bucket keeps its minimum and its maximum in x order (a spike
    survives thinning); the first and last points are always kept.

    Returns:
        (x, y): float64 [<= max_points], x non-decreasing when the input's is.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(x)
    x, y = x[ok], y[ok]
    n = x.size
    if n <= max_points:
        return x, y
    buckets = max(1, (max_points - 2) // 2)
    edges = np.linspace(1, n - 1, buckets + 1).astype(np.int64)  # interior points; ends kept separately
    keep = [0, n - 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi <= lo:
            continue
        seg = y[lo:hi]
        keep += [lo + int(np.argmin(seg)), lo + int(np.argmax(seg))]
    idx = np.unique(np.asarray(keep, dtype=np.int64))
    return x[idx], y[idx]


def smoothing_weight(n: int) -> float:
    """The EMA weight for a curve of ``n`` points: an effective window of about n/60 points."""
    window = max(1.0, n / 60.0)
    return 1.0 - 1.0 / window


def smooth(y: Sequence[float], weight: float | None = None) -> np.ndarray:
    """Debiased exponential moving average (NaNs skipped and kept as NaN).

    s_k = w s_{k-1} + (1 - w) y_k, reported as s_k / (1 - w^m) with m the finite points so far,
    so the start is not pulled towards 0.
    """
    y = np.asarray(y, dtype=np.float64)
    w = smoothing_weight(int(np.isfinite(y).sum())) if weight is None else float(weight)
    out = np.full_like(y, np.nan)
    s, m = 0.0, 0
    for i, v in enumerate(y):
        if not math.isfinite(v):
            continue
        m += 1
        s = w * s + (1.0 - w) * v
        out[i] = s / (1.0 - w ** m) if w > 0 else v
    return out
