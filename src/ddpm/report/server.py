"""``ddpm report RUN --serve``: the report page on 127.0.0.1, rebuilt when the run folder changes.

The standard library's ``http.server`` (no framework), bound to 127.0.0.1 only (reach it from
another machine through an SSH tunnel: ``ssh -L 8000:127.0.0.1:8000 host``). Two paths:

    /          the page (:func:`ddpm.report.page.build_html`), rebuilt only when the folder's
               fingerprint changed since the last build
    /version   {"version": fingerprint, "live": bool}: what the page's script polls

The fingerprint (:func:`fingerprint`) is a hash of what the page shows: the size and time of
metrics.jsonl, the sample grids, the latest checkpoint, the lock file and every result JSON, so
the poll costs a few ``stat`` calls, never a re-read of the metrics.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .fmt import esc
from .page import build_html
from .results import candidates
from .runfolder import RunReader

__all__ = ["fingerprint", "ReportSource", "make_server", "serve"]


def _stat_key(p: Path) -> str:
    try:
        st = p.stat()
    except OSError:
        return f"{p.name}:-"
    return f"{p.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def fingerprint(roots: Sequence[Path], extra: Sequence[Path] = ()) -> str:
    """A short hash that changes whenever a file the page shows changes (see the module doc)."""
    h = hashlib.sha1()
    for root in roots:
        keys = [_stat_key(root / n) for n in ("metrics.jsonl", "config.json", "train.lock")]
        keys.append(_stat_key(root / "checkpoints" / "latest"))
        samples = root / "samples"
        if samples.is_dir():
            keys += sorted(_stat_key(p) for p in samples.glob("step_*.png"))
        keys += [_stat_key(p) for p in candidates(root)]
        for e in extra:
            keys += [_stat_key(p) for p in ([e] if e.is_file() else candidates(e))]
        h.update("\n".join([str(root), *keys]).encode())
    return h.hexdigest()[:16]


class ReportSource:
    """The page of some runs, rebuilt when their fingerprint changes (thread-safe)."""

    def __init__(self, roots: Sequence[str | os.PathLike], results: Sequence[str | os.PathLike] = (),
                 poll_s: float = 5.0):
        self.roots = [Path(r) for r in roots]
        self.extra = [Path(p) for p in results]
        self.readers = [RunReader(r, self.extra) for r in self.roots]
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._version: str | None = None
        self._html = ""
        self._live = False

    def current(self) -> tuple[str, str, bool]:
        """(html, version, live). Raises UserError when a folder cannot be read (first build)."""
        with self._lock:
            version = fingerprint(self.roots, self.extra)
            if version != self._version:
                runs = [r.read() for r in self.readers]
                self._live = any(r.status.live for r in runs)
                self._html = build_html(runs, version=version, serve_poll_s=self.poll_s)
                self._version = version
            return self._html, self._version, self._live


def _handler(source: ReportSource, log: Callable[[str], object]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ddpm-report"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path not in ("/", "/index.html", "/version"):
                return self._send(404, "text/plain; charset=utf-8", b"not found\n")
            try:
                html, version, live = source.current()
            except UserError as e:  # the folder broke while serving: say so, keep serving
                log(f"warning: {e}")
                body = f"<!doctype html><title>ddpm report</title><p>{esc(e)}</p>".encode()
                return self._send(500, "text/html; charset=utf-8", body)
            if path == "/version":
                return self._send(200, "application/json", json.dumps({"version": version, "live": live}).encode())
            self._send(200, "text/html; charset=utf-8", html.encode("utf-8"))

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:  # quiet: no line per request
            pass

    return Handler


def make_server(source: ReportSource, port: int = 8000, log: Callable[[str], object] = print) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1:``port`` (0: any free port; see ``server.server_address``).
    Raises UserError when the port is taken or not allowed."""
    try:
        server = ThreadingHTTPServer(("127.0.0.1", int(port)), _handler(source, log))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: 127.0.0.1:{port} is already in use; choose another --port "
                            f"(0 picks a free one)") from None
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror or e})") from None
    server.daemon_threads = True
    return server


def serve(roots: Sequence[str | os.PathLike], port: int = 8000, results: Sequence[str | os.PathLike] = (),
          poll_s: float = 5.0, log: Callable[[str], object] = print) -> None:
    """Build the page once (errors raise before anything listens), then serve until Ctrl-C
    (the KeyboardInterrupt propagates; the socket is closed)."""
    source = ReportSource(roots, results, poll_s)
    source.current()
    server = make_server(source, port, log)
    try:
        host, real_port = server.server_address[:2]
        log(f"serving the report of {', '.join(str(r) for r in source.roots)} at http://{host}:{real_port}/ "
            f"(Ctrl-C stops)")
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
