"""Result rows, the printed/written table and the JSON file of a benchmark run."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timing import Timing


@dataclass
class Row:
    """One implementation's timing of one piece of work.

    ``per_call`` is what one timed call did (e.g. 1 training step, or k sampling steps);
    ``scale`` converts seconds per call into the reported throughput (e.g. steps/s = 1/s;
    images/s over a 1000-step chain = B·k/1000 / s). ``ratio_*`` = baseline time / this time
    (> 1: faster than the baseline), None for the baseline itself or when there is none;
    ``ratio_cpu`` compares median process CPU times (see timing.py).
    """

    section: str
    work: str
    impl: str
    variant: str
    median_s: float
    min_s: float
    throughput: float
    throughput_unit: str
    ratio_median: float | None = None
    ratio_min: float | None = None
    cpu_median_s: float | None = None
    ratio_cpu: float | None = None
    baseline: str | None = None
    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def rows_from(section: str, work: str, timings: dict[str, Timing], scale: float, unit: str,
              baseline: str | None, labels: dict[str, tuple[str, str]], notes: dict[str, dict] | None = None
              ) -> list[Row]:
    """Rows for every timing; ``labels[name] = (impl, variant)``; throughput = scale / median."""
    base = timings.get(baseline) if baseline else None
    rows = []
    for name, tm in timings.items():
        impl, variant = labels[name]
        r = Row(section, work, impl, variant, tm.median, tm.min, scale / tm.median, unit,
                cpu_median_s=tm.cpu_median, times_s=[round(v, 4) for v in tm.times],
                cpu_times_s=[round(v, 4) for v in tm.cpu_times], warmup_s=[round(v, 4) for v in tm.warmup],
                notes=dict((notes or {}).get(name, {})))
        if base is not None and name != baseline:
            r.ratio_median, r.ratio_min = base.median / tm.median, base.min / tm.min
            if base.cpu_median and tm.cpu_median:
                r.ratio_cpu = base.cpu_median / tm.cpu_median
            r.baseline = f"{labels[baseline][0]} {labels[baseline][1]}"
        rows.append(r)
    return rows


def _fmt(v: float | None, nd: int = 2) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.{nd}f}"
    return f"{v:.3g}"


def table(rows: list[Row]) -> str:
    """A fixed-width text table (also valid Markdown)."""
    head = ["section", "work", "impl", "variant", "median s", "min s", "throughput", "x base (median)",
            "x base (min)", "x base (cpu)"]
    body = [[r.section, r.work, r.impl, r.variant, _fmt(r.median_s, 3), _fmt(r.min_s, 3),
             f"{_fmt(r.throughput)} {r.throughput_unit}", _fmt(r.ratio_median), _fmt(r.ratio_min), _fmt(r.ratio_cpu)]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def result_path(out: str | Path | None, stem: str) -> Path:
    """``out``, or bench_results/<stem>_<time>.json; its folder is created."""
    path = Path(out or f"bench_results/{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written aside and renamed (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def write(out_dir: str | Path, rows: list[Row], meta: dict[str, Any]) -> tuple[Path, Path]:
    """bench_results/bench_<time>.json and .md (the table); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    js, md = out / f"bench_{stamp}.json", out / f"bench_{stamp}.md"
    js.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=1) + "\n")
    md.write_text(f"# benchmark {stamp}\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n{table(rows)}\n")
    return js, md
