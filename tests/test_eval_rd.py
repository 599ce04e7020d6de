"""Rate–distortion rows (paper Table 4 / Fig. 5) from a bits/dim result."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from ddpm.evaluate.nll import NLLResult
from ddpm.evaluate.rd import format_table, plot_rd, rate_distortion, save_rd, select_rows


def _result(terms, mse, prior) -> NLLResult:
    terms, mse = np.asarray(terms, np.float64), np.asarray(mse, np.float64)
    total = prior + terms.sum()
    return NLLResult(n=1, total_bpd=total, total_bpd_stderr=float("nan"), prior_bpd=prior,
                     decoder_bpd=float(terms[0]), rate_bpd=prior + float(terms[1:].sum()),
                     per_image_total_bpd=np.array([total]), terms_bpd=terms, mse=mse)


# T = 4, numbers chosen so that every index mistake changes the result.
SMALL = _result(terms=[1.0, 0.1, 0.01, 0.001], mse=[1e-4, 0.01, 0.04, 0.25], prior=1e-4)


def test_hand_computed_rows():
    rows = rate_distortion(SMALL)
    # Receiver holds x_t after L_T (prior) and L_{T-1}..L_t; distortion from x̂0(x_t) = 127.5 sqrt(mse[t-1]).
    expected = [  # (reverse steps, t, rate, distortion)
        (1, 4, 0.0001, 127.5 * 0.5),
        (2, 3, 0.0011, 127.5 * 0.2),
        (3, 2, 0.0111, 127.5 * 0.1),
        (4, 1, 0.1111, 127.5 * 0.01),
    ]
    assert [(r["reverse_steps"], r["t"]) for r in rows] == [e[:2] for e in expected]
    for r, (_, _, rate, dist) in zip(rows, expected):
        assert r["rate_bpd"] == pytest.approx(rate, rel=1e-12)
        assert r["distortion_rmse"] == pytest.approx(dist, rel=1e-12)


def test_properties_on_random_terms():
    rng = np.random.default_rng(3)
    T = 50
    res = _result(terms=rng.exponential(0.05, T), mse=np.sort(rng.uniform(0, 0.5, T)), prior=2e-5)
    rows = rate_distortion(res)
    rates = np.array([r["rate_bpd"] for r in rows])
    assert len(rows) == T and [r["reverse_steps"] for r in rows] == list(range(1, T + 1))
    assert np.all(np.diff(rates) >= 0)  # cumulative rate never decreases
    assert rates[0] == pytest.approx(res.prior_bpd, rel=1e-12)  # after 1 step: only x_T was sent
    assert rates[-1] == pytest.approx(res.total_bpd - res.decoder_bpd, rel=1e-12)  # total - L0
    assert rows[-1]["distortion_rmse"] == pytest.approx(127.5 * np.sqrt(res.mse[0]), rel=1e-12)
    assert rows[0]["distortion_rmse"] == pytest.approx(127.5 * np.sqrt(res.mse[-1]), rel=1e-12)


def test_select_and_table():
    T = 1000
    res = _result(terms=np.full(T, 1e-3), mse=np.linspace(1e-5, 0.3, T), prior=0.0)
    sel = select_rows(rate_distortion(res), every=100)
    assert [r["reverse_steps"] for r in sel] == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert sel[0]["rate_bpd"] == pytest.approx(999 * 1e-3)  # all KL terms L_1..L_999, not L_0
    table = format_table(rate_distortion(res), every=100)
    assert table.count("\n") == 11 and "| 1000 | 0.99900 |" in table


def test_save_json_csv_and_plot(tmp_path):
    rows = rate_distortion(SMALL)
    save_rd(rows, tmp_path / "rd.json", tmp_path / "rd.csv")
    assert json.loads((tmp_path / "rd.json").read_text()) == rows
    with open(tmp_path / "rd.csv") as f:
        back = list(csv.DictReader(f))
    assert [int(r["reverse_steps"]) for r in back] == [1, 2, 3, 4]
    assert float(back[3]["rate_bpd"]) == pytest.approx(0.1111)
    plot_rd(rows, tmp_path / "fig" / "rd.png", title="test")
    with Image.open(tmp_path / "fig" / "rd.png") as im:
        assert im.format == "PNG" and im.size == (1200, 360)
        # Not a blank canvas: the lines and labels are drawn.
        assert np.asarray(im.convert("L")).min() < 100
