"""A minimal Chrome DevTools Protocol client for the browser tests (tests/test_report_browser.py).

Starts headless Chromium (Debian's ``chromium`` package) with a fresh profile, attaches to its
first page over the DevTools websocket (``websocket-client``, a test-only dependency) and offers
what the tests need: navigate, evaluate JavaScript, collect console errors and uncaught
exceptions, wait for a navigation, take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def find_chromium() -> str | None:
    """The browser's path ($DDPM_CHROMIUM, then chromium / chromium-browser / google-chrome), or None."""
    env = os.environ.get("DDPM_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "the websocket-client package is not installed (pip install -e '.[test]')"
    if find_chromium() is None:
        return "no Chromium found (apt-get install chromium, or set DDPM_CHROMIUM)"
    return None


class Browser:
    """``with Browser() as b: b.goto(url); b.eval("1 + 1")``."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        import websocket

        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="ddpm-chromium-")
        argv = [find_chromium(), *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        port = self._port()
        page = self._page_target(port)
        self.ws = websocket.create_connection(page, timeout=timeout, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _port(self) -> int:
        active = Path(self.profile) / "DevToolsActivePort"
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                return int(active.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    def _page_target(self, port: int) -> str:
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise RuntimeError("chromium has no page target")

    # -------------------------------------------------------------------------------- protocol

    def _recv(self) -> dict:
        msg = json.loads(self.ws.recv())
        if "method" in msg:
            self.events.append(msg)
        return msg

    def call(self, method: str, **params) -> dict:
        self._id += 1
        mine = self._id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            msg = self._recv()
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float | None = None, since: int = 0) -> dict:
        """The first event ``method`` at index >= ``since`` of :attr:`events` (waiting for it)."""
        end = time.monotonic() + (timeout or self.timeout)
        self.ws.settimeout(0.5)
        try:
            while True:
                for ev in self.events[since:]:
                    if ev["method"] == method:
                        return ev
                if time.monotonic() > end:
                    raise TimeoutError(f"no {method} within {timeout or self.timeout} s")
                try:
                    self._recv()
                except Exception as e:  # websocket timeout: look again
                    if type(e).__name__ != "WebSocketTimeoutException":
                        raise
        finally:
            self.ws.settimeout(self.timeout)

    # -------------------------------------------------------------------------------- helpers

    def goto(self, url: str) -> None:
        since = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since=since)

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif ev["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        return out

    def screenshot(self, path: str | os.PathLike, width: int = 1280, mobile: bool = False) -> None:
        """A full-page PNG at ``width`` CSS pixels."""
        height = int(self.eval("Math.ceil(document.documentElement.scrollHeight)"))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=min(height, 16000),
                  deviceScaleFactor=1, mobile=mobile)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
