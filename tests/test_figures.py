"""Paper figures: PNG grids with the expected pixel sizes and cell contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.evaluate.figures import save_chains, save_interpolation, save_labelled_grid, save_progressive


def _png(path):
    with Image.open(path) as im:
        return im.format, im.mode, im.size, np.asarray(im)


def _level(v: float) -> int:
    return int(round((v + 1) * 127.5))


def test_progressive_columns_run_from_noisiest_to_final(tmp_path):
    n, ts = 3, [0, 50, 100, 150, 200]
    # Snapshot s of every image is a flat grey whose level encodes its timestep.
    vals = torch.tensor([-1.0 + 0.4 * s for s in range(len(ts))])
    xstart = vals.view(1, -1, 1, 1, 1).expand(n, -1, 1, 8, 8)
    save_progressive(xstart, ts, tmp_path / "prog.png", scale=2)
    fmt, mode, size, a = _png(tmp_path / "prog.png")
    assert fmt == "PNG" and mode == "L"
    assert size == (2 * (5 * 9 + 1), 2 * (3 * 9 + 1))  # (width, height)
    # Leftmost cell: the largest t (200, slot 4); rightmost: t = 0, the final sample.
    assert a[2 * 1, 2 * 1] == _level(float(vals[4]))
    assert a[2 * 1, 2 * (4 * 9 + 1)] == _level(float(vals[0]))


def test_chains_grid(tmp_path):
    out = torch.rand(4, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_chains(out, (0, 250, 500, 750), tmp_path / "chains.png")
    fmt, mode, size, a = _png(tmp_path / "chains.png")
    assert mode == "RGB" and size == (3 * 9 + 1, 4 * 9 + 1)
    # Row 2, column 1 holds out[2, 1].
    cell = a[1 + 2 * 9:1 + 2 * 9 + 8, 1 + 1 * 9:1 + 1 * 9 + 8]
    expected = ((out[2, 1].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(cell, expected)
    with pytest.raises(ValueError):
        save_chains(out, (0, 250), tmp_path / "bad.png")


def test_interpolation_has_sources_at_both_ends(tmp_path):
    a_img, b_img = torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    interp = torch.stack([torch.full((1, 8, 8), -1.0 + 2 * lam) for lam in lambdas])
    save_interpolation(a_img, b_img, interp, lambdas, tmp_path / "interp.png", scale=3)
    _, mode, size, a = _png(tmp_path / "interp.png")
    assert mode == "L" and size == (3 * (7 * 9 + 1), 3 * (1 * 9 + 1))
    assert a[3 * 2, 3 * 2] == 0 and a[3 * 2, 3 * (6 * 9 + 2)] == 255
    assert a[3 * 2, 3 * (2 * 9 + 2)] == _level(-0.5)  # lambda = 0.25 in column 2 (after x0_a)
    # Several rows (Fig. 9: one row per diffusion depth).
    save_interpolation(a_img[None], b_img[None], interp.expand(2, -1, -1, -1, -1), lambdas, tmp_path / "rows.png")
    assert _png(tmp_path / "rows.png")[2] == (7 * 9 + 1, 2 * 9 + 1)


def test_labelled_grid(tmp_path):
    x = torch.zeros(2, 3, 1, 8, 8)
    save_labelled_grid(x, tmp_path / "lab.png", row_labels=["a", "b"], col_labels=["t=999", "t=500", "t=0"],
                       title="x0 predictions", cell_inches=1.0)
    fmt, _, size, _ = _png(tmp_path / "lab.png")
    assert fmt == "PNG" and size == (380, 260)  # (1.0 * 3 + 0.8) x (1.0 * 2 + 0.6) inches at 100 dpi
