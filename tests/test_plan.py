"""`ddpm train --data X` without --preset: a model that fits the data, and the plan printed first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import run
from ddpm.plan import StepMeasure, loader_line
from ddpm.sizes import config_for

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root: Path, n: int, size: tuple[int, int], mode: str, seed: int = 0, start: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    for k in range(start, start + n):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{k:03d}.png")
    return root


def dry_config(out: str) -> dict:
    """The JSON config a dry run prints first."""
    text = out[out.index("{"):]
    return json.loads(text[:text.index("\n}\n") + 3])


def test_rgb_48_folder_trains_a_48_pixel_rgb_model_without_options(tmp_path, capsys):
    src = write_folder(tmp_path / "myimgs", 6, (48, 48), "RGB")
    run_dir = tmp_path / "r"
    rc, out, err = run(["train", "--data", str(src), "--out", str(run_dir), "--no-progress",
                        "--set", "train.total_steps=1", "--set", "train.batch_size=2"], capsys)
    assert rc == 0, err
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["resolution"] == 48 and cfg["model"]["in_channels"] == 3
    assert cfg["preset"] == "tiny48"  # --size defaults to tiny on a CPU
    lines = out.splitlines()
    heads = (f"data: {src} (folder)", "model: tiny48", "per step on cpu")
    plan = [i for i, ln in enumerate(lines) if ln.startswith(heads)]
    started = next(i for i, ln in enumerate(lines) if ln.startswith("training tiny48"))
    assert len(plan) == 3 and max(plan) < started  # the plan comes before the first step
    assert "native 48x48 (6); modes RGB (6)" in out and "memory per step ~" in out and "loader:" in out


def test_grey_folder_gives_a_one_channel_model_and_dry_run_writes_nothing(tmp_path, capsys):
    src = write_folder(tmp_path / "grey", 3, (40, 50), "L")
    rc, out, err = run(["train", "--data", str(src), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert rc == 0, err
    cfg = dry_config(out)
    assert cfg["model"]["in_channels"] == 1 and cfg["model"]["resolution"] == 32  # 40 -> the supported 32
    assert "centre-crop to a square" in out and "area-resize to 32x32" in out
    assert not (tmp_path / "r").exists()
    rc, out, _ = run(["train", "--data", str(src), "--resolution", "16", "--size", "small", "--dry-run"], capsys)
    assert rc == 0 and dry_config(out)["model"]["resolution"] == 16 and dry_config(out)["model"]["ch"] == 64


def test_mixed_folder_says_what_it_did(tmp_path, capsys):
    src = write_folder(tmp_path / "mixed", 2, (20, 20), "RGB")
    write_folder(src, 3, (24, 18), "L", seed=1, start=2)
    rc, out, err = run(["train", "--data", str(src), "--dry-run"], capsys)
    assert rc == 0, err
    cfg = dry_config(out)
    assert cfg["model"]["in_channels"] == 3 and cfg["model"]["resolution"] == 16
    assert "modes L (3), RGB (2)" in out and "native 24x18 (3), 20x20 (2)" in out
    for needle in ("centre-crop to a square", "area-resize to 16x16", "repeat 3 grey images into RGB",
                   "3 channels because some images are in colour", "no flips"):  # tiny (the CPU default) trains without flips
        assert needle in out, needle
    rc, out, err = run(["train", "--data", str(src), "--size", "small", "--dry-run"], capsys)
    assert rc == 0 and "random left-right flips" in out  # the long-run sizes keep the paper's flips


def test_explicit_preset_on_other_data_prints_one_notice(tmp_path, capsys):
    src = write_folder(tmp_path / "myimgs", 2, (48, 48), "RGB")
    rc, out, err = run(["train", "--preset", "digits", "--data", str(src), "--dry-run"], capsys)
    assert rc == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1
    assert "48x48 RGB" in notes[0] and "preset digits trains 8x8 grey" in notes[0] and "drop --preset" in notes[0]
    rc, out, _ = run(["train", "--data", str(src), "--dry-run"], capsys)  # fitted: no notice
    assert rc == 0 and "note:" not in out


def test_size_or_resolution_with_a_preset_is_a_one_line_error(tmp_path, capsys):
    for argv in (["train", "--preset", "digits", "--size", "tiny", "--dry-run"],
                 ["train", "--resolution", "32", "--dry-run"],
                 ["train", "--data", str(tmp_path), "--resolution", "40", "--dry-run"]):
        write_folder(tmp_path, 1, (64, 64), "RGB")
        rc, _, err = run(argv, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)


def test_loader_line_suggests_prepare_only_when_the_loader_is_the_bottleneck():
    cfg = config_for(32, 3, "tiny", "imgs")  # batch 32
    m = StepMeasure(seconds=1.0, params=1, state_bytes=20, activation_bytes=0, measured_batch=4, micro_batch=32)
    slow = loader_line(cfg, rate=64.0, m=m, source_kind="folder")  # 0.5 s of decoding per 1 s step
    assert "bottleneck" in slow and "ddpm data prepare imgs OUT.npy --resolution 32 --channels 3" in slow
    assert "train.num_workers" in slow
    assert "bottleneck" not in loader_line(cfg, rate=10_000.0, m=m, source_kind="folder")
    assert "bottleneck" not in loader_line(cfg, rate=64.0, m=m, source_kind="prepared")


_MEASURE = r"""
import sys
from dataclasses import replace
import torch
torch.set_num_threads(1)
from ddpm.sizes import config_for
from ddpm.plan import measure_step
import ddpm.diffusion, ddpm.nets.unet, ddpm.winograd, ddpm.training.precision
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
b = int(sys.argv[1])
cfg = config_for(32, 3, "tiny", "x")
cfg = replace(cfg, train=replace(cfg.train, batch_size=b))
before = status("VmRSS")
m = measure_step(cfg, "cpu", batch=b)
print(m.activation_bytes, m.estimate_bytes, status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_estimate_matches_the_measured_peak_per_image():
    """Method: each batch size runs in a fresh subprocess that reads VmRSS before the warm-up
    step and VmHWM (peak resident set) after it; the difference between two batch sizes is the
    memory the extra images cost, which the estimate's activation term must match. glibc's
    dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed blocks go back to the OS:
    otherwise the peak also counts what the allocator keeps, not what the step needs. The
    batch-independent rest (the runtime's kernels and caches, ~100-200 MiB) is not estimated."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = {}
    for b in (4, 20):
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(b)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        res[b] = [int(v) for v in r.stdout.split()[-3:]]
    est_per_image = (res[20][0] - res[4][0]) / 16
    measured_per_image = (res[20][2] - res[4][2]) / 16
    assert est_per_image > 0
    # within 30%: page granularity and the allocator's own bookkeeping are the rest
    assert 0.7 < est_per_image / measured_per_image < 1.3, (est_per_image, measured_per_image)
    assert res[20][1] < res[20][2]  # the estimate never claims more than the process used


def test_warm_up_step_leaves_the_global_rng_untouched():
    import torch

    from ddpm.plan import measure_step

    cfg = config_for(8, 1, "tiny", "x")
    torch.manual_seed(42)
    before = torch.get_rng_state()
    m = measure_step(cfg, "cpu", batch=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert m.seconds > 0 and m.params == 702_499 - (2 * 9 * 32 + 2 * 9 * 32 + 2) and m.activation_bytes > 0
    assert m.estimate_bytes >= m.state_bytes == 20 * m.params


def test_data_digits_alone_keeps_the_digits_preset():
    from argparse import Namespace

    from ddpm.commands.train import resolve_train_config

    args = dict(preset=None, out=None, resume=None, overrides=[], device="cpu")
    assert resolve_train_config(Namespace(data="digits", size=None, resolution=None, **args)).preset == "digits"
    fitted = resolve_train_config(Namespace(data="digits", size="tiny", resolution=16, **args))
    assert fitted.preset == "tiny16" and fitted.model.in_channels == 1
