"""The run report (ddpm.report, ddpm report): reading metrics.jsonl (incremental, torn last line,
garbage), decimation and smoothing, run status, evaluation results told apart by content,
differing config keys, the HTML page, the server's version endpoint, the trainer's live page
and the CLI's one-line errors. No training here (synthetic run folders); the browser tests
with a real run are in test_report_browser.py."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ddpm.config import apply_overrides, get_preset
from ddpm.errors import ConfigError, DataError, UserError
from ddpm.report import (MetricsLog, build_html, decimate, differing_keys, read_run, run_labels, smooth,
                         write_report)
from ddpm.report.metrics import read_metrics
from ddpm.report.results import classify, find_results
from ddpm.report.runfolder import STALE_AFTER_S, RunReader, read_status
from ddpm.report.server import ReportSource, fingerprint, make_server
from ddpm.report.svg import Series, line_chart, log_ticks, nice_ticks
from test_cli import run as cli  # main(argv) -> (rc, stdout, stderr)


def record(step: int, loss: float = 0.5, t0: float = 1.7e9, rate: float = 10.0) -> dict:
    return {"step": step, "loss": loss, "loss_q0": 2 * loss, "loss_q1": loss, "loss_q2": loss / 2,
            "loss_q3": loss / 4, "grad_norm": 1.0, "lr": 1e-4, "images_per_s": 80.0, "steps_per_s": rate,
            "skipped_nonfinite": 0, "time": t0 + step / rate, "elapsed_s": step / rate, "max_rss_mb": 400.0}


def make_run(root: Path, steps=(10, 20, 30), total: int = 30, grids=(10, 20), ckpt: int | None = 30,
             overrides=()) -> Path:
    """A run folder as the trainer leaves it (config, metrics, grids, a checkpoint name)."""
    from PIL import Image

    root.mkdir(parents=True)
    cfg = apply_overrides(get_preset("digits"), [f"train.total_steps={total}", *overrides])
    (root / "config.json").write_text(cfg.to_json() + "\n")
    (root / "metrics.jsonl").write_text("".join(json.dumps(record(s)) + "\n" for s in steps))
    (root / "samples").mkdir()
    for i, s in enumerate(grids):
        Image.fromarray(np.full((16, 24), (40 * i) % 256, np.uint8)).save(root / "samples" / f"step_{s:09d}.png")
    if ckpt is not None:
        (root / "checkpoints").mkdir()
        name = f"ckpt_{ckpt:09d}.safetensors"
        (root / "checkpoints" / name).write_bytes(b"\0" * 8)
        (root / "checkpoints" / "latest").write_text(name + "\n")
    return root


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_columns_missing_keys_and_nulls(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": null, "grad_norm": 3}\n')
    m = MetricsLog(p).refresh()
    assert m.count == 2 and m.torn == 0
    assert m.array("step").tolist() == [1.0, 2.0]
    assert m.array("loss")[0] == 0.5 and math.isnan(m.array("loss")[1])
    assert math.isnan(m.array("grad_norm")[0]) and m.array("grad_norm")[1] == 3
    assert m.last("loss") == 0.5 and m.has("grad_norm") and not m.has("lr")


def test_metrics_incremental_refresh_parses_only_new_lines_and_restarts_after_a_rewrite(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps(record(1)) + "\n")
    m = MetricsLog(p).refresh()
    with open(p, "a") as f:
        f.write(json.dumps(record(2)) + "\n" + '{"step": 3, "lo')  # a record being written
    m.refresh()
    assert m.array("step").tolist() == [1, 2] and m.torn == len('{"step": 3, "lo')
    with open(p, "a") as f:
        f.write('ss": 0.1}\n')
    m.refresh()
    assert m.array("step").tolist() == [1, 2, 3] and m.torn == 0 and m.last("loss") == 0.1
    # a resume rewrites the file (atomically: a new inode) with fewer records
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps(record(1, loss=0.9)) + "\n")
    os.replace(tmp, p)
    m.refresh()
    assert m.array("step").tolist() == [1] and m.last("loss") == 0.9


def test_metrics_read_in_small_blocks_gives_the_same_columns(tmp_path, monkeypatch):
    import ddpm.report.metrics as metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(record(s, loss=1.0 / s)) + "\n" for s in range(1, 200)) + '{"step": 2')
    whole = MetricsLog(p).refresh()
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 97)  # blocks end mid-line
    small = MetricsLog(p).refresh()
    assert small.count == whole.count == 199 and small.torn == whole.torn == len('{"step": 2')
    for k in ("step", "loss", "loss_q3", "time"):
        assert np.array_equal(small.array(k), whole.array(k))
    assert small.array("loss").tolist() == [1.0 / s for s in range(1, 200)]
    p.write_text("".join(json.dumps(record(s)) + "\n" for s in range(1, 50)) + "oops\n")
    with pytest.raises(DataError, match="line 50 is not JSON"):
        MetricsLog(p).refresh()


@pytest.mark.parametrize("line, what", [("not json at all", "not JSON"), ('[1, 2]', "not a metrics record"),
                                        ('{"loss": 1}', "not a metrics record"),
                                        ('{"step": "7"}', "not a metrics record")])
def test_metrics_garbage_in_the_middle_is_an_error_naming_the_line(tmp_path, line, what):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps(record(1)) + "\n" + line + "\n" + json.dumps(record(2)) + "\n")
    with pytest.raises(DataError, match=f"line 2 is {what}"):
        MetricsLog(p).refresh()


def test_decimate_keeps_ends_and_extremes_and_bounds_the_count():
    rng = np.random.default_rng(0)
    n = 800_000
    x = np.arange(1, n + 1, dtype=np.float64) * 1
    y = rng.normal(size=n)
    y[123_457] = 50.0    # a spike
    y[654_321] = -40.0   # a dip
    y[1000] = np.nan     # a non-finite record is dropped
    xd, yd = decimate(x, y, 2000)
    assert xd.size <= 2000 and np.all(np.diff(xd) > 0)
    assert xd[0] == 1 and xd[-1] == n
    assert 50.0 in yd and -40.0 in yd and np.isfinite(yd).all()
    # every kept point is a real point of the curve
    assert np.array_equal(y[(xd - 1).astype(int)], yd)
    # short curves are returned whole (minus NaNs)
    xs, ys = decimate([1, 2, 3], [1.0, np.nan, 3.0], 10)
    assert xs.tolist() == [1, 3] and ys.tolist() == [1, 3]


def test_smooth_is_the_debiased_ema():
    y = np.array([1.0, np.nan, 3.0, 5.0])
    w = 0.5
    out = smooth(y, w)
    # written out again: s1 = .5*1 -> 1/(1-.5) = 1; s2 = .5*.5 + .5*3 = 1.75 -> /(1-.25) = 7/3;
    # s3 = .5*1.75 + .5*5 = 3.375 -> /(1-.125) = 27/7
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1])
    assert out[2] == pytest.approx(7 / 3) and out[3] == pytest.approx(27 / 7)
    assert smooth(y, 0.0)[[0, 2, 3]].tolist() == [1.0, 3.0, 5.0]
    # long series (the blocked closed form) against the recursion, point by point
    rng = np.random.default_rng(1)
    long = rng.normal(size=3000) + 5
    long[rng.integers(0, 3000, 100)] = np.nan
    for w in (0.5, 0.97, 1 - 1 / 2000):
        s, m, ref = 0.0, 0, []
        for v in long:
            if np.isnan(v):
                ref.append(np.nan)
                continue
            m += 1
            s = w * s + (1 - w) * v
            ref.append(s / (1 - w ** m))
        np.testing.assert_allclose(smooth(long, w), ref, rtol=1e-12, atol=0)


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0, 800_000) == pytest.approx([0, 200_000, 400_000, 600_000, 800_000])
    assert nice_ticks(1, 4, integer=True) == [1, 2, 3, 4]
    assert nice_ticks(1, 12, integer=True) == [2, 4, 6, 8, 10, 12]  # never 2.5, 7.5 steps
    assert log_ticks(1e-3, 2.0) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])  # 4 decades: decades only
    assert log_ticks(0.05, 0.9) == pytest.approx([0.05, 0.1, 0.2, 0.5])


def test_chart_says_what_is_missing_instead_of_empty_axes():
    empty = line_chart([Series("loss", [1, 2], [np.nan, np.nan])], title="Loss", xlabel="step", ylabel="loss",
                       empty="no loss yet")
    assert "<svg" not in empty and "no loss yet" in empty
    # a log axis drops the points it cannot draw; the rest is plotted
    html = line_chart([Series("a", [1, 2, 3], [0.0, 1.0, 2.0]), Series("b", [1, 2], [3.0, 4.0])], title="t",
                      xlabel="x", ylabel="y", logy=True)
    assert html.count("<polyline") == 2 and 'class="legend"' in html


# ---------------------------------------------------------------------------------------------- run folder

def test_status_finished_stopped_running_and_not_started(tmp_path):
    fin = read_run(make_run(tmp_path / "fin"))
    assert fin.status.state == "finished" and fin.status.step == 30 and fin.status.checkpoint_step == 30
    assert "finished at step 30 of 30" in fin.status.headline()
    stop = read_run(make_run(tmp_path / "stop", total=100))
    assert stop.status.state == "stopped" and "stopped at step 30 of 100" in stop.status.headline()
    # a live trainer: the lock file names this (living) process on this host
    live = make_run(tmp_path / "live", total=1030)
    (live / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "started": "now"}))
    s = read_run(live).status
    assert s.state == "running" and s.steps_per_s == pytest.approx(10.0)
    assert s.eta_s == pytest.approx((1030 - 30) / 10.0)
    # a lock file left by a killed trainer (its PID is gone) is not a live run
    dead = make_run(tmp_path / "dead", total=100)
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (dead / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started": "x"}))
    assert read_run(dead).status.state == "stopped"
    # a lock on another host: the age of the last record decides (records every 0.1 s here)
    far = make_run(tmp_path / "far", total=100)
    (far / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    last = 1.7e9 + 3.0
    assert RunReader(far).read().status.state == "stopped"  # its records are from 2023
    cfg = json.loads((far / "config.json").read_text())
    m = read_metrics(far / "metrics.jsonl")
    assert read_status(far, cfg, m, now=last + 60).state == "running"
    assert read_status(far, cfg, m, now=last + STALE_AFTER_S + 1).state == "stopped"
    # a folder with a config only
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text(get_preset("digits").to_json())
    assert read_run(new).status.state == "not started"


def test_not_a_run_folder_and_empty_metrics_are_errors_torn_last_line_is_a_note(tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        read_run(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        read_run(tmp_path / "nope")
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="metrics.jsonl: empty"):
        read_run(run)
    (run / "metrics.jsonl").write_text(json.dumps(record(10)) + "\n" + '{"step": 20, "lo')
    data = read_run(run)
    assert data.metrics.count == 1 and any("incomplete line" in n and "killed writer" in n for n in data.notes)
    (run / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="config.json"):
        read_run(run)


def test_differing_keys_and_run_labels(tmp_path):
    a = make_run(tmp_path / "a", overrides=["train.lr=1e-4"])
    b = make_run(tmp_path / "b", overrides=["train.lr=2e-4", "model.dropout=0.1"])
    c = make_run(tmp_path / "c", overrides=["train.lr=1e-4"])
    cfgs = [json.loads((r / "config.json").read_text()) for r in (a, b)]
    assert differing_keys(cfgs) == ["model.dropout", "train.lr"]
    assert differing_keys([{"x": 1, "y": {"z": [1, 2]}}, {"x": 1, "y": {"z": [1, 2]}, "w": 0}]) == ["w"]
    labels = run_labels([read_run(a), read_run(b)])
    assert labels == ["model.dropout=0, train.lr=0.0001", "model.dropout=0.1, train.lr=0.0002"]
    # two runs with one config are told apart by their folder names
    same = run_labels([read_run(a), read_run(c)])
    assert same[0] != same[1] and same[0].startswith("a") and same[1].startswith("c")


def test_results_are_told_apart_by_content_as_the_evaluations_write_them(tmp_path):
    from ddpm.evaluate.guidance import save_guidance
    from ddpm.evaluate.nll import NLLResult
    from ddpm.evaluate.rd import rate_distortion, save_rd
    from ddpm.evaluate.steps import save_steps

    run = make_run(tmp_path / "run")
    T = 5
    nll = NLLResult(n=3, total_bpd=3.5, total_bpd_stderr=0.1, prior_bpd=1e-5, decoder_bpd=1.0, rate_bpd=2.5,
                    per_image_total_bpd=np.array([3.4, 3.5, 3.6]), terms_bpd=np.linspace(1.0, 0.1, T),
                    mse=np.linspace(0.0, 0.5, T), meta={"seed": 0})
    nll.save(run / "eval" / "nll.json")
    save_rd(rate_distortion(nll), run / "eval" / "rd.json")
    steps_row = {"sampler": "ddim", "full": False, "spacing": "trailing", "spacing_used": "trailing", "clip": True, "var": "model", "nfe": 10,
                 "steps": 10, "quality": 2.5, "metric": "digits FD", "seconds_per_image": 0.01, "n": 20}
    save_steps([steps_row, {**steps_row, "nfe": 20, "steps": 20, "quality": 1.5}], run / "steps.json")
    save_guidance([{"guidance": w, "agreement": 0.5 + w / 10, "fd": 3 - w, "confidence": 0.9, "balance": 0.99,
                    "n": 50, "agreement_per_class": [0.5] * 10} for w in (0.0, 1.0, 2.0)], run / "guidance.json")
    (run / "fid.json").write_text(json.dumps({"fid": 12.5, "n_samples": 100, "n_reference": 50000,
                                              "reference": "cifar", "extractor": "x", "is_mean": 8.0,
                                              "is_std": 0.1, "kid_mean": None, "kid_std": None}))
    (run / "quality.json").write_text(json.dumps({"fd": 1.2, "confidence": 0.9, "class_histogram": [1] * 10,
                                                  "class_entropy": 3.3, "balance": 0.99, "n": 10}))
    (run / "other.json").write_text(json.dumps({"hello": 1}))  # not a result: ignored
    (run / "broken.json").write_text("{")                      # unreadable: said, not fatal
    results, bad = find_results(run)
    assert sorted(r.kind for r in results) == sorted(["nll", "rd", "steps", "guidance", "fid", "quality"])
    assert [p.name for p, _ in bad] == ["broken.json"]
    assert classify(json.loads((run / "config.json").read_text())) is None
    data = read_run(run)
    html = build_html([data])
    for needle in ("Bits/dim", "Rate–distortion", "against network calls", "Classifier-free guidance", "FID",
                   "Digits sample quality", "broken.json"):
        assert needle in html, needle
    assert "no evaluation yet" not in html
    assert "3.5 ± 0.1" in html  # the nll total with its standard error


def test_page_says_what_is_missing_and_embeds_grids(tmp_path):
    run = make_run(tmp_path / "run", grids=())
    html = build_html([read_run(run)])
    assert "no evaluation yet" in html and "no samples yet" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    run2 = make_run(tmp_path / "run2", grids=(10, 20, 30))
    html = build_html([read_run(run2)])
    assert html.count("data:image/png;base64,") == 3 and 'type="range"' in html
    assert html.count("<svg") >= 4  # loss, quartiles, lr, grad norm, ...
    off = make_run(tmp_path / "off", grids=(), overrides=["train.sample_every=0"])
    assert "writes no sample grids" in build_html([read_run(off)])


def test_many_grids_are_thinned_to_a_bounded_page(tmp_path, monkeypatch):
    import ddpm.report.page as page

    monkeypatch.setattr(page, "MAX_GRIDS", 5)
    run = make_run(tmp_path / "run", grids=tuple(range(10, 130, 10)))  # 12 grids
    html = build_html([read_run(run)])
    assert html.count("data:image/png;base64,") == 5
    assert 'data-label="step 120"' in html and 'data-label="step 10"' in html  # first and newest kept
    assert "5 of 12 grids shown" in html


def test_several_runs_one_table_rows_named_by_differing_keys(tmp_path):
    a = make_run(tmp_path / "a", overrides=["train.lr=1e-4"])
    b = make_run(tmp_path / "b", overrides=["train.lr=2e-4"])
    (a / "fid.json").write_text(json.dumps({"fid": 11.0, "n_samples": 10}))
    (b / "fid.json").write_text(json.dumps({"fid": 22.0, "n_samples": 10}))
    html = build_html([read_run(a), read_run(b)])
    assert "train.lr=0.0001" in html and "train.lr=0.0002" in html
    assert "Keys that differ" in html
    head = html[html.index('<section id="evaluation">'):]
    table_html = head[:head.index("</table>")]
    assert "FID" in table_html and "11" in table_html and "22" in table_html
    # one chart per quartile, each overlaying both runs
    quart = html.split("<figcaption>Loss, ")[1:]
    assert len(quart) == 4 and all(q[:q.index("</figure>")].count("<polyline") == 2 for q in quart)


def test_an_800k_step_run_gives_a_small_page_quickly(tmp_path):
    """800k steps logged every 100 (the cifar10 preset's cadence): 8,000 records, curves thinned."""
    run = make_run(tmp_path / "big", steps=range(100, 800_001, 100), total=800_000, grids=())
    t0 = time.perf_counter()
    data = read_run(run)
    html = build_html([data])
    seconds = time.perf_counter() - t0
    assert data.metrics.count == 8000
    assert len(html) < 400_000, len(html)
    assert seconds < 10  # generous: a loaded 2-core machine; it takes ~0.3 s alone


# ---------------------------------------------------------------------------------------------- writing

def test_write_report_is_atomic_and_replaces_the_old_page(tmp_path):
    run = make_run(tmp_path / "run")
    out = run / "report.html"
    out.write_text("old")
    write_report([read_run(run)], out)
    assert out.read_text().startswith("<!doctype html>")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_live_report_never_raises_and_says_why(tmp_path):
    from ddpm.training.observe import LiveReport

    said = []
    bad = tmp_path / "missing"  # not a run folder: the write fails
    lr = LiveReport(bad, minutes=5, log=said.append)
    assert not lr.due()
    lr.write(live=True)
    assert len(said) == 1 and said[0].startswith("warning: could not write") and "training continues" in said[0]
    run = make_run(tmp_path / "run")
    LiveReport(run, minutes=0.5, log=said.append).write(live=True)
    html = (run / "report.html").read_text()
    assert 'http-equiv="refresh" content="30"' in html and 'data-live="1"' in html
    LiveReport(run, minutes=0, log=said.append).write(live=False)  # off: nothing written
    assert (run / "report.html").read_text() == html


def test_report_every_is_validated_and_resumable():
    from ddpm.training.state import RESUMABLE_FIELDS

    assert get_preset("digits").train.report_every == 5.0
    assert apply_overrides(get_preset("digits"), ["train.report_every=0"]).train.report_every == 0
    with pytest.raises(ConfigError, match="train.report_every"):
        apply_overrides(get_preset("digits"), ["train.report_every=-1"])
    assert "train.report_every" in RESUMABLE_FIELDS


# ---------------------------------------------------------------------------------------------- server

def test_server_version_changes_when_the_folder_does(tmp_path):
    run = make_run(tmp_path / "run")
    source = ReportSource([run], poll_s=1.0)
    server = make_server(source, 0, log=lambda m: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        v1 = json.loads(urllib.request.urlopen(url + "version").read())
        page = urllib.request.urlopen(url).read().decode()
        assert f'data-version="{v1["version"]}"' in page and v1["live"] is False
        assert json.loads(urllib.request.urlopen(url + "version").read()) == v1  # nothing changed
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record(40)) + "\n")
        v2 = json.loads(urllib.request.urlopen(url + "version").read())
        assert v2["version"] != v1["version"] and v2["version"] == fingerprint([run])
        assert "step 40" in urllib.request.urlopen(url).read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "secret")
    finally:
        server.shutdown()
        server.server_close()


def test_port_in_use_is_a_user_error(tmp_path):
    run = make_run(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: 127.0.0.1:{port} is already in use"):
            make_server(ReportSource([run]), port)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_writes_the_page_and_reports_a_torn_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')
    rc, out, err = cli(["report", str(run)], capsys)
    assert rc == 0 and f"wrote {run / 'report.html'}" in out and "finished at step 30" in out
    assert "incomplete line" in err
    other = make_run(tmp_path / "other", overrides=["train.lr=3e-4"])
    page = tmp_path / "cmp.html"
    rc, out, _ = cli(["report", str(run), str(other), "--out", str(page)], capsys)
    assert rc == 0 and "train.lr=0.0003" in page.read_text()


def test_cli_results_option_adds_a_folder_of_results(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    ev = tmp_path / "evals"
    ev.mkdir()
    (ev / "fid.json").write_text(json.dumps({"fid": 7.25, "n_samples": 10}))
    rc, out, _ = cli(["report", str(run), "--results", str(ev)], capsys)
    assert rc == 0 and "1 evaluation result" in out and "7.25" in (run / "report.html").read_text()


def _garbage(run: Path) -> None:
    (run / "metrics.jsonl").write_text("garbage\n" + json.dumps(record(1)) + "\n")


def _empty(run: Path) -> None:
    (run / "metrics.jsonl").write_text("")


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such folder"), ("plain", "not a run folder"), ("garbage", "line 1 is not JSON"),
    ("empty", "metrics.jsonl: empty"), ("suffix", "expected an .html file name"),
    ("results", "--results"), ("port", "--port"), ("serve_out", "--out and --serve"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, case, needle):
    run = make_run(tmp_path / "run")
    argv = ["report", str(run)]
    if case == "missing":
        argv = ["report", str(tmp_path / "nope")]
    elif case == "plain":
        (tmp_path / "plain").mkdir()
        argv = ["report", str(tmp_path / "plain")]
    elif case == "garbage":
        _garbage(run)
    elif case == "empty":
        _empty(run)
    elif case == "suffix":
        argv += ["--out", str(tmp_path / "x.txt")]
    elif case == "results":
        argv += ["--results", str(tmp_path / "none")]
    elif case == "port":
        argv += ["--serve", "--port", "70000"]
    elif case == "serve_out":
        argv += ["--serve", "--out", str(tmp_path / "x.html")]
    before = sorted(p.name for p in run.iterdir())
    rc, out, err = cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_cli_serve_port_in_use_is_one_line_exit_2(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = cli(["report", str(run), "--serve", "--port", str(port)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "already in use" in err


def test_cli_serve_stops_on_ctrl_c_with_exit_130(tmp_path):
    import signal
    import subprocess
    import sys

    run = make_run(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "ddpm.cli", "report", str(run), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving the report" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert b"<!doctype html>" in urllib.request.urlopen(url, timeout=30).read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "ddpm report: interrupted"


def test_tensorboard_gets_the_sample_grids_and_the_quartile_losses(tmp_path):
    """MetricsWriter mirrors to TensorBoard when installed; a stand-in SummaryWriter records the calls."""
    from PIL import Image

    from ddpm.training.observe import MetricsWriter

    class FakeTB:
        def __init__(self):
            self.scalars, self.images = {}, []

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def add_image(self, tag, img, step, dataformats):
            self.images.append((tag, np.asarray(img).copy(), step, dataformats))

        def flush(self):
            pass

    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w._tb = FakeTB()
    w.write(record(7))
    assert w._tb.scalars["train/loss_q3"] == (0.125, 7) and w._tb.scalars["train/loss_q0"] == (1.0, 7)
    grid = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
    Image.fromarray(grid).save(tmp_path / "g.png")
    w.add_grid(tmp_path / "g.png", 7)
    (tag, img, step, fmt), = w._tb.images
    assert tag == "samples" and step == 7 and fmt == "HWC" and img.shape == (6, 10, 3)
    assert np.array_equal(img[..., 0], grid) and np.array_equal(img[..., 2], grid)
    MetricsWriter(tmp_path / "m2.jsonl").add_grid(tmp_path / "g.png", 1)  # no TensorBoard: nothing happens


def test_the_trainer_writes_its_page_at_the_end_and_report_every_0_turns_it_off(tmp_path, one_thread):
    from ddpm.training import train

    tiny = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
            "diffusion.num_timesteps=10", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
            "train.sample_every=0", "train.save_every=2"]
    run = tmp_path / "run"
    said = []
    train(apply_overrides(get_preset("digits"), tiny + ["train.total_steps=2"]), run, device="cpu", progress=False,
          log=said.append)
    page = (run / "report.html").read_text()
    assert "finished at step 2 of 2" in page and 'data-live="0"' in page and 'http-equiv="refresh"' not in page
    assert not [m for m in said if m.startswith("warning")]
    # resuming with the page turned off (a resumable key): the old page stays as it was
    train(apply_overrides(get_preset("digits"), tiny + ["train.total_steps=3", "train.report_every=0"]), run,
          resume="auto", device="cpu", progress=False, log=said.append)
    assert (run / "report.html").read_text() == page
    assert read_run(run).status.headline().startswith("finished at step 3 of 3")


def test_cli_help_states_the_defaults(capsys):
    rc, out, _ = cli(["report", "--help"], capsys)
    assert rc == 0 and "usage: ddpm report" in out
    assert "(default: 8000)" in out and "(default: 5.0)" in out and "RUN/report.html" in out
    rc, out, _ = cli(["--help"], capsys)
    assert rc == 0 and "report" in out
