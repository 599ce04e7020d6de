"""``ddpm report``: a run folder (or several) as one HTML page, written or served live.

``add_parser(sub)`` declares the subcommand, ``run(args)`` does it. The page itself is
:mod:`ddpm.report`'s business.
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from .args import Formatter

HELP = "an HTML page of a run (or runs side by side): status, curves, sample grids, evaluation results"
DESCRIPTION = (
    "Write one self-contained HTML page (no network: inline SVG plots, embedded PNG grids) of a run folder: "
    "its status (running / stopped / finished, last checkpoint, steps/s, time left), config and plan, the loss "
    "(raw, smoothed, per timestep quartile), learning rate, gradient norm, memory, the sample grids written "
    "during training, and every evaluation result (JSON of ddpm eval ...) in the folder. With several runs: "
    "curves overlaid, results in one table, rows named by the config keys that differ. With --serve: the page "
    "on 127.0.0.1, reloading itself while a run is live (Ctrl-C stops). The trainer also rewrites "
    "RUN/report.html every train.report_every minutes.")


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {s!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {s}")
    return v


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not v >= 0.1:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0.1, got {s!r}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help=HELP, description=DESCRIPTION, formatter_class=Formatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s): the --out of ddpm train")
    p.add_argument("--out", default=None, metavar="FILE.html",
                   help="page to write (default: RUN/report.html of the first RUN)")
    p.add_argument("--results", action="append", default=[], metavar="PATH",
                   help="also show the evaluation results (ddpm eval ... JSON) in this file or folder; repeatable")
    p.add_argument("--serve", action="store_true",
                   help="serve the page on 127.0.0.1 instead of writing it; it reloads itself while a run is live")
    p.add_argument("--port", type=_port, default=8000, help="port for --serve (0: any free port)")
    p.add_argument("--poll", type=_seconds, default=5.0, metavar="SECONDS",
                   help="how often the served page checks the run folder for changes")
    return p


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    if args.out is not None:
        if Path(args.out).suffix.lower() not in (".html", ".htm"):
            raise UserError(f"--out {args.out}: expected an .html file name")
        if Path(args.out).is_dir():
            raise UserError(f"--out {args.out}: is a folder, expected an .html file")
    for p in args.results:
        if not Path(p).exists():
            raise UserError(f"--results {p}: no such file or folder")
    if args.serve:
        if args.out is not None:
            raise UserError("--out and --serve: give one (--serve writes no file)")
        from ..report.server import serve

        serve(args.runs, port=args.port, results=args.results, poll_s=args.poll, log=lambda m: print(m, flush=True))
        return
    from ..report import report

    path, runs = report(args.runs, args.out, args.results)
    import sys

    for r in runs:
        for note in r.notes:
            sys.stderr.write(f"ddpm report: warning: {r.root}: {note}\n")
        print(f"{r.root}: {r.status.headline()}; {len(r.samples)} sample grid(s), "
              f"{len(r.results)} evaluation result(s)")
    print(f"wrote {path}")
