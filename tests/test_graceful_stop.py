"""Graceful stop (SIGINT/SIGTERM) and time-based checkpoints, in-process.

A stop signal is delivered to this process at a chosen moment (after a seeded random step,
during the EMA sample grid, during a periodic checkpoint write, a second one during the stop's
own write); the run must end at the step in flight with a checkpoint of it, and ``--resume
auto`` must then end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8  # steps of every run here


def tiny_config(**train) -> Config:
    base = TrainConfig(total_steps=N, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=2,
                       sample_every=0, sample_n=4, save_every=0, keep_last=10)
    model = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.1)
    return Config(preset="tiny", model=model, diffusion=DiffusionConfig(num_timesteps=20),
                  data=DataConfig(source="digits", random_flip=True), train=replace(base, **train))


def run(cfg: Config, out: Path, resume=None, log=None) -> dict:
    from ddpm.training import train

    return train(cfg, out, resume=resume, device="cpu", progress=False,
                 log=(log.append if log is not None else (lambda m: None)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final tensors, once per sample/save cadence used below."""
    cache: dict[tuple, dict] = {}

    def get(**train):
        key = tuple(sorted(train.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("ref")
            r = run(tiny_config(**train), out)
            cache[key] = load_checkpoint(r["checkpoint"])[0]
        return cache[key]

    return get


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


def _signal_after_step(monkeypatch, step: int, sig: int) -> None:
    """Deliver ``sig`` while train_step ``step`` (1-based count of calls) is in flight."""
    import ddpm.training.loop as loop

    real, calls = loop.train_step, {"n": 0}

    def wrapped(parts, batch, s):
        calls["n"] += 1
        if calls["n"] == step:
            _kill_self(sig)  # arrives mid-step: the step must still complete
        return real(parts, batch, s)

    monkeypatch.setattr(loop, "train_step", wrapped)


_RNG = random.Random(16)
_CASES = list(zip(_RNG.sample(range(1, N), 4), (signal.SIGINT, signal.SIGTERM) * 2))  # 4 distinct steps


@pytest.mark.parametrize("stop_step, sig", _CASES, ids=[f"{signal.Signals(s).name}@{k}" for k, s in _CASES])
def test_stop_at_random_step_then_resume_is_bit_exact(reference, tmp_path, monkeypatch, stop_step, sig):
    log: list[str] = []
    handler = signal.getsignal(signal.SIGINT)
    _signal_after_step(monkeypatch, stop_step, sig)
    r = run(tiny_config(), tmp_path, log=log)
    monkeypatch.undo()
    assert r["stopped_by"] == sig and r["step"] == stop_step
    assert r["checkpoint"] == str(tmp_path / "checkpoints" / checkpoint_name(stop_step))
    line = [m for m in log if m.startswith(f"stopped at step {stop_step}")]
    assert line and f"checkpoint {r['checkpoint']}" in line[0]
    assert f"continue with ddpm train --out {tmp_path} --resume auto" in line[0]
    # the handlers are gone once train() returns
    assert signal.getsignal(signal.SIGINT) is handler
    done = run(tiny_config(), tmp_path, resume="auto")
    assert done["step"] == N and done["stopped_by"] is None
    assert_same(load_checkpoint(done["checkpoint"])[0], reference())


def test_stop_during_sample_grid_skips_the_grid(reference, tmp_path, monkeypatch):
    import ddpm.training.loop as loop

    real = loop.write_sample_grid
    calls = {"n": 0}

    def wrapped(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the grid of step 4: stop in the middle of sampling
            _kill_self(signal.SIGTERM)
        return real(path, *a, **k)

    monkeypatch.setattr(loop, "write_sample_grid", wrapped)
    log: list[str] = []
    r = run(tiny_config(sample_every=2), tmp_path, log=log)
    monkeypatch.undo()
    assert r["stopped_by"] == signal.SIGTERM and r["step"] == 4
    assert (tmp_path / "samples" / "step_000000002.png").is_file()
    assert not (tmp_path / "samples" / "step_000000004.png").exists()
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.endswith(".tmp")]
    assert any("sample grid skipped" in m for m in log)
    done = run(tiny_config(sample_every=2), tmp_path, resume="auto")
    assert_same(load_checkpoint(done["checkpoint"])[0], reference(sample_every=2))


def test_stop_during_periodic_checkpoint_write(reference, tmp_path, monkeypatch):
    import ddpm.training.loop as loop

    real = loop.save_checkpoint
    written = []

    def wrapped(path, tensors, meta):
        if meta["step"] == 6:
            _kill_self(signal.SIGINT)  # the write goes on; the run stops after it, without a second write
        written.append(meta["step"])
        return real(path, tensors, meta)

    monkeypatch.setattr(loop, "save_checkpoint", wrapped)
    r = run(tiny_config(save_every=3), tmp_path)
    monkeypatch.undo()
    assert r["stopped_by"] == signal.SIGINT and r["step"] == 6 and written == [3, 6]
    assert [f.name for f in list_checkpoints(tmp_path / "checkpoints")] == [checkpoint_name(3), checkpoint_name(6)]
    load_checkpoint(r["checkpoint"])
    done = run(tiny_config(save_every=3), tmp_path, resume="auto")
    assert_same(load_checkpoint(done["checkpoint"])[0], reference(save_every=3))


def test_second_signal_during_the_stop_write_leaves_no_torn_file(reference, tmp_path, monkeypatch):
    import ddpm.checkpoint as ck
    from ddpm.atomic import atomic_writer
    from ddpm.training.stop import Aborted

    _signal_after_step(monkeypatch, 5, signal.SIGTERM)

    def interrupted_write(path, data):
        with atomic_writer(path) as f:
            f.write(data[: len(data) // 2])
            _kill_self(signal.SIGTERM)  # the second signal, half-way through the checkpoint
            f.write(data[len(data) // 2:])

    real = ck.atomic_write_bytes

    def write(path, data):
        return (interrupted_write if Path(path).name == checkpoint_name(5) else real)(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", write)
    with pytest.raises(Aborted) as ei:
        run(tiny_config(save_every=2), tmp_path)
    monkeypatch.undo()
    assert ei.value.signum == signal.SIGTERM
    folder = tmp_path / "checkpoints"
    assert [f.name for f in list_checkpoints(folder)] == [checkpoint_name(2), checkpoint_name(4)]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], sorted(os.listdir(folder))
    assert (folder / "latest").read_text().strip() == checkpoint_name(4)
    assert not (tmp_path / "train.lock").exists()  # the lock went with the run
    done = run(tiny_config(save_every=2), tmp_path, resume="auto")
    assert_same(load_checkpoint(done["checkpoint"])[0], reference(save_every=2))


def test_save_every_minutes(tmp_path, monkeypatch):
    """A fake clock advancing 25 s per step: with save_every_minutes=1 a checkpoint follows every
    step at which 60 s have passed since the last one (steps 3 and 6 of 8), plus the final one."""
    import types

    import ddpm.training.loop as loop

    clock = {"now": 1000.0}
    fake_time = types.SimpleNamespace(monotonic=lambda: clock["now"], perf_counter=lambda: clock["now"])
    real = loop.train_step

    def wrapped(parts, batch, s):
        clock["now"] += 25.0
        return real(parts, batch, s)

    monkeypatch.setattr(loop, "time", fake_time)
    monkeypatch.setattr(loop, "train_step", wrapped)
    run(tiny_config(save_every_minutes=1.0), tmp_path)
    steps = [int(f.stem[5:]) for f in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [3, 6, 8]
    # in addition to the step cadence; 0 turns it off
    run(tiny_config(save_every_minutes=1.0, save_every=4), tmp_path / "both")
    assert [int(f.stem[5:]) for f in list_checkpoints(tmp_path / "both" / "checkpoints")] == [3, 4, 7, 8]
    run(tiny_config(save_every_minutes=0.0), tmp_path / "off")
    assert [int(f.stem[5:]) for f in list_checkpoints(tmp_path / "off" / "checkpoints")] == [8]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_save_every_minutes_is_validated(value):
    from ddpm.config import apply_overrides, get_preset
    from ddpm.errors import ConfigError

    with pytest.raises(ConfigError, match="train.save_every_minutes"):
        apply_overrides(get_preset("digits"), [f"train.save_every_minutes={value}"])
