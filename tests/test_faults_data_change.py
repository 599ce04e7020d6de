"""Data that changes under a training run.

An image file deleted, truncated or replaced by a non-image while the run goes on: the run stops
with a checkpoint of the last finished step and a one-line message naming the file; once the
file is back, ``--resume auto`` gives the weights of a run that never stopped. With
``data.skip_bad_images`` the file is skipped and counted in metrics.jsonl. A prepared ``.npy``
that changed since the checkpoint (re-prepared, or edited in place) is refused at resume.

The change happens between two steps: ``loop.train_step`` is wrapped to touch the file after
the k-th step (the next epoch's batches then need it: 16 images, batches of 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import load_checkpoint
from ddpm.config import apply_overrides, get_preset
from ddpm.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=20", "train.batch_size=8", "train.total_steps=6",
        "train.save_every=0", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
        "train.keep_last=5"]
VICTIM = "img_05.png"


def _folder(root: Path, n: int = 16) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    return root


def _cfg(source: Path, *extra: str):
    return apply_overrides(get_preset("digits"), TINY + [f"data.source={source}", *extra])


def _change(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:30])
    elif how == "replaced":
        path.write_bytes(b"this is not an image any more\n")
    else:  # pragma: no cover
        raise ValueError(how)


def _train(cfg, out: Path, monkeypatch=None, after_step: int | None = None, change=None, resume=None):
    """train(); with ``change`` applied right after step ``after_step`` (1-based count of steps)."""
    import ddpm.training.loop as loop

    if change is not None:
        real, done = loop.train_step, [0]

        def step(parts, batch, s):
            r = real(parts, batch, s)
            done[0] += 1
            if done[0] == after_step:
                change()
            return r

        monkeypatch.setattr(loop, "train_step", step)
    lines: list[str] = []
    try:
        return loop.train(cfg, out, resume=resume, device="cpu", progress=False, log=lines.append), lines
    finally:
        if change is not None:
            monkeypatch.undo()


@pytest.mark.parametrize("how", ["deleted", pytest.param("truncated", marks=pytest.mark.slow),
                                 pytest.param("replaced", marks=pytest.mark.slow)])
def test_a_file_that_goes_bad_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, how):
    data = _folder(tmp_path / "data")
    victim = data / VICTIM
    original = victim.read_bytes()
    cfg = _cfg(data)
    ref, _ = _train(cfg, tmp_path / "ref")  # the data never changes
    run = tmp_path / "run"
    with pytest.raises(DataError) as ei:
        _train(cfg, run, monkeypatch, after_step=2, change=lambda: _change(victim, how))
    msg = str(ei.value)
    assert "\n" not in msg and str(victim) in msg and "--resume auto" in msg, msg
    step = int(msg.split("stopping at step ")[1].split(":")[0])
    assert 2 <= step < 6, msg  # the epoch after step 2 needs the file within two steps
    tensors, meta = load_checkpoint(run / "checkpoints" / f"ckpt_{step:09d}.safetensors")
    assert meta["step"] == step and f"ckpt_{step:09d}" in msg
    victim.write_bytes(original)  # the file is back
    res, lines = _train(cfg, run, resume="auto")
    assert res["step"] == 6 and any("resumed from" in ln for ln in lines)
    a, b = load_checkpoint(res["checkpoint"])[0], load_checkpoint(ref["checkpoint"])[0]
    for k in b:
        assert torch.equal(a[k], b[k]), f"{k} differs from the run whose data never changed"


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["in-process", "1-worker"])
def test_skip_bad_images_skips_and_counts_the_file(tmp_path, monkeypatch, workers):
    data = _folder(tmp_path / "data")
    victim = data / VICTIM
    cfg = _cfg(data, "data.skip_bad_images=true", f"train.num_workers={workers}")
    if workers == 0:  # truncated after step 2
        res, lines = _train(cfg, tmp_path / "run", monkeypatch, after_step=2,
                            change=lambda: _change(victim, "truncated"))
        assert any("skipping bad image" in ln and str(victim) in ln for ln in lines), lines
    else:  # a worker decodes batches ahead: the file is truncated before the run (its header
        # still readable, so the folder's first scan keeps it and the worker meets it); the
        # worker's warning stays in the worker, its count comes back with the batch
        victim.write_bytes(victim.read_bytes()[:60])
        res, lines = _train(cfg, tmp_path / "run")
    assert res["step"] == 6
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if workers == 0:
        assert recs[0]["skipped_images"] == 0 and recs[1]["skipped_images"] == 0
    assert recs[-1]["skipped_images"] == 1, recs  # counted once: the file is remembered as bad


# ----------------------------------------------------------------------------------------------
# prepared arrays


def test_a_prepared_array_changed_since_the_checkpoint_is_refused(tmp_path):
    from ddpm.prepare import prepare

    data = _folder(tmp_path / "data")
    npy = tmp_path / "prep.npy"
    prepare(str(data), npy, 8, 1)
    cfg = _cfg(npy, "train.total_steps=2", "train.save_every=2")
    run = tmp_path / "run"
    _train(cfg, run)
    more = _cfg(npy, "train.total_steps=4", "train.save_every=2")
    # 1. prepared again from other images: .npy and .json agree with each other, not with the run
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / VICTIM)
    prepare(str(data), npy, 8, 1)
    with pytest.raises(DataError) as ei:
        _train(more, run, resume="auto")
    msg = str(ei.value)
    assert str(npy) in msg and "changed since the checkpoint" in msg and "\n" not in msg, msg
    # 2. edited in place (the .json not updated): refused when opened, as before
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256"):
        _train(more, run, resume="auto")
    # 3. truncated: refused by size
    npy.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match="truncated"):
        _train(more, run, resume="auto")
    # the run itself is untouched and continues with its own data
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)[5]).save(data / VICTIM)
    prepare(str(data), npy, 8, 1)
    res, _ = _train(more, run, resume="auto")
    assert res["step"] == 4
