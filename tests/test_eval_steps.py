"""``ddpm eval steps``: NFE budgets, the same seeds in every row, the written table and figure,
and one-line errors for bad names and lists."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ddpm import samplers
from ddpm.cli import main
from ddpm.diffusion import GaussianDiffusion
from ddpm.evaluate.steps import COLUMNS, parse_ints, run_steps, save_steps, steps_for_nfe
from ddpm.images import to_uint8
from ddpm.sampling import make_chain, sample
from ddpm.schedule import get_beta_schedule

T = 30
D = GaussianDiffusion(get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.02 * 1000 / T))


def _toy(x, t):
    return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("name", samplers.names())
@pytest.mark.parametrize("nfe", [5, 10])
def test_the_budget_gives_the_longest_chain_that_fits(name, nfe):
    k = steps_for_nfe(D, name, nfe)
    cls = samplers.get(name)
    assert cls(make_chain(D, "cpu", k)).nfe <= nfe
    if k < T:
        assert cls(make_chain(D, "cpu", k + 1)).nfe > nfe
    if name in ("ancestral", "ddim"):
        assert k == nfe  # one network call per step


def test_rows_use_the_same_seeds_as_sample_and_are_written(tmp_path):
    seen = []

    def quality(u8):
        seen.append(u8)
        return float(u8.astype(np.float64).mean()), "mean"

    rows = run_steps(D, _toy, (1, 4, 4), quality, samplers=["ancestral", "ddim"], nfes=[4, 6], n=3, seed=5,
                     batch_size=2, clips=(True, False), full_chain=True, progress=False)
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["full"] and rows[0]["nfe"] == T
    # row for ddim, clip off, NFE 6 is exactly sample() with seeds 5..7 (any batch size)
    i = next(j for j, r in enumerate(rows) if r["sampler"] == "ddim" and not r["clip"] and r["nfe"] == 6)
    want = to_uint8(sample(D, _toy, (1, 4, 4), [5, 6, 7], sampler="ddim", steps=6, clip_denoised=False))
    np.testing.assert_array_equal(seen[i], want)
    assert rows[i]["quality"] == float(want.astype(np.float64).mean())
    assert all(r["seconds_per_image"] > 0 and r["n"] == 3 for r in rows)

    js, cs, png = save_steps(rows, tmp_path / "steps.json", {"n": 3})
    data = json.loads(js.read_text())
    assert data["meta"] == {"n": 3} and len(data["rows"]) == len(rows)
    with open(cs) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == len(rows)
    assert float(table[i]["quality"]) == rows[i]["quality"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, msg", [
    (["--samplers", "ancestral,dpm+2m"], "unknown sampler 'dpm+2m'"),
    (["--nfe", "5,x"], "--nfe"),
    (["--nfe", "1"], "--nfe"),
])
def test_bad_lists_are_one_line_errors_before_anything_runs(tmp_path, capsys, argv, msg):
    out = tmp_path / "steps.json"
    rc = main(["eval", "steps", "--ckpt", str(tmp_path / "missing"), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and "\n" not in err
    assert not out.exists()


def test_parse_ints():
    assert parse_ints("5, 10,20", "--nfe") == [5, 10, 20]


@pytest.mark.parametrize("name", samplers.names())
def test_a_row_makes_the_calls_of_its_budget(name):
    """The sampled chain is the one steps_for_nfe chose: its network calls per image are the row's
    budget's (pndm's K calls walk K - 1 timesteps; it once ran with one call fewer than its row said)."""
    calls = []

    def counting(x, t):
        calls.append(x.shape[0])
        return _toy(x, t)

    nfe = 5
    rows = run_steps(D, counting, (1, 4, 4), lambda u8: (0.0, "none"), samplers=[name], nfes=[nfe], n=2,
                     batch_size=2, progress=False)
    want = samplers.get(name)(make_chain(D, "cpu", rows[0]["steps"], rows[0]["spacing_used"])).nfe
    assert len(calls) == want <= nfe
    if name in ("ancestral", "ddim", "pndm", "unipc", "dpm++2m"):
        assert len(calls) == nfe
