"""A run folder under real processes: ``ddpm train`` stopped by SIGINT/SIGTERM (exit 130/143,
one line saying how to continue, bit-exact resume), one writer per folder (a second trainer is
refused naming the holder; ``kill -9`` never leaves a folder that cannot be resumed), and
readers that race a writer always get a complete checkpoint.

The trainer runs as ``python -m ddpm.cli train`` on the digits preset shrunk with --set.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from ddpm.config import apply_overrides, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0.1", "diffusion.num_timesteps=20", "train.batch_size=8", "train.warmup_steps=2",
        "train.sample_every=0", "train.log_every=1"]


def _sets(extra: list[str]) -> list[str]:
    return [x for kv in TINY + extra for x in ("--set", kv)]


def _spawn(out: Path, extra: list[str], new_session: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ddpm.cli", "train", "--out", str(out), "--no-progress", "--device", "cpu",
            *_sets(extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=new_session)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}: {out[-2000:]} {err[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _logged_steps(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _train_inproc(out: Path, extra: list[str], resume=None) -> dict:
    from ddpm.training import train

    cfg = apply_overrides(get_preset("digits"), TINY + extra)
    return train(cfg, out, resume=resume, device="cpu", progress=False, log=lambda m: None)


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 2)],
                         ids=["SIGINT", "SIGTERM", "Ctrl-C to the process group, 2 data workers"])
def test_cli_stop_signal_checkpoints_and_resumes_bit_exact(tmp_path, sig, workers):
    out = tmp_path / "run"
    proc = _spawn(out, ["train.total_steps=100000", "train.save_every=100000", f"train.num_workers={workers}"],
                  new_session=workers > 0)
    try:
        _wait_for(lambda: _logged_steps(out) >= 3, proc, "step 3")
        if workers:  # as a terminal's Ctrl-C does: the trainer and its data workers all get SIGINT
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, stdout[-1500:], stderr[-1500:])
    m = re.search(r"stopped at step (\d+) \(\w+\): checkpoint (\S+); continue with ddpm train --out (\S+) "
                  r"--resume auto", stdout)
    assert m, stdout[-1500:]
    n = int(m.group(1))
    assert n >= 3 and Path(m.group(2)) == out / "checkpoints" / checkpoint_name(n) and Path(m.group(3)) == out
    assert "Traceback" not in stderr and "interrupted" not in stderr, stderr
    assert not (out / "train.lock").exists()
    # continue two steps past the stop, and compare with an uninterrupted run of the same length
    extra = [f"train.total_steps={n + 2}", "train.save_every=100000", f"train.num_workers={workers}"]
    resumed = _train_inproc(out, extra, resume="auto")
    straight = _train_inproc(tmp_path / "straight", extra)
    a, b = load_checkpoint(resumed["checkpoint"])[0], load_checkpoint(straight["checkpoint"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_writer_is_refused_and_kill_9_leaves_a_resumable_folder(tmp_path, capsys):
    from ddpm.cli import main

    out = tmp_path / "run"
    proc = _spawn(out, ["train.total_steps=100000", "train.save_every=4"])
    try:
        _wait_for(lambda: _logged_steps(out) >= 1, proc, "the first step")
        info = json.loads((out / "train.lock").read_text())
        assert info["pid"] == proc.pid and info["host"] and info["started"]
        # a second trainer on the same folder, started before the first checkpoint
        rc = main(["train", "--out", str(out), "--no-progress", "--device", "cpu", *_sets(["train.total_steps=2"])])
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"PID {proc.pid}" in lines[0] and "already being trained" in lines[0], err
        assert json.loads((out / "train.lock").read_text())["pid"] == proc.pid  # the holder's file is untouched
        _wait_for(lambda: len(list_checkpoints(out / "checkpoints")) >= 1 if (out / "checkpoints").is_dir()
                  else False, proc, "the first checkpoint")
    finally:
        proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
        proc.communicate()
    assert (out / "train.lock").exists()
    last = list_checkpoints(out / "checkpoints")[-1]
    n = int(last.stem[5:])
    r = _train_inproc(out, [f"train.total_steps={n + 1}", "train.save_every=4"], resume="auto")
    assert r["step"] == n + 1 and r["stopped_by"] is None
    assert not (out / "train.lock").exists()


def test_readers_racing_a_writer_always_get_a_complete_checkpoint(tmp_path):
    from ddpm.api import load_weights

    out = tmp_path / "run"
    # a checkpoint every step, only the newest kept: files appear and disappear all the time
    proc = _spawn(out, ["train.total_steps=60", "train.save_every=1", "train.keep_last=1", "train.log_every=0"])
    seen, errors = set(), []
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), proc, "the first checkpoint")
        while proc.poll() is None:
            try:
                file, state, cfg, meta = load_weights(out)
                seen.add(int(meta["step"]))
                assert state and cfg.model.ch == 32
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                errors.append(f"{type(e).__name__}: {e}")
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-1500:]
    assert not errors, f"{len(errors)} failed reads (of {len(errors) + len(seen)}+), first: {errors[0]}"
    assert len(seen) >= 5, seen


def test_lock_in_process(tmp_path):
    """flock is per open file, so a second RunLock in this very process is refused too."""
    from ddpm.errors import UserError
    from ddpm.training.lock import RunLock, RunLockedError

    run = tmp_path / "new"
    with RunLock(run) as held:
        assert run.is_dir() and json.loads(held.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()} on host "):
            RunLock(run).acquire()
        assert held.path.exists()  # the refused one did not remove the holder's file
        assert issubclass(RunLockedError, UserError)
    assert not run.exists()  # created by the lock, nothing else written: gone again
    # a stale file (the holder was killed) is simply taken over
    run.mkdir()
    (run / "train.lock").write_text('{"pid": 1, "host": "elsewhere", "started": "then"}\n')
    with RunLock(run) as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
    assert run.is_dir() and not (run / "train.lock").exists()
