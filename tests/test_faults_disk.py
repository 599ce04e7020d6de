"""A full disk: a write that fails for lack of space ends the run in one line naming the file and
the space it needed, leaves the previous file (checkpoint, chunk, output) valid and no partial
file, and the same command continues bit-exactly once there is room.

Two ways to fill the disk: a real small tmpfs (``mount -t tmpfs -o size=...``; skipped where
mounting is not permitted), grown with ``mount -o remount,size=...`` to make room; and writes
made to fail with ENOSPC/EDQUOT at ``os.fsync`` (some filesystems report a full disk only there)
or at ``os.write`` for every writer the package has.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.chunks import parts_dir
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset
from ddpm.errors import CheckpointError, DiskFullError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=20", "train.batch_size=8", "train.total_steps=4",
        "train.save_every=2", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
        "train.keep_last=1"]


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


_real_fsync = os.fsync


def _fsync_fails_at_call(monkeypatch, module, name: str, k: int) -> list[int]:
    """Wrap the writer ``module.name``: its k-th call meets an fsync failing with ENOSPC (as on a
    full disk), the others a working one. Returns the call counter ([n])."""
    real, calls = getattr(module, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            monkeypatch.setattr(os, "fsync", _enospc)
        try:
            return real(*args, **kwargs)
        finally:
            monkeypatch.setattr(os, "fsync", _real_fsync)

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.fixture
def small_fs(tmp_path):
    """``mount(size)`` mounts a tmpfs of ``size`` bytes on a fresh folder and returns it;
    ``grow(folder, size)`` remounts it larger. Unmounted at the end; skipped without permission."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(d)
        return d

    def grow(d: Path, size: int) -> None:
        r = subprocess.run(["mount", "-o", f"remount,size={size}", str(d)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    yield mount, grow
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


# ----------------------------------------------------------------------------------------------
# training on a disk that fills up


def _train(cfg, out: Path, resume=None) -> tuple[dict, list[str]]:
    from ddpm.training.loop import train

    lines: list[str] = []
    return train(cfg, out, resume=resume, device="cpu", progress=False, log=lines.append), lines


def test_checkpoint_on_a_full_tmpfs_stops_cleanly_and_resumes_bit_exactly(tmp_path, small_fs):
    mount, grow = small_fs
    cfg = apply_overrides(get_preset("digits"), TINY)
    ref, _ = _train(cfg, tmp_path / "ref")  # uninterrupted, on the ordinary disk
    ckpt_size = Path(ref["checkpoint"]).stat().st_size
    # room for config, metrics and one checkpoint (step 2), not for a second one beside it
    fs = mount(int(ckpt_size * 1.5) // 4096 * 4096)
    run = fs / "run"
    with pytest.raises(CheckpointError) as ei:
        _train(cfg, run)
    msg = str(ei.value)
    target = run / "checkpoints" / "ckpt_000000004.safetensors"
    assert "\n" not in msg and str(target) in msg and "No space left on device" in msg, msg
    assert "--resume auto" in msg and "intact" in msg and "needs" in msg and "free" in msg, msg
    assert not target.exists() and not _temps(fs), "a partial file was left on the full disk"
    kept = run / "checkpoints" / "ckpt_000000002.safetensors"
    assert load_checkpoint(kept)[1]["step"] == 2  # the previous checkpoint is valid (digest checked)
    assert (run / "checkpoints" / "latest").read_text().strip() == kept.name
    grow(fs, 8 * ckpt_size)  # space is freed: the same run continues
    res, lines = _train(cfg, run, resume="auto")
    assert res["step"] == 4 and any("resumed from" in ln for ln in lines), lines
    a, b = load_checkpoint(res["checkpoint"])[0], load_checkpoint(ref["checkpoint"])[0]
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def test_low_space_is_announced_before_the_write_that_fails(tmp_path, small_fs):
    """After each checkpoint the free space is compared with that checkpoint's size: the warning
    comes one checkpoint before the failure."""
    mount, _ = small_fs
    cfg = apply_overrides(get_preset("digits"), TINY)
    ref, _ = _train(cfg, tmp_path / "ref")
    ckpt_size = Path(ref["checkpoint"]).stat().st_size
    fs = mount(int(ckpt_size * 1.5) // 4096 * 4096)
    from ddpm.training.loop import train

    lines: list[str] = []
    with pytest.raises(CheckpointError):
        train(cfg, fs / "run", device="cpu", progress=False, log=lines.append)
    warn = [ln for ln in lines if "low disk space" in ln]
    # after ckpt 2 is written: "the next checkpoint needs ~S but only F is free"; before ckpt 4
    # is written, the same for ckpt_000000004 itself
    assert len(warn) == 2, lines
    assert "the next checkpoint" in warn[0] and str(fs / "run" / "checkpoints") in warn[0], warn[0]
    assert "ckpt_000000004.safetensors" in warn[1], warn[1]


def test_fsync_enospc_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The same without a real full disk: the 2nd checkpoint's fsync fails with ENOSPC."""
    import ddpm.checkpoint as ck

    cfg = apply_overrides(get_preset("digits"), TINY)
    calls = _fsync_fails_at_call(monkeypatch, ck, "atomic_write_bytes", 2)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device"):
        _train(cfg, run)
    monkeypatch.undo()
    assert calls[0] == 2
    assert not _temps(run)
    assert load_checkpoint(run / "checkpoints" / "ckpt_000000002.safetensors")[1]["step"] == 2
    res, _ = _train(cfg, run, resume="auto")
    ref, _ = _train(cfg, tmp_path / "ref")
    a, b = load_checkpoint(res["checkpoint"])[0], load_checkpoint(ref["checkpoint"])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_line_on_a_full_disk_is_not_torn(tmp_path, monkeypatch):
    from ddpm.training.observe import MetricsWriter

    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write({"step": 1, "loss": 0.5})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the kernel takes a few bytes, then the disk is full
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError) as ei:
        w.write({"step": 2, "loss": 0.25})
    monkeypatch.undo()
    assert str(tmp_path / "metrics.jsonl") in str(ei.value)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# every atomic writer: ENOSPC / EDQUOT -> one line naming the file and the bytes


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_every_writer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, err):
    from test_atomic_outputs import WRITERS

    for name, writer in sorted(WRITERS.items()):
        target = tmp_path / name
        writer(target)
        old = target.read_bytes()

        def fsync(fd):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises((DiskFullError, CheckpointError)) as ei:  # CheckpointError for checkpoints
            writer(target)
        monkeypatch.undo()
        msg = str(ei.value)
        assert "\n" not in msg and str(target) in msg and os.strerror(err) in msg, (name, msg)
        assert "needs" in msg and "free" in msg, (name, msg)
        assert target.read_bytes() == old, f"{name}: the previous file changed"
        assert not _temps(tmp_path), f"{name}: a temporary file was left"


# ----------------------------------------------------------------------------------------------
# ddpm sample onto a full disk


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from test_faults_sampling import tiny_checkpoint  # the same tiny U-Net

    return tiny_checkpoint(tmp_path_factory.mktemp("disk") / "weights.safetensors")


def _sample_argv(ckpt: Path, out: Path) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--out", str(out), "--n", "12", "--chunk-size", "2",
            "--batch-size", "2", "--seed", "5", "--no-progress", "--device", "cpu"]


def test_sample_chunks_on_a_full_tmpfs_resume_bit_exactly(ckpt, tmp_path, small_fs, capsys):
    mount, grow = small_fs
    ref = tmp_path / "ref.npz"
    assert main(_sample_argv(ckpt, ref)) == 0
    fs = mount(6 * 4096)  # a page per file: the manifest and a few chunks fit, not six
    out = fs / "s.npz"
    rc = main(_sample_argv(ckpt, out))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and ".parts/chunk_" in lines[0] and "needs" in lines[0], lines[0]
    parts = parts_dir(out)
    kept = sorted(p.name for p in parts.glob("chunk_*.npz"))
    assert 1 <= len(kept) < 6 and not _temps(fs) and not out.exists()
    grow(fs, 1 << 20)
    assert main(_sample_argv(ckpt, out)) == 0
    with np.load(out) as a, np.load(ref) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert not parts.exists()


def test_sample_enospc_at_the_kth_chunk_resumes_bit_exactly(ckpt, tmp_path, monkeypatch, capsys):
    import ddpm.chunks as chunks

    ref = tmp_path / "ref.npz"
    assert main(_sample_argv(ckpt, ref)) == 0
    out = tmp_path / "s.npz"
    _fsync_fails_at_call(monkeypatch, chunks, "write_chunk", 3)
    capsys.readouterr()
    assert main(_sample_argv(ckpt, out)) == 2
    err = capsys.readouterr().err
    assert "chunk_000002.npz" in err and "No space left on device" in err, err
    monkeypatch.undo()
    assert sorted(p.name for p in parts_dir(out).glob("chunk_*")) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not _temps(tmp_path)
    assert main(_sample_argv(ckpt, out)) == 0
    with np.load(out) as a, np.load(ref) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
