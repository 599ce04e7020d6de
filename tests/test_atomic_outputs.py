"""Every output file is written atomically: a process killed while writing one leaves the old
file (or none), never a torn or half-new one, and no temporary file under the target's name.

The kill is simulated by making ``os.fsync`` (called just before the rename) raise
KeyboardInterrupt, i.e. a crash after the bytes were written but before they were committed. A
plain ``open(path, "w")`` writer would already have replaced the old contents at that point.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


class _Killed(KeyboardInterrupt):
    pass


def _kill_at_fsync(monkeypatch):
    def fsync(fd):
        raise _Killed()

    monkeypatch.setattr(os, "fsync", fsync)


def _nll_result():
    from ddpm.evaluate.nll import NLLResult

    T = 4
    return NLLResult(n=2, total_bpd=1.0, total_bpd_stderr=0.1, prior_bpd=0.0, decoder_bpd=0.5, rate_bpd=0.5,
                     per_image_total_bpd=np.array([1.0, 1.0]), terms_bpd=np.full(T, 0.125), mse=np.full(T, 0.01),
                     meta={})


def _rows():
    from ddpm.evaluate.rd import rate_distortion

    return rate_distortion(_nll_result())


def _write_nll(p):
    _nll_result().save(p)


def _write_rd_json(p):
    from ddpm.evaluate.rd import save_rd

    save_rd(_rows(), json_path=p)


def _write_rd_csv(p):
    from ddpm.evaluate.rd import save_rd

    save_rd(_rows(), csv_path=p)


def _write_rd_png(p):
    from ddpm.evaluate.rd import plot_rd

    plot_rd(_rows(), p)


def _write_grid(p):
    from ddpm.images import save_grid

    save_grid(np.zeros((4, 8, 8, 1), np.uint8), p)


def _write_labelled(p):
    from ddpm.evaluate.figures import save_labelled_grid

    save_labelled_grid(torch.zeros(1, 2, 1, 8, 8), p)


def _write_progressive(p):
    from ddpm.evaluate.figures import save_progressive

    save_progressive(torch.zeros(2, 3, 1, 8, 8), [10, 5, 0], p)


def _write_samples_npz(p):  # what `ddpm sample` writes
    from ddpm.atomic import atomic_write_npz

    atomic_write_npz(p, arr_0=np.zeros((2, 8, 8, 1), np.uint8))


def _write_quality_json(p):  # what `ddpm eval quality` / `ddpm eval fid` write
    from ddpm.atomic import atomic_write_json

    atomic_write_json(p, {"fd": 1.0})


def _write_checkpoint(p):
    from ddpm.checkpoint import save_checkpoint

    save_checkpoint(p, {"ema/w": torch.zeros(3)}, {"config": {}})


WRITERS = {
    "nll.json": _write_nll, "rd.json": _write_rd_json, "rd.csv": _write_rd_csv, "rd.png": _write_rd_png,
    "grid.png": _write_grid, "labelled.png": _write_labelled, "progressive.png": _write_progressive,
    "samples.npz": _write_samples_npz, "quality.json": _write_quality_json, "ckpt.safetensors": _write_checkpoint,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_killed_write_keeps_the_old_file(tmp_path, monkeypatch, name):
    target = tmp_path / name
    WRITERS[name](target)  # a first, complete write works and produces something
    assert target.stat().st_size > 0
    old = b"the previous complete file"
    target.write_bytes(old)
    _kill_at_fsync(monkeypatch)
    with pytest.raises(_Killed):
        WRITERS[name](target)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "a temporary file was left behind"


def test_killed_first_write_leaves_no_file(tmp_path, monkeypatch):
    _kill_at_fsync(monkeypatch)
    with pytest.raises(_Killed):
        _write_nll(tmp_path / "nll.json")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_sample_command_writes_through_the_atomic_writer():
    """The CLI's own writers are the shared ones (no private copies in any command module)."""
    import ddpm.commands as commands

    srcs = {f.name: f.read_text() for f in Path(commands.__file__).parent.glob("*.py")}
    assert "atomic_write_npz(" in srcs["sample.py"] and "atomic_write_json(" in srcs["eval.py"]
    for name, src in srcs.items():
        assert "np.savez(" not in src and ".write_text(" not in src and "savefig(" not in src, name


def test_remove_stale_temps(tmp_path):
    from ddpm.atomic import remove_stale_temps

    (tmp_path / ".ckpt_000000004.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "ckpt_000000002.safetensors").write_bytes(b"keep")
    gone = remove_stale_temps(tmp_path)
    assert [p.name for p in gone] == [".ckpt_000000004.safetensors.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000000002.safetensors"]
