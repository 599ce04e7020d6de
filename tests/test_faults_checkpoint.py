"""Fault injection against the checkpoint file format (``ddpm.checkpoint``).

Every fault must end in a :class:`CheckpointError` whose message names the file and the
problem; nothing is ever unpickled; a failed save leaves the previous file byte-identical.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddpm import checkpoint as ck
from ddpm.checkpoint import (checkpoint_name, list_checkpoints, load_checkpoint, read_meta, resolve_checkpoint,
                             save_checkpoint)
from ddpm.errors import CheckpointError, UserError

# ----------------------------------------------------------------------------------------------
# helpers


def _tensors(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    """A small trainer-like tensor set: weights, EMA, Adam state incl. 0-dim ``step`` tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "ema/conv.weight": torch.randn(8 * scale, 4, 3, 3, generator=g),
        "ema/conv.bias": torch.randn(8 * scale, generator=g),
        "model/conv.weight": torch.randn(8 * scale, 4, 3, 3, generator=g),
        "model/conv.bias": torch.randn(8 * scale, generator=g),
        "optim/state.0.exp_avg": torch.randn(8 * scale, 4, 3, 3, generator=g),
        "optim/state.0.step": torch.tensor(float(seed + 3)),
        "rng/torch": torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8),
        "rng/counter": torch.tensor(seed + 11, dtype=torch.int64),
    }
    return out


def _meta(step: int = 3) -> dict:
    return {"config": {"model": {"ch": 32}, "train": {"lr": 0.002}}, "step": step, "kind": "train"}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _expect_error(path: Path, *words: str) -> str:
    """Load ``path`` and require a CheckpointError naming the file and one of ``words``.

    Returns the message with the path cut out, lower-cased (test folder names contain words
    like "truncated" or "pickle", which must not satisfy the checks).
    """
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    text = msg.replace(str(path), "").lower()
    if words:
        assert any(w in text for w in words), msg
    return text


@pytest.fixture()
def good(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "good.safetensors"
    save_checkpoint(p, _tensors(), _meta())
    return p, p.read_bytes()


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


# ----------------------------------------------------------------------------------------------
# sanity: the good file round-trips (so the failures below are caused by the fault)


def test_roundtrip_including_scalars(good):
    path, _ = good
    tensors, meta = load_checkpoint(path)
    want = _tensors()
    assert sorted(tensors) == sorted(want)
    for k in want:
        assert torch.equal(tensors[k], want[k]), k
    assert meta["step"] == 3 and meta["config"] == _meta()["config"]


def test_tensors_sharing_memory_are_saved(tmp_path):
    """The same weights under ema/ and model/ (step 0, converted weights) and two views of one buffer."""
    w = torch.randn(6, 4)
    tensors = {"ema/w": w, "model/w": w, "model/a": w[:3], "model/b": w[3:], "ema/empty": torch.zeros(0),
               "model/empty": torch.zeros(0)}
    p = tmp_path / "shared.safetensors"
    save_checkpoint(p, tensors, _meta())
    got, _ = load_checkpoint(p)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k


def test_saved_file_mode_follows_umask(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the result must look like a normally created file."""
    old = os.umask(0o022)
    try:
        p = tmp_path / "ckpt.safetensors"
        save_checkpoint(p, _tensors(), _meta())
        assert (p.stat().st_mode & 0o777) == 0o644
        os.umask(0o027)
        save_checkpoint(p, _tensors(), _meta())  # overwrite
        assert (p.stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------
# truncation, empty, flipped bytes


def test_empty_file(tmp_path):
    p = _write(tmp_path / "ckpt_000000001.safetensors", b"")
    _expect_error(p, "empty")


def test_truncated_at_many_offsets(good, tmp_path):
    path, data = good
    n = _header_len(data)
    data_start = 8 + n
    cuts = {1, 4, 7, 8, 9, 20, data_start // 2, data_start - 1, data_start, data_start + 1,
            data_start + 5, (data_start + len(data)) // 2, len(data) - 4, len(data) - 1}
    rng = random.Random(0)
    cuts |= {rng.randrange(1, len(data)) for _ in range(10)}
    for cut in sorted(cuts):
        p = _write(tmp_path / f"cut_{cut}.safetensors", data[:cut])
        _expect_error(p, "truncated")


def test_flipped_bytes_in_tensor_data(good, tmp_path):
    path, data = good
    start = 8 + _header_len(data)
    rng = random.Random(1)
    positions = sorted({start, len(data) - 1, *(rng.randrange(start, len(data)) for _ in range(20))})
    for i, pos in enumerate(positions):
        for bit in (0x01, 0x80):
            d = bytearray(data)
            d[pos] ^= bit
            p = _write(tmp_path / f"flip_{i}_{bit}.safetensors", bytes(d))
            text = _expect_error(p, "checksum")
            assert "corrupt" in text


def test_single_bit_flips_anywhere_in_header(good, tmp_path):
    """Every single-bit flip in the 8-byte length or the JSON header is detected.

    Includes flips that keep the JSON valid (a digit of ``step`` or ``lr``, a letter of a config
    key): they would otherwise load silently with a different step or config.
    """
    path, data = good
    end = 8 + _header_len(data)
    p = tmp_path / "flip.safetensors"
    undetected = []
    rng = random.Random(2)
    for pos in range(end):
        # every position with its lowest bit (digit 3 <-> 2, letter c <-> b), a sample with bit 2
        for bit in (0x01, 0x04) if rng.random() < 0.2 else (0x01,):
            d = bytearray(data)
            d[pos] ^= bit
            p.write_bytes(bytes(d))
            try:
                load_checkpoint(p)
            except CheckpointError as e:
                msg = str(e)
                assert str(p) in msg and "\n" not in msg, msg
                text = msg.replace(str(p), "").lower()
                assert any(w in text for w in ("corrupt", "truncated", "checksum", "not a ddpm checkpoint")), msg
            else:
                undetected.append((pos, chr(data[pos]), bit))
    assert not undetected, f"{len(undetected)} header bit flips loaded silently, e.g. {undetected[:8]}"


def test_read_meta_detects_header_corruption(good, tmp_path):
    """``read_meta`` (used to read the step/config without the tensors) must not return a changed step."""
    path, data = good
    pos = data.index(b'\\"step\\": 3') + len(b'\\"step\\": ')
    d = bytearray(data)
    d[pos] ^= 0x01  # '3' -> '2': still valid JSON
    p = _write(tmp_path / "step.safetensors", bytes(d))
    with pytest.raises(CheckpointError) as ei:
        read_meta(p)
    assert str(p) in str(ei.value) and "corrupt" in str(ei.value).replace(str(p), "")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    _expect_error(p, "not found")


def test_foreign_safetensors_file_is_not_ours(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(p))
    _expect_error(p, "not a ddpm checkpoint")


# ----------------------------------------------------------------------------------------------
# another config: shape mismatch when loading into a model


class _Net(torch.nn.Module):
    def __init__(self, ch: int, extra: bool = False):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, ch, 3)
        self.norm = torch.nn.GroupNorm(1, ch)
        self.out = torch.nn.Linear(ch, 2)
        if extra:
            self.head = torch.nn.Linear(2, 2)


def test_checkpoint_of_another_config_lists_differing_shapes(tmp_path):
    from ddpm.api import load_state_strict

    small, big = _Net(32), _Net(64, extra=True)
    p = tmp_path / "ckpt_000000010.safetensors"
    save_checkpoint(p, ck.add_prefix(small.state_dict(), "ema/"), _meta(10))
    tensors, _ = load_checkpoint(p, prefixes=["ema/"])
    state = ck.split_prefix(tensors, "ema/")
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(CheckpointError) as ei:
        load_state_strict(big, state, p)
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg
    assert "conv_in.weight" in msg and "(32, 1, 3, 3)" in msg and "(64, 1, 3, 3)" in msg, msg
    assert "head.weight" in msg, msg  # the key the checkpoint lacks
    # the model is left as it was (no partial load)
    for k, v in big.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unet_checkpoint_of_another_config(tmp_path):
    """The real network: a ch=32 checkpoint loaded into a ch=64 U-Net names the first mismatching keys."""
    unet = pytest.importorskip("ddpm.nets.unet")
    from ddpm.api import load_state_strict

    kw = dict(in_channels=1, out_channels=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              dropout=0.0, resolution=8)
    a, b = unet.UNet(ch=32, **kw), unet.UNet(ch=64, **kw)
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, ck.add_prefix(a.state_dict(), "ema/"), _meta())
    state = ck.split_prefix(load_checkpoint(p)[0], "ema/")
    with pytest.raises(CheckpointError) as ei:
        load_state_strict(b, state, p)
    msg = str(ei.value)
    first = next(k for k in b.state_dict() if b.state_dict()[k].shape != a.state_dict()[k].shape)
    assert str(p) in msg and first in msg and "shape mismatch" in msg, msg


# ----------------------------------------------------------------------------------------------
# pickles are never loaded


class _Evil:
    """Unpickling this creates ``marker`` (it calls ``open(marker, 'w')``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"ema/conv.weight": _Evil(marker)}, protocol=4)


def _evil_torch_save(marker: Path, path: Path) -> None:
    torch.save({"state_dict": _Evil(marker)}, str(path))


def _evil_files(tmp_path: Path):
    marker = tmp_path / "PWNED"
    # the payload is live: plain pickle.loads would create the marker
    pickle.loads(_evil_pickle(tmp_path / "live_check"))
    assert (tmp_path / "live_check").exists()

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    targets = [run / "checkpoints" / checkpoint_name(5), tmp_path / "model.pt", tmp_path / "pytorch_model.bin",
               tmp_path / "weights.ckpt"]
    for t in targets:
        t.write_bytes(_evil_pickle(marker))
    zipped = tmp_path / "zipped.pt"
    _evil_torch_save(marker, zipped)
    targets.append(zipped)
    (run / "checkpoints" / "latest").write_text(checkpoint_name(5))

    return marker, run, targets


def test_evil_pickle_at_checkpoint_path_is_refused(tmp_path):
    marker, run, targets = _evil_files(tmp_path)
    for t in targets:
        text = _expect_error(t, "not a ddpm checkpoint")
        assert "pickle" in text or "torch.save" in text, text
        with pytest.raises(CheckpointError):
            read_meta(t)
    # through the run folder, as `ddpm sample --ckpt RUN` and resume do
    with pytest.raises(CheckpointError):
        load_checkpoint(resolve_checkpoint(run))
    assert not marker.exists(), "a pickle was unpickled"


def test_evil_pickle_refused_by_ddpm_load(tmp_path):
    pytest.importorskip("ddpm.diffusion")
    pytest.importorskip("ddpm.nets.unet")
    from ddpm.api import load

    marker, run, targets = _evil_files(tmp_path)
    for t in [run, *targets]:
        with pytest.raises(CheckpointError):
            load(t, device="cpu")
    assert not marker.exists(), "a pickle was unpickled"


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_evil_bin_in_diffusers_folder_is_refused(tmp_path, fmt, capsys):
    """``convert from-diffusers`` reads a ``.bin`` only as plain tensors: the payload never runs."""
    diffusers = pytest.importorskip("ddpm.interop.diffusers")
    from ddpm.cli import main
    from ddpm.config import apply_overrides, get_preset
    from ddpm.nets.unet import UNet

    cfg = apply_overrides(get_preset("digits"), ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1",
                                                 "model.attn_resolutions=4", "diffusion.num_timesteps=20"])
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(ours, ck.add_prefix(UNet.from_config(cfg.model, cfg.out_channels).state_dict(), "ema/"),
                    {"config": cfg.to_dict(), "step": 0, "kind": "weights"})
    folder = tmp_path / "hub"
    diffusers.to_diffusers_dir(ours, folder)  # a valid config.json for a tiny UNet2DModel
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    bin_ = folder / "diffusion_pytorch_model.bin"
    if fmt == "torch.save":
        _evil_torch_save(marker, bin_)
        live = tmp_path / "live.bin"
        _evil_torch_save(tmp_path / "live_check", live)
        torch.load(live, weights_only=False)  # the payload is live under a plain (unsafe) load
        assert (tmp_path / "live_check").exists()
    else:
        bin_.write_bytes(_evil_pickle(marker))
    out = tmp_path / "converted.safetensors"
    with pytest.raises(CheckpointError) as ei:
        diffusers.from_diffusers_dir(folder, out)
    assert str(bin_) in str(ei.value)
    rc = main(["convert", "from-diffusers", str(folder), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not marker.exists(), "a pickle was unpickled"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# disk full while saving


class _ENOSPCFile:
    """A file object that writes ``limit`` bytes for real, then fails like a full disk."""

    def __init__(self, real, limit: int, log: list):
        self.real, self.limit, self.log = real, limit, log

    def write(self, data):
        self.log.append(len(data))
        n = min(len(data), self.limit)
        self.real.write(bytes(data[:n]))
        self.real.flush()
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_disk_full_during_save_keeps_previous(tmp_path, monkeypatch, fraction):
    p = tmp_path / "ckpt_000000001.safetensors"
    save_checkpoint(p, _tensors(0), _meta(1))
    before = p.read_bytes()
    new = _tensors(1, scale=4)  # larger than the old file

    real_fdopen = os.fdopen
    log: list = []

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        size = sum(t.numel() * t.element_size() for t in new.values())
        return _ENOSPCFile(f, int(size * fraction), log)

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(p, new, _meta(2))
    monkeypatch.undo()
    assert log, "the fault was not injected (save no longer writes through os.fdopen?)"
    msg = str(ei.value)
    assert str(p) in msg and "No space left on device" in msg and "intact" in msg, msg
    assert p.read_bytes() == before
    assert load_checkpoint(p)[1]["step"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name], "temporary file left behind"


def test_fsync_failure_during_save_keeps_previous(tmp_path, monkeypatch):
    """Some filesystems report a full disk only at fsync."""
    p = tmp_path / "ckpt_000000001.safetensors"
    save_checkpoint(p, _tensors(0), _meta(1))
    before = p.read_bytes()
    calls = []

    def fsync(fd):
        calls.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(p, _tensors(1), _meta(2))
    monkeypatch.undo()
    assert calls
    assert "No space left on device" in str(ei.value)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


def test_real_write_failure_file_size_limit(tmp_path):
    """A real kernel write failure (RLIMIT_FSIZE -> EFBIG) part-way through, in a child process."""
    p = tmp_path / "ckpt_000000001.safetensors"
    save_checkpoint(p, _tensors(0), _meta(1))
    before = p.read_bytes()
    limit = len(before) + 1000  # the new, 16x larger file cannot fit
    code = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_faults_checkpoint import _tensors, _meta
        from ddpm.checkpoint import save_checkpoint
        from ddpm.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            save_checkpoint({str(p)!r}, _tensors(1, scale=16), _meta(2))
        except CheckpointError as e:
            print("ERR", e)
        else:
            print("SAVED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR ") and str(p) in r.stdout and "intact" in r.stdout, r.stdout
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


# ----------------------------------------------------------------------------------------------
# resolve_checkpoint


def _run_with(tmp_path: Path, steps: list[int]) -> Path:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for s in steps:
        save_checkpoint(folder / checkpoint_name(s), _tensors(s), _meta(s))
    return tmp_path / "run"


def test_resolve_latest_pointer_to_missing_file_falls_back_to_newest(tmp_path):
    run = _run_with(tmp_path, [2, 10, 4])
    (run / "checkpoints" / "latest").write_text(checkpoint_name(12) + "\n")
    assert resolve_checkpoint(run) == run / "checkpoints" / checkpoint_name(10)
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / checkpoint_name(10)


def test_resolve_follows_latest_pointer(tmp_path):
    run = _run_with(tmp_path, [2, 10, 4])
    (run / "checkpoints" / "latest").write_text(checkpoint_name(4))
    assert resolve_checkpoint(run) == run / "checkpoints" / checkpoint_name(4)


@pytest.mark.parametrize("pointer", ["", "\n", "garbage", None])
def test_resolve_bad_or_missing_pointer(tmp_path, pointer):
    run = _run_with(tmp_path, [1, 3])
    if pointer is not None:
        (run / "checkpoints" / "latest").write_text(pointer)
    assert resolve_checkpoint(run) == run / "checkpoints" / checkpoint_name(3)


def test_resolve_ignores_temp_files_and_empty_run(tmp_path):
    run = _run_with(tmp_path, [1])
    # a temp file left by a crash mid-save is never picked
    (run / "checkpoints" / f".{checkpoint_name(2)}.abc123.tmp").write_bytes(b"partial")
    assert list_checkpoints(run / "checkpoints") == [run / "checkpoints" / checkpoint_name(1)]
    assert resolve_checkpoint(run) == run / "checkpoints" / checkpoint_name(1)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "missing_run")
