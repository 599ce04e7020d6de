"""The report page in a real browser (headless Chromium over the DevTools protocol, tests/cdp.py)
for a short real run: a few training steps with sample grids, then ``ddpm eval nll`` and
``ddpm eval rd`` into the run folder, then ``ddpm report``.

Checked: no console error or uncaught exception, every image decoded (naturalWidth > 0), the
charts and tables present, the grid slider works, no sideways scrolling on a phone-sized
screen, and the served page of a live run reloads itself when the run folder changes and stops
polling once the run is over. Screenshots (desktop and phone) are written for review to
$DDPM_TEST_ARTIFACTS (default: the test's temporary folder) and their paths printed.

Skipped, with the reason, where Chromium or the websocket-client package is missing
(``.ci/run`` installs Chromium; ``pip install -e '.[test]'`` installs websocket-client).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from cdp import Browser, missing_reason
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset

pytestmark = [pytest.mark.skipif(missing_reason() is not None, reason=f"browser tests: {missing_reason()}"),
              pytest.mark.usefixtures("one_thread")]

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "diffusion.num_timesteps=20", "train.batch_size=8", "train.warmup_steps=2", "train.total_steps=8",
        "train.log_every=1", "train.sample_every=4", "train.sample_n=4", "train.save_every=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real run folder: 8 steps, 2 sample grids, a bits/dim and a rate-distortion result."""
    import torch

    from ddpm.training import train

    root = tmp_path_factory.mktemp("report") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(apply_overrides(get_preset("digits"), TINY), root, device="cpu", progress=False, log=lambda m: None)
        assert (root / "report.html").is_file(), "the trainer writes its page at the end (train.report_every=5)"
        for argv in (["eval", "nll", "--ckpt", str(root), "--n", "8", "--batch-size", "8", "--no-progress",
                      "--device", "cpu", "--out", str(root / "eval" / "nll.json")],
                     ["eval", "rd", "--from", str(root / "eval" / "nll.json"), "--out", str(root / "eval" / "rd.json")],
                     ["report", str(root)]):
            assert main(argv) == 0, argv
    finally:
        torch.set_num_threads(old)
    return root


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DDPM_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_report_page_renders_without_errors(run, browser, tmp_path):
    since = len(browser.events)
    browser.goto((run / "report.html").as_uri())
    assert _errors_since(browser, since) == []
    images = browser.eval("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == len(list((run / "samples").glob("step_*.png"))) == 2
    assert all(c and w > 0 and h > 0 for c, w, h in images), images
    counts = browser.eval("""({
        charts: document.querySelectorAll('#training figure.chart svg polyline').length,
        evalCharts: document.querySelectorAll('#evaluation figure.chart svg').length,
        evalTables: document.querySelectorAll('#evaluation table').length,
        status: document.querySelector('#status table') !== null,
        text: document.body.innerText})""")
    assert counts["charts"] >= 8  # loss raw + smoothed, 4 quartiles, lr, grad norm, ...
    assert counts["evalCharts"] >= 5 and counts["evalTables"] >= 2 and counts["status"]
    text = counts["text"]
    assert "finished at step 8 of 8" in text and "ckpt_000000008.safetensors" in text
    assert "no evaluation yet" not in text and "Rate–distortion" in text
    # the slider walks through the grids: the first grid shows, the newest hides
    shown = browser.eval("""(function(){
        var r = document.querySelector('.grids input[type=range]'); r.value = 0;
        r.dispatchEvent(new Event('input'));
        return Array.from(document.querySelectorAll('.grids figure')).map(f => !f.hidden)
            .concat([document.querySelector('.grids output').textContent]); })()""")
    assert shown == [True, False, "step 4"]
    out = _artifacts(tmp_path)
    browser.screenshot(out / "report_desktop.png", width=1280)
    # a phone: one column, nothing wider than the screen
    browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True)
    browser.goto((run / "report.html").as_uri())
    wide = browser.eval("document.documentElement.scrollWidth")
    assert wide <= 391, f"the page scrolls sideways on a phone ({wide} px wide)"
    browser.screenshot(out / "report_phone.png", width=390, mobile=True)
    browser.call("Emulation.clearDeviceMetricsOverride")
    assert (out / "report_desktop.png").stat().st_size > 10_000
    print(f"screenshots for review: {out / 'report_desktop.png'}, {out / 'report_phone.png'}")


def test_trainers_own_page_renders(run, browser):
    """RUN/report.html as the trainer wrote it at the end of the run (before the evaluations)."""
    page = run.parent / "trainer.html"
    from ddpm.report import read_run, write_report

    write_report([read_run(run, live=False)], page, refresh_s=300)
    since = len(browser.events)
    browser.goto(page.as_uri())
    assert _errors_since(browser, since) == []
    assert browser.eval("Array.from(document.images).every(i => i.naturalWidth > 0)")


def _errors_since(browser: Browser, since: int) -> list[str]:
    keep = browser.events
    try:
        browser.events = keep[since:]
        return browser.errors()
    finally:
        browser.events = keep


def test_served_live_page_reloads_when_the_run_changes(run, browser, tmp_path):
    from ddpm.report.server import ReportSource, make_server

    live = tmp_path / "live"
    shutil.copytree(run, live)
    # a live trainer: the lock names this process (the report only reads it, it never locks)
    (live / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "started": "now"}))
    server = make_server(ReportSource([live], poll_s=0.3), 0, log=lambda m: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        since = len(browser.events)
        browser.goto(url)
        assert browser.eval("document.body.dataset.live") == "1"
        assert "running" in browser.eval("document.querySelector('.headline').textContent")
        browser.eval("window.__before_change = 1")
        # the trainer logs another record: the page notices and reloads itself
        last = json.loads((live / "metrics.jsonl").read_text().splitlines()[-1])
        mark = len(browser.events)
        with open(live / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**last, "step": 9, "time": last["time"] + 1}) + "\n")
        browser.wait_event("Page.loadEventFired", timeout=30, since=mark)
        assert browser.eval("typeof window.__before_change") == "undefined"
        assert "step 9" in browser.eval("document.querySelector('.headline').textContent")
        # the trainer exits (its lock goes): one more reload, to a page that no longer polls
        mark = len(browser.events)
        (live / "train.lock").unlink()
        browser.wait_event("Page.loadEventFired", timeout=30, since=mark)
        assert browser.eval("document.body.dataset.live") == "0"
        mark = len(browser.events)
        time.sleep(1.5)  # five poll intervals
        browser.eval("1")  # drain events
        assert not [e for e in browser.events[mark:] if e["method"] == "Page.loadEventFired"]
        assert _errors_since(browser, since) == []
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_800k_steps_loads_in_a_second(tmp_path, browser):
    """800k steps logged every 100 (cifar10's cadence): the page's curves are thinned, so the
    browser has a ~200 KB page to lay out, not 8,000-point paths per chart."""
    from ddpm.report import read_run, write_report

    run = tmp_path / "big"
    run.mkdir()
    (run / "config.json").write_text(get_preset("cifar10").to_json())
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(100, 800_001, 100):
            loss = 0.03 + 1.0 / (1 + step / 1000)
            f.write(json.dumps({"step": step, "loss": loss, **{f"loss_q{k}": loss * (4 - k) for k in range(4)},
                                "grad_norm": 0.5, "lr": 2e-4, "images_per_s": 400.0, "steps_per_s": 3.0,
                                "skipped_nonfinite": 0, "time": 1.7e9 + step / 3, "elapsed_s": step / 3}) + "\n")
    page = write_report([read_run(run)], tmp_path / "big.html")
    assert page.stat().st_size < 400_000
    since = len(browser.events)
    browser.goto(page.as_uri())
    ms = browser.eval("performance.getEntriesByType('navigation')[0].loadEventEnd")
    print(f"800k-step page: {page.stat().st_size:,} bytes, load event after {ms:.0f} ms")
    assert ms < 3000  # ~40-250 ms measured on a loaded 2-core machine
    assert _errors_since(browser, since) == []
    assert browser.eval("document.querySelectorAll('#training svg').length") >= 5
    assert "no samples yet" in browser.eval("document.body.innerText")
