"""Small formatting helpers shared by the report's modules: durations, numbers, HTML escaping."""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["duration", "num", "esc"]


def duration(s: float) -> str:
    """Seconds as "42 s", "7 min", "3 h 5 min", "2 d 4 h"."""
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    m = s / 60
    if m < 90:
        return f"{m:.0f} min"
    h, m = divmod(int(m), 60)
    if h < 48:
        return f"{h} h {m} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def num(v: Any, digits: int = 4) -> str:
    """A table cell: integers with thousands separators, floats to ``digits`` significant
    digits, None/NaN as an en dash, anything else as text."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(num(x, digits) for x in v)
    return str(v)


def esc(s: Any) -> str:
    """HTML-escaped text (quotes too: safe inside attributes)."""
    return html.escape(str(s), quote=True)
