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
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["MetricsLog", "read_metrics", "decimate", "smooth", "smoothing_weight"]


BLOCK_BYTES = 8 << 20  # read and parse this much at a time: memory stays bounded for huge logs


class MetricsLog:
    """The records of one metrics.jsonl, as columns.

    Attributes:
        path: the file.
        count: records read.
        torn: bytes of an incomplete last line (0 when the file ends with a newline).
        exists: whether the file exists.
    Columns come from :meth:`array` (float64, NaN where a record lacks the key or holds null).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self._blocks: list[tuple[int, dict[str, np.ndarray]]] = []  # (records, columns) per parsed block
        self._cache: dict[str, np.ndarray] = {}
        self.count = 0
        self.torn = 0
        self.exists = False
        self._offset = 0
        self._line = 0
        self._ino: int | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def names(self) -> list[str]:
        out: dict[str, None] = {}
        for _, cols in self._blocks:
            out.update(dict.fromkeys(cols))
        return list(out)

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
            rest = b""
            while True:
                block = f.read(BLOCK_BYTES)
                if not block:
                    break
                data = rest + block
                end = data.rfind(b"\n") + 1  # complete lines only; 0 when none is
                if end:
                    self._add_block(data[:end])
                    self._offset += end
                rest = data[end:]
        self.torn = len(rest) if rest.strip() else 0
        return self

    def _add_block(self, chunk: bytes) -> None:
        lines = chunk.split(b"\n")[:-1]
        first = self._line
        self._line += len(lines)
        body = [ln for ln in lines if ln.strip()]
        if not body:
            return
        try:  # one C-level parse of the whole block; per line only to name a bad one
            recs = json.loads(b"[" + b",".join(body) + b"]")
        except (ValueError, UnicodeDecodeError):
            recs = None
        if recs is None or not all(type(r) is dict and type(r.get("step")) is int for r in recs):
            recs = [self._parse(ln, first + i + 1) for i, ln in enumerate(lines) if ln.strip()]
        shapes = set(map(tuple, recs))  # key sequences; one in a log written by one trainer version
        if len(shapes) == 1:  # fast path: one 2-D conversion instead of a pass per key
            keys = next(iter(shapes))
            try:
                table = np.array([list(r.values()) for r in recs], dtype=np.float64)
                cols = {k: table[:, i] for i, k in enumerate(keys)}
            except (TypeError, ValueError):  # a text or list value somewhere: column by column
                cols = {k: _column([r.get(k) for r in recs]) for k in keys}
        else:
            union: dict[str, None] = {}
            for keys in shapes:
                union.update(dict.fromkeys(keys))
            cols = {k: _column([r.get(k) for r in recs]) for k in union}
        self._blocks.append((len(recs), cols))
        self.count += len(recs)
        self._cache.clear()

    def _parse(self, raw: bytes, line: int) -> dict[str, Any]:
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}: line {line} is not JSON ({e}); expected one JSON object per "
                            f"line, as ddpm train writes") from None
        if not isinstance(rec, dict) or type(rec.get("step")) is not int:
            raise DataError(f"{self.path}: line {line} is not a metrics record; expected a JSON object with "
                            f"an integer \"step\", as ddpm train writes")
        return rec

    def array(self, name: str) -> np.ndarray:
        """float64 [count] of one column (all NaN when no record has it)."""
        a = self._cache.get(name)
        if a is None:
            parts = [cols.get(name, np.full(n, np.nan)) for n, cols in self._blocks]
            a = self._cache[name] = np.concatenate(parts) if parts else np.zeros(0)
        return a

    def has(self, name: str) -> bool:
        """Whether any record holds a finite value for ``name``."""
        return bool(np.isfinite(self.array(name)).any()) if self.count else False

    def last(self, name: str) -> float | None:
        """The last finite value of a column, or None."""
        a = self.array(name)
        ok = np.flatnonzero(np.isfinite(a))
        return float(a[ok[-1]]) if ok.size else None


def _column(values: list) -> np.ndarray:
    """Numbers (and null) as float64 with NaN for null; anything else (text, lists) as NaN."""
    try:
        return np.array(values, dtype=np.float64)  # None -> NaN
    except (TypeError, ValueError):
        return np.array([float(v) if isinstance(v, (int, float)) else np.nan for v in values], dtype=np.float64)


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
    ok = np.isfinite(y)
    w = smoothing_weight(int(ok.sum())) if weight is None else float(weight)
    out = np.full_like(y, np.nan)
    v = y[ok]
    if w <= 0 or v.size == 0:
        out[ok] = v
        return out
    # The recursion in blocks of B points, each one closed form:
    #   s_{k0+i} = w^(i+1) s_{k0-1} + (1 - w) w^i sum_{j<=i} w^(-j) y_{k0+j},
    # with B no longer than the averaging window 1/(1 - w), so w^(-j) <= e keeps full precision.
    B = int(min(max(1.0, 1.0 / (1.0 - w)), 1 << 16))
    s = np.empty_like(v)
    prev = 0.0
    for k0 in range(0, v.size, B):
        blk = v[k0:k0 + B]
        i = np.arange(blk.size, dtype=np.float64)
        s[k0:k0 + B] = w ** (i + 1) * prev + (1.0 - w) * w ** i * np.cumsum(w ** -i * blk)
        prev = s[k0 + blk.size - 1]
    out[ok] = s / (1.0 - w ** np.arange(1, v.size + 1))
    return out
