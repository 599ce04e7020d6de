"""Line charts as inline SVG (no script, no network): the report's plots.

:func:`line_chart` draws one or more :class:`Series` on shared axes (linear or log), thinned to
at most ``max_points`` points each by :func:`ddpm.report.metrics.decimate`, and returns a
``<figure>`` holding the title, the SVG (a ``viewBox``, so it scales to any width) and an HTML
legend. A chart with nothing to draw returns a short sentence instead of empty axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fmt import esc
from .metrics import decimate

__all__ = ["Series", "line_chart", "PALETTE", "nice_ticks", "log_ticks"]

# Colour-blind-safe (Okabe-Ito, then Tol's muted).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#332288", "#882255", "#117733",
           "#999933")

W, H = 400, 250                 # viewBox units
LEFT, RIGHT, TOP, BOTTOM = 56, 20, 10, 38


@dataclass
class Series:
    """One curve: x and y float arrays of one length (NaN points are skipped)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    dash: bool = False
    width: float = 1.6
    markers: bool = False
    opacity: float = 1.0


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi], about ``n`` of them (whole
    numbers only when ``integer``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    mults = (1, 2, 5, 10, 20) if integer else (1, 2, 2.5, 5, 10, 20)  # 2.5 x 10^0 would give x.5 steps
    for m in mults:  # the finest round step that gives at most n + 1 ticks
        step = m * mag
        if math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1 <= n + 1:
            break
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decades in [lo, hi] (lo > 0), with 2 and 5 between them when fewer than 3 decades show."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if b - a > 2 else (1, 2, 5)
    out = [m * 10.0 ** e for e in range(a, b + 1) for m in mults if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
    if len(out) < 2:  # less than a decade: fall back to round linear values inside it
        out = [v for v in nice_ticks(lo, hi, 4) if v > 0]
    return out


def tick_label(v: float) -> str:
    """Compact: 800000 -> "800k", 1.5e6 -> "1.5M", 0.0005 -> "0.0005", 1.5e-05, 0.25 -> "0.25"."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"  # 0.0005, 1.5e-05: one style per axis


class _Axis:
    def __init__(self, lo: float, hi: float, log: bool, a: float, b: float, integer: bool = False):
        self.integer = integer
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:  # a flat line: give it room
            pad = abs(lo) * 0.05 or 0.5
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi, self.log, self.a, self.b = lo, hi, log, a, b

    def __call__(self, v: np.ndarray | float) -> np.ndarray | float:
        v = np.log10(v) if self.log else v
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        lo, hi = (10 ** self.lo, 10 ** self.hi) if self.log else (self.lo, self.hi)
        return log_ticks(lo, hi) if self.log else nice_ticks(lo, hi, integer=self.integer)


def _points(s: Series, logx: bool, logy: bool, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(s.x, dtype=np.float64)
    y = np.asarray(s.y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if logx:
        ok &= x > 0
    if logy:
        ok &= y > 0
    return decimate(x[ok], y[ok], max_points)


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, logx: bool = False,
               logy: bool = False, max_points: int = 2000, empty: str = "nothing to plot yet",
               note: str = "") -> str:
    """A ``<figure class="chart">``: title, SVG plot, legend (when more than one series), ``note``
    under it. With no finite point at all: a ``<figure class="chart empty">`` saying ``empty``."""
    pts = [(s, *_points(s, logx, logy, max_points)) for s in series]
    pts = [(s, x, y) for s, x, y in pts if x.size]
    if not pts:
        return (f'<figure class="chart empty"><figcaption>{esc(title)}</figcaption>'
                f'<p class="missing">{esc(empty)}</p></figure>')
    xs = np.concatenate([x for _, x, _ in pts])
    ys = np.concatenate([y for _, _, y in pts])
    ax = _Axis(float(xs.min()), float(xs.max()), logx, LEFT, W - RIGHT, integer=bool(np.all(xs == np.round(xs))))
    ay = _Axis(float(ys.min()), float(ys.max()), logy, H - BOTTOM, TOP)
    out = [f'<figure class="chart"><figcaption>{esc(title)}</figcaption>',
           f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">']
    out.append(_axes(ax, ay, xlabel, ylabel))
    for i, (s, x, y) in enumerate(pts):
        color = s.color or PALETTE[i % len(PALETTE)]
        px, py = ax(x), ay(y)
        d = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))
        dash = ' stroke-dasharray="5 3"' if s.dash else ""
        op = f' stroke-opacity="{s.opacity:g}"' if s.opacity < 1 else ""
        if x.size > 1:
            out.append(f'<polyline class="line" fill="none" stroke="{color}" stroke-width="{s.width:g}"{dash}{op} '
                       f'points="{d}"><title>{esc(s.label)}</title></polyline>')
        if s.markers or x.size == 1:
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{color}"><title>{esc(s.label)}: '
                    f'{tick_label(xv)}, {yv:.4g}</title></circle>' for a, b, xv, yv in zip(px, py, x, y)]
    out.append("</svg>")
    labelled = [(s, PALETTE[i % len(PALETTE)]) for i, (s, _, _) in enumerate(pts)]
    if len(labelled) > 1:
        out.append('<div class="legend">' + "".join(
            f'<span><i style="background:{s.color or c}{";opacity:0.5" if s.opacity < 1 else ""}"></i>'
            f'{esc(s.label)}</span>' for s, c in labelled) + "</div>")
    if note:
        out.append(f'<p class="note">{esc(note)}</p>')
    out.append("</figure>")
    return "".join(out)


def _axes(ax: _Axis, ay: _Axis, xlabel: str, ylabel: str) -> str:
    g = ['<g class="axes" font-size="12" fill="#555">']
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    for v in ay.ticks():
        y = float(ay(v))
        if y1 - 0.5 <= y <= y0 + 0.5:
            g.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{esc(tick_label(v))}</text>')
    for v in ax.ticks():
        x = float(ax(v))
        if x0 - 0.5 <= x <= x1 + 0.5:
            g.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y0}" stroke="#eeeeee"/>'
                     f'<text x="{x:.1f}" y="{y0 + 15}" text-anchor="middle">{esc(tick_label(v))}</text>')
    g.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#999"/>')
    g.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{H - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    g.append(f'<text transform="translate(12 {(y0 + y1) / 2:.0f}) rotate(-90)" text-anchor="middle">'
             f'{esc(ylabel)}</text>')
    g.append("</g>")
    return "".join(g)
