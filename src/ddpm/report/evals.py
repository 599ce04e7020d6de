"""Evaluation results as HTML tables and SVG charts, one renderer per kind of result
(:mod:`ddpm.report.results`). Each takes a :class:`~ddpm.report.results.Result` and returns HTML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .fmt import esc, num
from .results import Result, describe_path
from .svg import Series, line_chart

__all__ = ["render_result", "table", "TITLES"]

TITLES = {
    "nll": "Bits/dim (the variational bound, paper Eq. 5 and Table 2)",
    "analytic": "Bits/dim with Analytic-DPM's variance (Bao et al. 2022)",
    "gamma": "Analytic-DPM statistics Γ_n",
    "rd": "Rate–distortion (paper section 4.3, Fig. 5)",
    "steps": "Sample quality against network calls",
    "guidance": "Classifier-free guidance: fidelity against diversity",
    "quality": "Digits sample quality",
    "fid": "FID / Inception score",
}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """An HTML table in a horizontally scrolling wrapper (numbers formatted by :func:`num`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else esc(num(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


class Markup(str):
    """A table cell that is already HTML."""


def pm(mean: Any, err: Any) -> Markup:
    """ "3.75 ± 0.01" (the error dropped when missing)."""
    if err is None or (isinstance(err, float) and not math.isfinite(err)):
        return Markup(esc(num(mean)))
    return Markup(f"{esc(num(mean))} ± {esc(num(err, 2))}")


def _nll(r: Result) -> str:
    d = r.data
    meta = d.get("meta") or {}
    rows = [["images", d.get("n")], ["total (bits/dim)", pm(d.get("total_bpd"), d.get("total_bpd_stderr"))],
            ["prior L_T", d.get("prior_bpd")], ["decoder L_0 (distortion)", d.get("decoder_bpd")],
            ["rate L_1..L_T", d.get("rate_bpd")], ["timesteps T", d.get("num_timesteps", len(d["terms_bpd"]))]]
    rows += [[k, v] for k, v in meta.items() if isinstance(v, (int, float, str, bool))]
    terms = np.asarray(d["terms_bpd"], dtype=np.float64)
    t = np.arange(1, terms.size + 1)
    chart = line_chart([Series("L_t", t, terms)], title="VLB term per timestep (bits/dim; t = 1 is L_0)",
                       xlabel="t", ylabel="bits/dim", logy=True)
    mse = np.asarray(d["mse"], dtype=np.float64)
    chart2 = line_chart([Series("x0 RMSE", t, 127.5 * np.sqrt(np.maximum(mse, 0)))],
                        title="x̂0 error from x_t (RMSE, 0–255 scale)", xlabel="t", ylabel="RMSE")
    return table(["", "value"], rows) + f'<div class="charts">{chart}{chart2}</div>'


def _analytic(r: Result) -> str:
    d = r.data
    rows = [[k, pm(d[k].get("total_bpd"), d[k].get("stderr"))] for k in ("analytic", "fixedlarge", "fixedsmall")]
    rows += [[f"paired {k}", pm(v.get("mean"), v.get("stderr"))] for k, v in (d.get("paired") or {}).items()]
    intro = f"<p>{esc(num(d.get('n')))} images, {esc(num(d.get('steps')))}-step chain" + (
        f", data {esc(d['data'])}" if d.get("data") else "") + ".</p>"
    return intro + table(["reverse variance", "bits/dim"], rows)


def _gamma(r: Result) -> str:
    series = []
    for e in r.data["entries"]:
        g = np.asarray(e["gamma"], dtype=np.float64)
        label = f"{e.get('checkpoint', '?')} (T={e.get('T', g.size)}, {e.get('n', '?')} images)"
        series.append(Series(label, np.arange(g.size), g))
    return '<div class="charts">' + line_chart(series, title="Γ_n = E‖ε_θ(x_n, n)‖²/d", xlabel="n (0-based)",
                                               ylabel="Γ_n") + "</div>"


def _rd(r: Result) -> str:
    rows = r.data
    steps = np.array([x["reverse_steps"] for x in rows], dtype=np.float64)
    rate = np.array([x["rate_bpd"] for x in rows], dtype=np.float64)
    dist = np.array([x["distortion_rmse"] for x in rows], dtype=np.float64)
    every = max(1, len(rows) // 10)
    shown = [x for x in rows if x["reverse_steps"] % every == 0 or x is rows[-1]]
    tab = table(["reverse steps (T−t+1)", "rate (bits/dim)", "distortion (RMSE, 0–255)"],
                [[x["reverse_steps"], x["rate_bpd"], x["distortion_rmse"]] for x in shown])
    charts = [line_chart([Series("distortion", steps, dist)], title="Distortion against reverse steps",
                         xlabel="reverse process steps", ylabel="RMSE (0–255)"),
              line_chart([Series("rate", steps, rate)], title="Rate against reverse steps",
                         xlabel="reverse process steps", ylabel="bits/dim"),
              line_chart([Series("distortion", rate, dist)], title="Distortion against rate",
                         xlabel="rate (bits/dim)", ylabel="RMSE (0–255)")]
    return tab + '<div class="charts">' + "".join(charts) + "</div>"


def _steps_label(row: dict) -> str:
    if row.get("full"):
        return f"ancestral, full {row.get('nfe')}-step chain"
    extra = [str(row.get("spacing", "")), "clip" if row.get("clip", True) else "no clip"]
    if row.get("var") == "analytic":
        extra.append("analytic var")
    return f"{row['sampler']} ({', '.join(e for e in extra if e)})"


def _steps(r: Result) -> str:
    rows = r.data["rows"]
    metric = rows[0].get("metric", "quality")
    tab = table(["sampler", "NFE", "steps", f"{metric} (lower is better)", "s/image", "images"],
                [[_steps_label(x), x["nfe"], x.get("steps"), x["quality"], x.get("seconds_per_image"), x.get("n")]
                 for x in rows])
    groups: dict[str, list[dict]] = {}
    for x in rows:
        groups.setdefault(_steps_label(x), []).append(x)
    series = []
    for label, xs in groups.items():
        xs = sorted(xs, key=lambda x: x["nfe"])
        series.append(Series(label, [x["nfe"] for x in xs], [x["quality"] for x in xs], markers=True,
                             dash=bool(xs[0].get("full"))))
    chart = line_chart(series, title=f"{metric} against network calls per image", xlabel="NFE (log scale)",
                       ylabel=metric, logx=True)
    return tab + f'<div class="charts">{chart}</div>'


def _guidance(r: Result) -> str:
    rows = sorted(r.data["rows"], key=lambda x: x["guidance"])
    tab = table(["W", "agreement", "Fréchet distance", "confidence", "balance", "images"],
                [[x["guidance"], x["agreement"], x["fd"], x.get("confidence"), x.get("balance"), x.get("n")]
                 for x in rows])
    w = [x["guidance"] for x in rows]
    charts = [line_chart([Series("agreement", w, [x["agreement"] for x in rows], markers=True)],
                         title="Agreement with the requested class", xlabel="guidance weight W", ylabel="agreement"),
              line_chart([Series("FD", w, [x["fd"] for x in rows], markers=True, color="#d55e00")],
                         title="Fréchet distance (digits features)", xlabel="guidance weight W", ylabel="FD")]
    conv = (r.data.get("meta") or {}).get("convention")
    return (f'<p class="note">{esc(conv)}</p>' if conv else "") + tab + '<div class="charts">' + "".join(charts) + "</div>"


def _quality(r: Result) -> str:
    d = r.data
    ref = (d.get("reference") or {}).get("train_vs_test") or {}
    noise = (d.get("reference") or {}).get("noise_vs_test") or {}
    rows = [["Fréchet distance (lower is better)", d.get("fd"), ref.get("fd"), noise.get("fd")],
            ["classifier confidence", d.get("confidence"), ref.get("confidence"), noise.get("confidence")],
            ["class balance", d.get("balance"), ref.get("balance"), noise.get("balance")],
            ["images", d.get("n"), ref.get("n"), noise.get("n")]]
    if "agreement" in d:
        rows.append(["agreement with the requested class", d.get("agreement"), None, None])
    tab = table(["", "samples", "real train digits", "uniform noise"], rows)
    hist = d.get("class_histogram")
    extra = f'<p class="note">class histogram 0..9: {esc(num(hist))}</p>' if hist else ""
    return tab + extra


def _fid(r: Result) -> str:
    d = r.data
    rows = [["FID (lower is better)", d.get("fid")], ["Inception score", pm(d.get("is_mean"), d.get("is_std"))],
            ["KID", pm(d.get("kid_mean"), d.get("kid_std"))], ["samples", d.get("n_samples")],
            ["reference images", d.get("n_reference")], ["reference", d.get("reference")],
            ["feature extractor", d.get("extractor")]]
    return table(["", "value"], rows)


RENDERERS: dict[str, Callable[[Result], str]] = {
    "nll": _nll, "analytic": _analytic, "gamma": _gamma, "rd": _rd, "steps": _steps, "guidance": _guidance,
    "quality": _quality, "fid": _fid,
}


def render_result(r: Result, root: Path, now: float) -> str:
    """One result as an ``<article>``: a heading (kind and file), then its tables and charts."""
    from .fmt import duration

    head = (f'<h3>{esc(TITLES[r.kind])}</h3><p class="file"><code>{esc(describe_path(r.path, root))}</code>, '
            f"written {esc(duration(now - r.mtime))} ago</p>")
    try:
        body = RENDERERS[r.kind](r)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a hand-edited or partial file
        body = f'<p class="missing">could not show this file ({esc(type(e).__name__)}: {esc(e)})</p>'
    return f'<article class="result result-{r.kind}">{head}{body}</article>'
