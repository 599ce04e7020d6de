"""The run report: one self-contained HTML page per run (or several runs side by side).

    metrics.py    metrics.jsonl as columns (incremental, torn last line tolerated); decimate, smooth
    results.py    the evaluation JSONs of a run folder, told apart by content
    runfolder.py  one run folder: config, status (running / stopped / finished), grids, results
    svg.py        line charts as inline SVG
    evals.py      evaluation results as tables and charts
    page.py       the page (build_html) and its atomic writer (write_report)
    static.py     the page's inline CSS and script
    server.py     ddpm report --serve: http.server on 127.0.0.1 with live reload

No CLI code here (``ddpm report`` is ``ddpm.commands.report``), and no torch: a report of an
800k-step run is written in well under a second.

    from ddpm.report import read_run, write_report
    write_report([read_run("runs/digits")], "runs/digits/report.html")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .metrics import MetricsLog, decimate, read_metrics, smooth
from .page import build_html, run_labels, write_report
from .runfolder import RunData, RunReader, Status, differing_keys, flatten_config, read_run

__all__ = ["MetricsLog", "decimate", "read_metrics", "smooth", "build_html", "run_labels", "write_report",
           "RunData", "RunReader", "Status", "differing_keys", "flatten_config", "read_run", "report",
           "REPORT_NAME"]

REPORT_NAME = "report.html"


def report(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
           results: Sequence[str | os.PathLike] = ()) -> tuple[Path, list[RunData]]:
    """Read ``runs`` and write their page to ``out`` (default: RUN/report.html of the first run).
    Returns (path, the runs as read)."""
    data = [read_run(r, results) for r in runs]
    path = Path(out) if out is not None else Path(runs[0]) / REPORT_NAME
    return write_report(data, path), data
