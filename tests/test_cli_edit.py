"""``ddpm edit inpaint | sdedit`` and ``ddpm encode`` (+ ``ddpm sample --x-T``) on a tiny digits
checkpoint: outputs, kept pixels, the decode round trip, and every bad input as one line, exit 2,
nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import add_prefix, save_checkpoint
from ddpm.config import apply_overrides, get_preset
from ddpm.data import load_images
from ddpm.nets.unet import UNet
from test_cli import run as _run  # main(argv) -> (rc, stdout, stderr)

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=10"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = apply_overrides(get_preset("digits"), TINY)
    torch.manual_seed(0)
    model = UNet.from_config(cfg.model, cfg.out_channels)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, add_prefix(model.state_dict(), "ema/"), {"config": cfg.to_dict(), "step": 1,
                                                                     "kind": "weights"})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with: digits.npz (3 test digits), big/ (16x16 grey PNGs), rgb.png (8x8 RGB), masks."""
    d = tmp_path_factory.mktemp("inputs")
    u8 = load_images("digits", "test", 8, 1, n=3)
    np.savez(d / "digits.npz", arr_0=u8)
    (d / "big").mkdir()
    for k in range(2):
        Image.fromarray(np.kron(u8[k, :, :, 0], np.ones((2, 2), np.uint8))).save(d / "big" / f"{k}.png")
    Image.fromarray(np.repeat(u8[0], 3, axis=2)).save(d / "rgb.png")
    half = np.zeros((8, 8), np.uint8)
    half[4:] = 255
    Image.fromarray(half).save(d / "mask.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "small_mask.png")
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(d / "grey_mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "black_mask.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(d / "white_mask.png")
    return d


def test_inpaint_keeps_the_black_part_and_writes_a_grid(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "inp.npz"
    rc, text, _ = _run(["edit", "inpaint", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"),
                        "--mask", str(inputs / "mask.png"), "--resample", "2", "--jump", "3", "--out", str(out),
                        "--no-progress"], capsys)
    assert rc == 0 and "R=2, J=3" in text
    z = np.load(out)
    src = np.load(inputs / "digits.npz")["arr_0"]
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == src.shape
    assert np.array_equal(z["arr_0"][:, :4], src[:, :4]) and not np.array_equal(z["arr_0"][:, 4:], src[:, 4:])
    assert np.array_equal(z["inputs"], src) and z["mask"].shape == (3, 8, 8) and z["mask"][:, 4:].all()
    assert (tmp_path / "inp.png").stat().st_size > 0
    # the same image whatever the batch size; a named region is the same mask as the file
    out2 = tmp_path / "inp2.npz"
    rc, _, _ = _run(["edit", "inpaint", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"), "--mask",
                     "bottom", "--resample", "2", "--jump", "3", "--out", str(out2), "--batch-size", "1",
                     "--no-progress"], capsys)
    assert rc == 0 and np.array_equal(np.load(out2)["arr_0"], z["arr_0"])


def test_inpaint_from_the_runs_test_split_with_a_random_mask(ckpt, tmp_path, capsys):
    out = tmp_path / "r.npz"
    rc, _, _ = _run(["edit", "inpaint", "--ckpt", str(ckpt), "--images", "test", "--n", "2", "--mask", "random:0.3",
                     "--resample", "1", "--out", str(out), "--no-progress"], capsys)
    z = np.load(out)
    keep = z["mask"] == 0
    assert rc == 0 and keep.any() and (~keep).any()
    assert np.array_equal(z["arr_0"][..., 0][keep], load_images("digits", "test", 8, 1, n=2)[..., 0][keep])


def test_sdedit_writes_results(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "sd.npz"
    rc, text, _ = _run(["edit", "sdedit", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"), "--strength",
                        "0.5", "--sampler", "ddim", "--steps", "4", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0 and "strength 0.5" in text
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 1) and (tmp_path / "sd.png").exists()


def test_encode_then_sample_x_T_decodes(ckpt, inputs, tmp_path, capsys):
    lat = tmp_path / "lat.npz"
    rc, text, _ = _run(["encode", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"), "--out", str(lat),
                        "--interpolate", "--no-progress"], capsys)
    assert rc == 0 and "--x-T" in text and (tmp_path / "lat_interpolation.png").exists()
    z = np.load(lat)
    assert z["arr_0"].dtype == np.float32 and z["arr_0"].shape == (3, 1, 8, 8) and int(z["steps"]) == 0
    dec = tmp_path / "dec.npz"
    rc, _, _ = _run(["sample", "--ckpt", str(ckpt), "--x-T", str(lat), "--sampler", "ddim", "--clip", "off",
                     "--out", str(dec), "--no-progress"], capsys)
    assert rc == 0
    back = np.load(dec)["arr_0"].astype(np.float64)
    src = np.load(inputs / "digits.npz")["arr_0"].astype(np.float64)
    assert back.shape == src.shape and np.sqrt(((back - src) ** 2).mean()) < 20  # a random tiny net, T = 10


@pytest.mark.parametrize("argv,needle", [
    (["--mask", "{inputs}/small_mask.png"], "mask is 4x4 (WxH) but the images are 8x8"),
    (["--mask", "{inputs}/grey_mask.png"], "not binary"),
    (["--mask", "{inputs}/black_mask.png"], "generates nothing"),
    (["--mask", "{inputs}/white_mask.png"], "generates everything"),
    (["--mask", "botom"], "did you mean 'bottom'"),
    (["--mask", "random:2"], "random:P"),
    (["--mask", "top", "--images", "{inputs}/big"], "images are 16x16 grey (1 channel), but the model takes 8x8"),
    (["--mask", "top", "--images", "{inputs}/rgb.png"], "RGB (3 channels), but the model takes 8x8 grey"),
    (["--mask", "top", "--images", "{inputs}/nope"], "not found"),
    (["--mask", "top", "--steps", "11"], "--steps 11"),
    (["--mask", "top", "--class", "3"], "--class need a class-conditional model"),
    (["--mask", "top", "--resample", "0"], "--resample"),
    (["--mask", "top", "--eta", "0.5"], "--eta applies to --sampler ddim"),
])
def test_inpaint_mistakes_are_one_line_exit_2_nothing_written(ckpt, inputs, tmp_path, capsys, argv, needle):
    argv = [a.format(inputs=inputs) for a in argv]
    images = [] if "--images" in argv else ["--images", str(inputs / "digits.npz")]
    rc, _, err = _run(["edit", "inpaint", "--ckpt", str(ckpt), "--out", str(tmp_path / "o.npz"), "--no-progress",
                       *images, *argv], capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2", "abc", "nan"])
def test_sdedit_strength_outside_0_1_is_refused(ckpt, inputs, tmp_path, capsys, strength):
    rc, _, err = _run(["edit", "sdedit", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"), "--strength",
                       strength, "--out", str(tmp_path / "o.npz")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--strength" in err and "(0, 1]" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resize_converts_and_says_so(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "o.npz"
    rc, text, _ = _run(["edit", "sdedit", "--ckpt", str(ckpt), "--images", str(inputs / "big"), "--strength", "0.3",
                        "--resize", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0 and "--resize: 2 image(s)" in text and "area resize" in text
    assert np.array_equal(np.load(out)["inputs"], np.load(inputs / "digits.npz")["arr_0"][:2])  # 2x2 box = exact
    rc, text, _ = _run(["encode", "--ckpt", str(ckpt), "--images", str(inputs / "rgb.png"), "--resize",
                        "--out", str(tmp_path / "l.npz"), "--steps", "5", "--no-progress"], capsys)
    assert rc == 0 and "--resize: 1 image(s)" in text


def test_x_T_mistakes(ckpt, inputs, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 1, 4, 4), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = _run(["sample", "--ckpt", str(ckpt), "--x-T", str(bad), "--out", str(out / "s.npz")], capsys)
    assert rc == 2 and "--x-T" in err and "[N, 1, 8, 8]" in err and list(out.iterdir()) == []


def test_ctrl_c_exits_130_and_writes_nothing(ckpt, inputs, tmp_path, capsys, monkeypatch):
    import ddpm.editing

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ddpm.editing, "inpaint", interrupted)
    rc, _, err = _run(["edit", "inpaint", "--ckpt", str(ckpt), "--images", str(inputs / "digits.npz"), "--mask", "top",
                       "--out", str(tmp_path / "o.npz")], capsys)
    assert rc == 130 and "interrupted" in err and list(tmp_path.iterdir()) == []
