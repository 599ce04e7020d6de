"""``ddpm sample --class/--guidance`` on a class-conditional checkpoint: labels in the .npz, a grid
with one row per class, guidance as documented; mistakes are one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import add_prefix, save_checkpoint
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset
from ddpm.nets.unet import UNet

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=10"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, preset: str) -> Path:
    cfg = apply_overrides(get_preset(preset), TINY)
    torch.manual_seed(0)
    model = UNet.from_config(cfg.model, cfg.out_channels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the near-zero output layers must matter: labels should change the images
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_checkpoint(path, add_prefix(model.state_dict(), "ema/"), {"config": cfg.to_dict(), "step": 1,
                                                                     "kind": "weights"})
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return _write(d / "cond.safetensors", "digits_cond"), _write(d / "plain.safetensors", "digits")


def _sample(ckpt, out, *extra):
    return main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--no-progress", "--seed", "5", *extra])


def test_class_specs_write_labels_beside_the_images(ckpts, tmp_path):
    cond, _ = ckpts
    assert _sample(cond, tmp_path / "a.npz", "--n", "12", "--class", "all") == 0
    with np.load(tmp_path / "a.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(12) % 10)
    # the grid: one row per class (10 rows), as many columns as the largest class has images (2)
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    scale = 8  # grid_scale(8)
    assert grid.shape[:2] == ((10 * 9 + 1) * scale, (2 * 9 + 1) * scale)

    assert _sample(cond, tmp_path / "b.npz", "--n", "5", "--class", "7,2") == 0
    with np.load(tmp_path / "b.npz") as f:
        np.testing.assert_array_equal(f["arr_1"], [7, 2, 7, 2, 7])
        b = f["arr_0"]
    assert _sample(cond, tmp_path / "c.npz", "--n", "5", "--class", "7") == 0
    with np.load(tmp_path / "c.npz") as f:
        np.testing.assert_array_equal(f["arr_1"], [7] * 5)
        c = f["arr_0"]
    # per-image seeds: image 0 (seed 5, class 7) is the same in both runs; image 1 differs in class only
    np.testing.assert_array_equal(b[0], c[0])
    assert not np.array_equal(b[1], c[1])


def test_guidance_weights(ckpts, tmp_path):
    cond, _ = ckpts
    runs = {}
    for name, extra in (("w1", ["--guidance", "1"]), ("default", []), ("w0", ["--guidance", "0"]),
                        ("w3", ["--guidance", "3"]), ("ddim3", ["--guidance", "3", "--sampler", "ddim",
                                                                "--steps", "4"])):
        assert _sample(cond, tmp_path / f"{name}.npz", "--n", "4", "--class", "3", *extra) == 0
        with np.load(tmp_path / f"{name}.npz") as f:
            runs[name] = f["arr_0"]
            np.testing.assert_array_equal(f["arr_1"], [3] * 4)  # the requested class, at any W
    np.testing.assert_array_equal(runs["w1"], runs["default"])  # W = 1 is the default
    assert not np.array_equal(runs["w3"], runs["w1"]) and not np.array_equal(runs["w0"], runs["w1"])


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("which,extra,needle", [
    (0, ["--class", "11"], "--class 11: this model has 10 classes"),
    (0, ["--class", "3,x"], "--class"),
    (0, ["--guidance", "-1"], "--guidance"),
    (1, ["--class", "3"], "--class need a class-conditional model"),
    (1, ["--guidance", "2"], "--guidance need a class-conditional model"),
])
def test_mistakes_are_one_line_and_write_nothing(ckpts, tmp_path, capsys, which, extra, needle):
    try:
        rc = _sample(ckpts[which], tmp_path / "s.npz", "--n", "2", *extra)
    except SystemExit as e:  # argparse's own checks (a negative --guidance) exit from the parser
        rc = e.code
    assert rc == 2
    _one_line_error(capsys, needle)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture
def cache_dir(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "ddpm_cache"  # one classifier for the whole session
    monkeypatch.setenv("DDPM_CACHE_DIR", str(d))
    return d


def test_eval_guidance_table_matches_sample_plus_quality(ckpts, tmp_path, cache_dir, capsys):
    import json

    cond, _ = ckpts
    common = ["--n", "20", "--sampler", "ddim", "--steps", "4", "--seed", "0"]
    assert main(["eval", "guidance", "--ckpt", str(cond), "--guidance", "0,1,3", *common, "--no-progress",
                 "--out", str(tmp_path / "g.json")]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    rows = doc["rows"]
    assert [r["guidance"] for r in rows] == [0.0, 1.0, 3.0] and all(r["n"] == 20 for r in rows)
    assert doc["meta"]["sampler"] == "ddim" and "W - 1" in doc["meta"]["convention"]
    csv = (tmp_path / "g.csv").read_text().splitlines()
    assert csv[0] == "guidance,agreement,fd,confidence,balance,n" and len(csv) == 4
    assert (tmp_path / "g.png").stat().st_size > 0
    # the W = 3 row is what `ddpm sample --class all --guidance 3` + `ddpm eval quality` give
    assert main(["sample", "--ckpt", str(cond), "--class", "all", "--guidance", "3", *common, "--no-progress",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["eval", "quality", "--samples", str(tmp_path / "s.npz"), "--out", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["agreement"] == rows[2]["agreement"] and q["fd"] == rows[2]["fd"]
    assert len(q["agreement_per_class"]) == 10
    assert "agreement with the requested class" in capsys.readouterr().out
    # and from the checkpoint directly (balanced classes at W)
    assert main(["eval", "quality", "--ckpt", str(cond), "--n", "20", "--guidance", "3", "--seed", "0",
                 "--out", str(tmp_path / "q2.json")]) == 0
    assert "agreement" in json.loads((tmp_path / "q2.json").read_text())


@pytest.mark.parametrize("which,extra,needle", [
    (1, ["--guidance", "0,1"], "needs a class-conditional 8x8 digits model"),
    (0, ["--guidance", "1,x"], "--guidance '1,x'"),
    (0, ["--guidance", "1", "--steps", "11"], "--steps 11"),
])
def test_eval_guidance_mistakes(ckpts, tmp_path, capsys, which, extra, needle):
    rc = main(["eval", "guidance", "--ckpt", str(ckpts[which]), "--n", "4", *extra, "--out", str(tmp_path / "g.json")])
    assert rc == 2
    _one_line_error(capsys, needle)
    assert list(tmp_path.iterdir()) == []


def test_class_conditional_nll_uses_the_data_labels(ckpts, tmp_path):
    import json

    import ddpm
    from ddpm.data import digits_labels, load_images
    from ddpm.evaluate.nll import evaluate_nll

    cond, _ = ckpts
    assert main(["eval", "nll", "--ckpt", str(cond), "--n", "6", "--batch-size", "6", "--no-progress",
                 "--out", str(tmp_path / "nll.json")]) == 0
    got = json.loads((tmp_path / "nll.json").read_text())
    m = ddpm.load(cond)
    x, y = load_images("digits", "test", 8, 1, n=6), digits_labels("test")[:6]
    with_labels = evaluate_nll(m.model, m.diffusion, x, batch_size=6, labels=y, progress=False)
    null = evaluate_nll(m.model, m.diffusion, x, batch_size=6, progress=False)
    wrong = evaluate_nll(m.model, m.diffusion, x, batch_size=6, labels=(y + 1) % 10, progress=False)
    assert got["total_bpd"] == pytest.approx(with_labels.total_bpd, rel=1e-12)
    assert with_labels.meta["class_conditional"] and not null.meta["class_conditional"]
    assert with_labels.total_bpd != null.total_bpd and with_labels.total_bpd != wrong.total_bpd


def test_fid_and_sample_readers_accept_labelled_samples_unchanged(tmp_path):
    from ddpm.data import read_samples
    from ddpm.evaluate.fid import load_samples

    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x, np.arange(6) % 3)  # arr_0 images, arr_1 labels
    np.testing.assert_array_equal(read_samples(str(tmp_path / "s.npz")), x)
    np.testing.assert_array_equal(load_samples(str(tmp_path / "s.npz")), x)
