"""The report page: one self-contained HTML file for one run or several side by side.

Nothing is fetched from the network: the charts are inline SVG (:mod:`ddpm.report.svg`), the
sample grids are PNGs embedded as base64 ``data:`` URLs, the style and the little script are
inline. The script does two things: the slider over the sample grids, and, when the page is
served by ``ddpm report --serve`` for a live run, polling ``version`` (a tiny JSON) every few
seconds and reloading when the run folder changed; it stops polling once the run is not live.

Sections: status, training curves, sample grids, evaluation results, config and plan. What is
not there yet is said in words ("no evaluation yet"), never shown as an empty plot.
"""

from __future__ import annotations

import base64
import datetime
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_text
from .evals import Markup, render_result, table
from .fmt import duration, esc, num
from .results import headline
from .runfolder import RunData, differing_keys, flatten_config, param_count
from .svg import PALETTE, Series, line_chart
from .static import CSS, SCRIPT

__all__ = ["build_html", "write_report", "run_labels", "MAX_GRIDS", "GRID_BYTES"]

MAX_GRIDS = 24            # sample grids embedded per run (evenly spaced, always the last)
GRID_BYTES = 8 << 20      # and at most this many PNG bytes per run
QUARTILES = ("t in [0, T/4): least noise", "[T/4, T/2)", "[T/2, 3T/4)", "[3T/4, T): most noise")


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """A row name per run: the config keys that differ between the runs ("model.ch=64,
    train.lr=0.0001"), else the folder name (also when two runs' configs are the same)."""
    if len(runs) < 2:
        return [r.name for r in runs]
    keys = differing_keys([r.config for r in runs])
    labels = []
    for r in runs:
        flat = flatten_config(r.config)
        labels.append(", ".join(f"{k}={num(flat.get(k, '–'))}" for k in keys) or r.name)
    if len(set(labels)) < len(labels):  # identical configs: the folder names tell them apart
        labels = [f"{r.name}: {lab}" if lab != r.name else r.name for r, lab in zip(runs, labels)]
    return labels


# ---------------------------------------------------------------------------------------------- status

def _status_rows(run: RunData, now: float) -> list[list]:
    s, m = run.status, run.metrics
    rows = [["state", Markup(f'<span class="badge {s.state.replace(" ", "-")}">{esc(s.state)}</span> '
                             f'{esc(s.headline())}')]]
    if s.total_steps and s.step is not None:
        pct = min(100.0, 100.0 * s.step / s.total_steps)
        rows.append(["progress", Markup(f'<progress max="100" value="{pct:.2f}"></progress> {pct:.3g}%')])
    if s.checkpoint:
        age = f", written {duration(now - s.checkpoint_time)} ago" if s.checkpoint_time else ""
        rows.append(["last checkpoint", f"{s.checkpoint} (step {num(s.checkpoint_step)}{age})"])
    else:
        rows.append(["last checkpoint", "none yet"])
    if s.steps_per_s:
        rows.append(["speed", f"{s.steps_per_s:.3g} steps/s" + (
            f", {m.last('images_per_s'):.4g} images/s" if m.last("images_per_s") else "")])
    if s.eta_s is not None:
        rows.append(["time left", f"about {duration(s.eta_s)} (at the speed of the last records)"])
    if s.updated is not None:
        rows.append(["last record", f"{duration(now - s.updated)} ago"])
    if m.last("elapsed_s") is not None:
        rows.append(["training time (this session)", duration(m.last("elapsed_s"))])
    skipped = m.last("skipped_nonfinite")
    rows.append(["non-finite steps skipped", num(int(skipped)) if skipped is not None else "–"])
    mem = _memory_text(run)
    if mem:
        rows.append(["peak memory", mem])
    if s.how:
        rows.append(["how the state was read", s.how])
    return rows


def _memory_text(run: RunData) -> str:
    m = run.metrics
    bits = []
    if m.last("cuda_max_mb") is not None:
        bits.append(f"{m.last('cuda_max_mb'):,.0f} MiB on the GPU (torch.cuda.max_memory_allocated)")
    if m.last("max_rss_mb") is not None:
        bits.append(f"{m.last('max_rss_mb'):,.0f} MiB resident (process peak)")
    return "; ".join(bits)


def _status_section(runs: Sequence[RunData], labels: Sequence[str], now: float) -> str:
    if len(runs) == 1:
        run = runs[0]
        notes = "".join(f'<p class="warn">{esc(n)}</p>' for n in run.notes)
        return table(["", ""], _status_rows(run, now), cls="kv") + notes
    rows = []
    for r, lab in zip(runs, labels):
        s = r.status
        rows.append([Markup(f'<span class="swatch" style="background:{_color(runs.index(r))}"></span>{esc(lab)}'),
                     Markup(f'<span class="badge {s.state.replace(" ", "-")}">{esc(s.state)}</span>'),
                     s.step, s.total_steps, s.steps_per_s, duration(s.eta_s) if s.eta_s is not None else None,
                     s.checkpoint or "none", str(r.root)])
    notes = "".join(f'<p class="warn">{esc(r.name)}: {esc(n)}</p>' for r in runs for n in r.notes)
    return table(["run", "state", "step", "of", "steps/s", "time left", "last checkpoint", "folder"], rows) + notes


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------------------------------------- curves

def _curves(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    if not any(r.metrics.count for r in runs):
        why = "no metrics yet" + (" (train.log_every=0 writes none)"
                                  if all((r.config.get("train") or {}).get("log_every") == 0 for r in runs) else
                                  ": the trainer writes a record every train.log_every steps")
        return f'<p class="missing">{esc(why)}</p>'
    multi = len(runs) > 1
    charts = []
    loss = []
    for i, (r, lab) in enumerate(zip(runs, labels)):
        st, y = r.metrics.array("step"), r.metrics.array("loss")
        if not multi:
            loss.append(Series("raw (mean over each log window)", st, y, color="#9ab", width=1.0, opacity=0.7))
        loss.append(Series("smoothed" if not multi else lab, st, _smooth(y), color=_color(i), width=2.0))
    charts.append(line_chart(loss, title="Training loss (L_simple, per example, log scale)", xlabel="step",
                             ylabel="loss", logy=True))
    if multi:
        for q, name in enumerate(QUARTILES):
            charts.append(line_chart([Series(lab, r.metrics.array("step"), _smooth(r.metrics.array(f"loss_q{q}")),
                                             color=_color(i)) for i, (r, lab) in enumerate(zip(runs, labels))],
                                     title=f"Loss, {name} (smoothed)", xlabel="step", ylabel="loss", logy=True,
                                     empty="no per-quartile losses in these metrics"))
    else:
        r = runs[0]
        charts.append(line_chart([Series(f"q{q}: {name}", r.metrics.array("step"), _smooth(r.metrics.array(f"loss_q{q}")),
                                         color=PALETTE[q]) for q, name in enumerate(QUARTILES)],
                                 title="Loss by timestep quartile (smoothed, log scale)", xlabel="step", ylabel="loss",
                                 logy=True, empty="no per-quartile losses in these metrics",
                                 note="Why L_simple works (paper section 3.4): it down-weights the small-t terms, "
                                      "which are the easy ones."))
    for key, title, ylabel, logy in (("lr", "Learning rate", "lr", False),
                                     ("grad_norm", "Gradient norm before clipping", "global L2 norm", True),
                                     ("images_per_s", "Throughput", "images/s", False),
                                     ("max_rss_mb", "Peak resident memory", "MiB", False),
                                     ("cuda_max_mb", "Peak GPU memory (allocated)", "MiB", False)):
        if not any(r.metrics.has(key) for r in runs):
            continue
        charts.append(line_chart([Series(lab, r.metrics.array("step"), r.metrics.array(key), color=_color(i))
                                  for i, (r, lab) in enumerate(zip(runs, labels))],
                                 title=title, xlabel="step", ylabel=ylabel, logy=logy))
    skipped = [r.metrics.array("skipped_nonfinite") for r in runs]
    if any(np.nanmax(s, initial=0) > 0 for s in skipped if s.size):
        charts.append(line_chart([Series(lab, r.metrics.array("step"), s, color=_color(i))
                                  for i, (r, lab, s) in enumerate(zip(runs, labels, skipped))],
                                 title="Non-finite steps skipped (cumulative)", xlabel="step", ylabel="steps"))
        extra = ""
    else:
        extra = '<p class="note">No non-finite loss or gradient: no step was skipped.</p>'
    return '<div class="charts">' + "".join(charts) + "</div>" + extra


def _smooth(y: np.ndarray) -> np.ndarray:
    from .metrics import smooth

    return smooth(y)


# ---------------------------------------------------------------------------------------------- samples

def _pick_grids(samples: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """At most MAX_GRIDS evenly spaced grids (the last always), within GRID_BYTES."""
    if not samples:
        return []
    sizes = []
    for _, p in samples:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(0)
    avg = max(1, int(np.mean(sizes)))
    k = max(1, min(MAX_GRIDS, len(samples), GRID_BYTES // avg))
    idx = sorted(set(np.linspace(len(samples) - 1, 0, k).round().astype(int).tolist()))
    return [samples[i] for i in idx]


def _data_url(p: Path) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")
    except OSError:
        return None


def _grid_viewer(run: RunData, label: str) -> str:
    picked = _pick_grids(run.samples)
    if not picked:
        every = (run.config.get("train") or {}).get("sample_every")
        why = ("train.sample_every=0: this run writes no sample grids" if every == 0 else
               f"no samples yet (a grid of EMA samples is written every {num(every)} steps)" if every else
               "no samples yet")
        return f'<p class="missing">{esc(why)}</p>'
    figs = []
    for step, p in picked:
        url = _data_url(p)
        if url is None:
            continue
        figs.append(f'<figure data-label="step {step:,}"><img src="{url}" alt="EMA samples at step {step:,}">'
                    f"<figcaption>step {step:,}</figcaption></figure>")
    omitted = len(run.samples) - len(figs)
    note = (f'<p class="note">{len(figs)} of {len(run.samples)} grids shown (evenly spaced; the newest always); '
            f"all are in {esc(str(run.root / 'samples'))}</p>" if omitted > 0 else "")
    slider = (f'<label class="slider">grid <input type="range" min="0" max="{len(figs) - 1}" value="{len(figs) - 1}" '
              f'step="1" aria-label="sample grid of {esc(label)}"> <output></output></label>' if len(figs) > 1 else "")
    return f'<div class="grids">{slider}<div class="frames">{"".join(figs)}</div></div>{note}'


def _samples_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    if len(runs) == 1:
        return _grid_viewer(runs[0], labels[0])
    return '<div class="side">' + "".join(f'<div><h3>{esc(lab)}</h3>{_grid_viewer(r, lab)}</div>'
                                         for r, lab in zip(runs, labels)) + "</div>"


# ---------------------------------------------------------------------------------------------- results

NO_EVAL = ("no evaluation yet: e.g. ddpm eval nll --ckpt {root} --out {root}/nll.json, "
           "ddpm eval quality --ckpt {root} --out {root}/quality.json; every result JSON in the run folder shows here")


def _results_section(runs: Sequence[RunData], labels: Sequence[str], now: float) -> str:
    parts = []
    if len(runs) > 1:
        cols: dict[str, None] = {"final loss (smoothed)": None}
        per_run = []
        for r in runs:
            vals = {"final loss (smoothed)": _final_smoothed(r)}
            for res in r.results:
                for k, v in headline(res).items():
                    vals.setdefault(k, v)  # the first file of a kind (sorted by path) when several
                    cols.setdefault(k)
            per_run.append(vals)
        parts.append(table(["run", *cols], [[lab, *(v.get(c) for c in cols)] for lab, v in zip(labels, per_run)]))
    for r, lab in zip(runs, labels):
        body = "".join(render_result(res, r.root, now) for res in r.results)
        if not body:
            body = f'<p class="missing">{esc(NO_EVAL.format(root=r.root))}</p>'
        parts.append(f"<details open><summary>{esc(lab)}</summary>{body}</details>" if len(runs) > 1 else body)
    return "".join(parts)


def _final_smoothed(r: RunData) -> float | None:
    y = _smooth(r.metrics.array("loss"))
    ok = np.flatnonzero(np.isfinite(y))
    return float(y[ok[-1]]) if ok.size else None


# ---------------------------------------------------------------------------------------------- config

def _plan_lines(run: RunData) -> list[str]:
    """The model and training lines of ``ddpm train``'s plan, without its measured warm-up step
    (the parameter count comes from the last checkpoint's header)."""
    try:
        from ..config import Config
        from ..plan import model_lines, run_lines

        c = Config.from_dict(run.config)
        lines = run_lines(c)
        n = param_count(run.root / "checkpoints" / run.status.checkpoint) if run.status.checkpoint else None
        if n is not None:
            lines = model_lines(c, n) + lines
        return lines
    except Exception:  # an older or hand-edited config: the table below still shows it
        return []


def _config_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    if len(runs) == 1:
        r = runs[0]
        if not r.config:
            return '<p class="missing">no config.json in the run folder</p>'
        plan = "".join(f"<li>{esc(x)}</li>" for x in _plan_lines(r))
        flat = flatten_config(r.config)
        return ((f"<ul class=\"plan\">{plan}</ul>" if plan else "")
                + f"<details><summary>config.json: all {len(flat)} keys</summary>"
                + table(["key", "value"], [[k, Markup(esc(num(v)))] for k, v in flat.items()], cls="kv")
                + "</details>")
    keys = differing_keys([r.config for r in runs])
    flats = [flatten_config(r.config) for r in runs]
    diff = (table(["key", *labels], [[k, *(f.get(k) for f in flats)] for k in keys]) if keys else
            '<p class="note">the runs have the same config</p>')
    same = [k for k in flats[0] if k not in keys]
    common = table(["key", "value"], [[k, Markup(esc(num(flats[0][k])))] for k in same], cls="kv")
    return f"<h3>Keys that differ</h3>{diff}<details><summary>Keys all runs share</summary>{common}</details>"


# ---------------------------------------------------------------------------------------------- page

def build_html(runs: Sequence[RunData], *, version: str = "", serve_poll_s: float = 0.0, refresh_s: float = 0.0,
               now: float | None = None) -> str:
    """The whole page.

    Args:
        runs: one or more runs (several: curves overlaid, one results table).
        version: the run folders' fingerprint (see :func:`ddpm.report.server.fingerprint`); the
            served page reloads when the server's differs.
        serve_poll_s: > 0 when the page is served: poll ``version`` this often while a run is live.
        refresh_s: > 0 for a file written during training: reload after this many seconds
            (``<meta http-equiv="refresh">``) while the run is live.
    """
    now = time.time() if now is None else now
    labels = run_labels(runs)
    live = any(r.status.live for r in runs)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(r.name for r in runs)
    when = datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
    head = ['<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>ddpm report: {esc(title)}</title>", '<link rel="icon" href="data:,">',  # no favicon request
            f"<style>{CSS}</style>"]
    if refresh_s > 0 and live:
        head.append(f'<meta http-equiv="refresh" content="{int(refresh_s)}">')
    states = [r.status.state for r in runs]
    status_line = runs[0].status.headline() if len(runs) == 1 else ", ".join(
        f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    state = runs[0].status.state if len(runs) == 1 else ("running" if live else "stopped")
    sections = [("status", "Status", _status_section(runs, labels, now)),
                ("training", "Training", _curves(runs, labels)),
                ("samples", "Samples during training", _samples_section(runs, labels)),
                ("evaluation", "Evaluation", _results_section(runs, labels, now)),
                ("config", "Config and plan", _config_section(runs, labels))]
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{html}</section>' for sid, name, html in sections)
    live_note = ""
    if live and serve_poll_s > 0:
        live_note = f" · live: this page reloads when the run folder changes (checked every {serve_poll_s:g} s)"
    elif live and refresh_s > 0:
        live_note = f" · live: rewritten by the trainer every {duration(refresh_s)}; this page reloads itself"
    folders = ", ".join(str(r.root) for r in runs)
    return ("<!doctype html>\n<html lang=\"en\"><head>" + "".join(head) + "</head>"
            f'<body data-version="{esc(version)}" data-live="{int(live)}" data-poll="{serve_poll_s:g}">'
            f'<header><h1>{esc(title)}</h1><p class="headline {esc(state.replace(" ", "-"))}">{esc(status_line)}</p>'
            f'<p class="meta">report of {esc(folders)} written {esc(when)}{esc(live_note)}</p>'
            f"<nav>{nav}</nav></header><main>{body}</main>"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_report(runs: Sequence[RunData], out: str | os.PathLike, **kwargs) -> Path:
    """:func:`build_html` written atomically to ``out`` (ddpm.atomic); returns the path."""
    out = Path(out)
    atomic_write_text(out, build_html(runs, **kwargs))
    return out
