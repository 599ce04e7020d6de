"""Fault injection against the trainer: kill -9, corrupt checkpoints, NaNs, a full disk.

All runs use a tiny U-Net on the embedded digits (8x8, ch 32, T = 20, batch 8). The reference
is one uninterrupted in-process run; every faulted run must end with weights (and EMA, Adam
state, RNG state) equal to it with ``torch.equal``.

Torch runs single-threaded here: on a shared 2-core machine two OpenMP threads per process are
~20x slower than one, and results must not depend on the thread count across the runs compared.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, resolve_checkpoint
from ddpm.config import apply_overrides, get_preset
from ddpm.errors import CheckpointError, UserError

N_STEPS = 8
TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=20", "train.batch_size=8", f"train.total_steps={N_STEPS}",
        "train.save_every=1", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
        "train.keep_last=3"]


def _cfg(*extra: str):
    return apply_overrides(get_preset("digits"), TINY + list(extra))


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(cfg, out: Path, resume=None):
    from ddpm.training.loop import train

    lines: list[str] = []
    result = train(cfg, out, resume=resume, device="cpu", progress=False, log=lines.append)
    return result, lines


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoint_name(step)


def _assert_same_state(a: dict, b: dict, what: str = "") -> None:
    """Every tensor (model/, ema/, optim/, rng/, ...) equal."""
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:4]}"


def _all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its folder, and the tensors of its final checkpoint."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("reference") / "run"
        result, _ = _train(_cfg(), run)
    finally:
        torch.set_num_threads(old)
    assert result["step"] == N_STEPS and result["skipped_nonfinite"] == 0
    final, _ = load_checkpoint(_ckpt(run, N_STEPS))
    assert _all_finite(final)
    return run, final


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# kill -9


def _cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# The child runs the real CLI on a simulated slow disk: every fsync takes 50 ms longer, so a
# checkpoint's temporary file exists long enough for the parent's 1 ms polling to catch it even on
# a loaded machine (otherwise a fast write can slip between two polls and the kill lands elsewhere).
_SLOW_DISK_CLI = (
    "import os, sys, time\n"
    "_fsync = os.fsync\n"
    "def _slow_fsync(fd):\n"
    "    time.sleep(0.05)\n"
    "    return _fsync(fd)\n"
    "os.fsync = _slow_fsync\n"
    "from ddpm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _cli_train_argv(run: Path) -> list[str]:
    argv = [sys.executable, "-c", _SLOW_DISK_CLI, "train", "--preset", "digits", "--data", "digits", "--out", str(run),
            "--no-progress", "--resume", "auto", "--device", "cpu"]
    for kv in TINY:
        argv += ["--set", kv]
    return argv


def _ckpt_dir_state(run: Path) -> tuple[list[int], list[str]]:
    """(steps of complete checkpoint files, names of temporary files) in RUN/checkpoints."""
    d = run / "checkpoints"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return [], []
    steps = sorted(int(n[5:14]) for n in names if n.startswith("ckpt_") and n.endswith(".safetensors"))
    return steps, [n for n in names if n.endswith(".tmp")]


def _kill_segment(run: Path, how: str, rng: random.Random, log_file: Path) -> dict:
    """Start the CLI (resume auto), SIGKILL it at a point chosen by ``how``, report what was seen."""
    start_steps, _ = _ckpt_dir_state(run)
    start = start_steps[-1] if start_steps else 0
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(_cli_train_argv(run), stdout=logf, stderr=subprocess.STDOUT, env=_cli_env())
        seen_tmp = None
        deadline = time.monotonic() + 120
        try:
            if how == "mid-write":
                # kill while a checkpoint is being written: its temporary file exists
                target = min(start + rng.randint(1, 2), N_STEPS)
                while time.monotonic() < deadline and proc.poll() is None:
                    steps, tmps = _ckpt_dir_state(run)
                    ck_tmp = [t for t in tmps if t.startswith(".ckpt_") and int(t[6:15]) >= target]
                    if ck_tmp:
                        seen_tmp = ck_tmp[0]
                        break
                    time.sleep(0.001)
            elif how == "delay":
                # the process is inside its training loop once it has written a new checkpoint
                while time.monotonic() < deadline and proc.poll() is None:
                    steps, _ = _ckpt_dir_state(run)
                    if steps and steps[-1] > start:
                        break
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                raise ValueError(how)
            still_running = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    steps, tmps = _ckpt_dir_state(run)
    return {"how": how, "start": start, "killed_running": still_running, "rc": proc.returncode,
            "seen_tmp": seen_tmp, "steps_after": steps, "tmp_after": tmps}


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_equals_uninterrupted(reference, tmp_path):
    ref_run, ref_final = reference
    run = tmp_path / "run"
    log_file = tmp_path / "train.log"
    rng = random.Random(20240607)
    plan = ["mid-write", "delay", "mid-write"]
    reports = []
    for how in plan:
        rep = _kill_segment(run, how, rng, log_file)
        reports.append(rep)
        # never a torn checkpoint: every complete-looking file verifies, and the run folder resolves
        for step in rep["steps_after"]:
            _, meta = load_checkpoint(_ckpt(run, step))
            assert meta["step"] == step
        if rep["steps_after"]:
            # the run folder resolves to a complete, verified checkpoint (the `latest` pointer is
            # written after the checkpoint, so a kill in between leaves it on the previous one)
            assert load_checkpoint(resolve_checkpoint(run))[1]["step"] in rep["steps_after"]
        assert rep["steps_after"] == [] or rep["steps_after"][-1] >= rep["start"], rep
    # the kills really happened mid-run, at least one of them during a checkpoint write
    assert all(r["killed_running"] and r["rc"] == -signal.SIGKILL for r in reports), reports
    assert any(r["seen_tmp"] for r in reports), reports
    assert any(r["seen_tmp"] in r["tmp_after"] for r in reports if r["seen_tmp"]), \
        f"no kill left a partial (temporary) checkpoint file: {reports}"

    # resume to the end
    r = subprocess.run(_cli_train_argv(run), capture_output=True, text=True, env=_cli_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout + r.stderr
    final, meta = load_checkpoint(_ckpt(run, N_STEPS))
    assert meta["step"] == N_STEPS
    _assert_same_state(final, ref_final, "killed and resumed vs uninterrupted")
    for step in list_checkpoints(run / "checkpoints"):
        load_checkpoint(step)
    print("kill report:", reports)


# ----------------------------------------------------------------------------------------------
# corrupted newest checkpoint + resume auto


def _flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "data":
        data[len(data) - 1000] ^= 0x40
    elif where == "header":
        i = data.index(b'\\"step\\": ') + len(b'\\"step\\": ')
        data[i] ^= 0x01  # a digit of the step: still valid JSON
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    {N_STEPS: "data"},
    {N_STEPS: "header", N_STEPS - 1: "truncate"},
], ids=["newest-flipped", "two-newest-damaged"])
def test_corrupt_newest_checkpoint_resume_auto_falls_back(reference, tmp_path, damage):
    ref_run, ref_final = reference
    run = _copy_run(ref_run, tmp_path / "run")
    for step, how in damage.items():
        p = _ckpt(run, step)
        if how == "truncate":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
        else:
            _flip(p, how)
        with pytest.raises(CheckpointError):
            load_checkpoint(p)
    good = min(damage) - 1
    result, lines = _train(_cfg(), run, resume="auto")
    text = "\n".join(lines)
    for step in damage:
        assert f"cannot resume from {checkpoint_name(step)}" in text, text
    assert f"resumed from {_ckpt(run, good)} at step {good}" in text, text
    assert result["step"] == N_STEPS
    final, _ = load_checkpoint(_ckpt(run, N_STEPS))
    _assert_same_state(final, ref_final, "resumed after fallback vs uninterrupted")


def test_all_checkpoints_corrupt_resume_auto_refuses(reference, tmp_path):
    ref_run, _ = reference
    run = _copy_run(ref_run, tmp_path / "run")
    for p in list_checkpoints(run / "checkpoints"):
        _flip(p, "data")
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        _train(_cfg(), run, resume="auto")
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before


# ----------------------------------------------------------------------------------------------
# NaN / inf injection


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _inject(monkeypatch, plan: dict[int, str]) -> list[int]:
    """Make step ``i`` (0-based call of training_losses) non-finite as ``plan[i]`` says.

    "loss-nan": the losses are NaN; "loss-inf": +inf; "grad-nan": finite loss, NaN gradient;
    "forward-nan": the network's output is NaN (patched in UNet.forward).
    Returns the list of step indices seen.
    """
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.nets.unet import UNet

    calls: list[int] = []
    orig_losses = GaussianDiffusion.training_losses
    orig_forward = UNet.forward
    current = {"mode": None}

    def training_losses(self, *a, **k):
        i = len(calls)
        calls.append(i)
        current["mode"] = plan.get(i)
        losses = orig_losses(self, *a, **k)
        mode = current["mode"]
        current["mode"] = None
        if mode == "loss-nan":
            return losses * float("nan")
        if mode == "loss-inf":
            return losses + float("inf")
        if mode == "grad-nan":
            return _NaNGrad.apply(losses)
        return losses

    def forward(self, x, t, *a, **k):
        out = orig_forward(self, x, t, *a, **k)
        if current["mode"] == "forward-nan":
            out = out * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    monkeypatch.setattr(UNet, "forward", forward)
    return calls


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    plan = {1: "loss-nan", 3: "grad-nan", 4: "forward-nan", 6: "loss-inf"}
    calls = _inject(monkeypatch, plan)
    run = tmp_path / "run"
    result, lines = _train(_cfg("train.keep_last=100", "train.max_nonfinite_in_row=3"), run)
    assert len(calls) == N_STEPS
    assert result["step"] == N_STEPS and result["skipped_nonfinite"] == len(plan)
    text = "\n".join(lines)
    assert text.count("non-finite") >= len(plan), text
    states = {s: load_checkpoint(_ckpt(run, s))[0] for s in range(1, N_STEPS + 1)}
    for s, st in states.items():
        assert _all_finite(st), f"checkpoint {s} holds non-finite values"
    for i in range(1, N_STEPS):
        step = i + 1  # step index i produces checkpoint i + 1
        before, after = states[step - 1], states[step]
        keys = [k for k in after if k.startswith(("model/", "ema/", "optim/"))]
        same = all(torch.equal(before[k], after[k]) for k in keys)
        if i in plan:
            assert same, f"skipped step {i} ({plan[i]}) changed the weights, EMA or optimizer"
        else:
            assert not same, f"step {i} was applied but nothing changed"
    import json
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == N_STEPS and recs[-1]["skipped_nonfinite"] == len(plan)


def test_nonfinite_in_a_row_stops_with_a_message(tmp_path, monkeypatch, capsys):
    """Through the CLI (in-process): one line on stderr, exit 2, no checkpoint with NaNs."""
    from ddpm.cli import main

    first_bad = 3
    plan = {i: "loss-nan" if i % 2 else "forward-nan" for i in range(first_bad, 100)}
    # The plan's warm-up step (ddpm.plan) also calls training_losses; this test counts the trainer's calls.
    monkeypatch.setenv("DDPM_PLAN_WARMUP", "0")
    calls = _inject(monkeypatch, plan)
    run = tmp_path / "run"
    argv = ["train", "--preset", "digits", "--out", str(run), "--no-progress", "--device", "cpu"]
    for kv in TINY + ["train.max_nonfinite_in_row=3", "train.keep_last=100", "train.total_steps=20"]:
        argv += ["--set", kv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "3 non-finite" in lines[0] and "max_nonfinite_in_row=3" in lines[0], lines[0]
    assert len(calls) == first_bad + 3  # stopped right after the third bad step in a row
    files = list_checkpoints(run / "checkpoints")
    assert files, "the good steps before the failure were not checkpointed"
    for f in files:
        tensors, meta = load_checkpoint(f)
        assert _all_finite(tensors), f"{f.name} holds non-finite values"
        assert meta["step"] < first_bad + 3
    # the weights of the last checkpoint are those after the last good step
    last_good = load_checkpoint(_ckpt(run, first_bad))[0]
    newest = load_checkpoint(files[-1])[0]
    for k in last_good:
        if k.startswith(("model/", "ema/", "optim/")):
            assert torch.equal(last_good[k], newest[k]), k


# ----------------------------------------------------------------------------------------------
# disk full during a training save


class _FullDisk:
    """Patch os.fdopen so that the n-th large write (a checkpoint) or the n-th pointer write fails."""

    def __init__(self, monkeypatch, run: Path, target: str, nth: int):
        self.run, self.target, self.nth = run, target, nth
        self.count = 0
        self.fired = False
        self.snapshot: dict[str, str] | None = None
        real = os.fdopen

        def fdopen(fd, *a, **k):
            return _Writer(real(fd, *a, **k), self)

        monkeypatch.setattr(os, "fdopen", fdopen)


class _Writer:
    def __init__(self, real, disk: _FullDisk):
        self.real, self.disk = real, disk

    def write(self, data):
        d = self.disk
        is_ckpt = len(data) > 100_000
        is_latest = data.strip().startswith(b"ckpt_") and len(data) < 100
        if not d.fired and ((d.target == "checkpoint" and is_ckpt) or (d.target == "latest" and is_latest)):
            d.count += 1
            if d.count == d.nth:
                d.fired = True
                folder = d.run / "checkpoints"
                d.snapshot = {p.name: _sha(p) for p in folder.iterdir() if not p.name.endswith(".tmp")}
                self.real.write(bytes(data[: len(data) // 3]))
                self.real.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


@pytest.mark.parametrize("target", ["checkpoint", "latest"])
def test_disk_full_during_training_save(reference, tmp_path, monkeypatch, target):
    _, ref_final = reference
    run = tmp_path / "run"
    nth = 5
    disk = _FullDisk(monkeypatch, run, target, nth)
    with pytest.raises(CheckpointError) as ei:
        _train(_cfg(), run)
    monkeypatch.undo()
    msg = str(ei.value)
    assert disk.fired, "the fault was not injected"
    assert "\n" not in msg and "stopping" in msg and "No space left on device" in msg, msg
    folder = run / "checkpoints"
    # earlier checkpoints (and the pointer) are byte-identical; no temporary file is left behind
    after = {p.name: _sha(p) for p in folder.iterdir()}
    assert not [n for n in after if n.endswith(".tmp")], sorted(after)
    assert after == disk.snapshot
    if target == "checkpoint":
        assert checkpoint_name(nth) not in after
        assert resolve_checkpoint(run) == _ckpt(run, nth - 1)
    else:  # the new checkpoint is complete; only the pointer update failed
        load_checkpoint(_ckpt(run, nth))
    # resumable, and the end result is that of the uninterrupted run
    result, lines = _train(_cfg(), run, resume="auto")
    resumed_at = nth - 1 if target == "checkpoint" else nth
    assert f"resumed from {_ckpt(run, resumed_at)} at step {resumed_at}" in "\n".join(lines)
    final, _ = load_checkpoint(_ckpt(run, N_STEPS))
    _assert_same_state(final, ref_final, f"after disk full on {target} + resume vs uninterrupted")


def test_disk_full_message_through_cli(tmp_path, monkeypatch, capsys):
    from ddpm.cli import main

    run = tmp_path / "run"
    disk = _FullDisk(monkeypatch, run, "checkpoint", 2)
    argv = ["train", "--preset", "digits", "--out", str(run), "--no-progress", "--device", "cpu"]
    for kv in TINY:
        argv += ["--set", kv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert disk.fired
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "intact" in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# a checkpoint of another config


def test_resume_with_another_config_is_refused(reference, tmp_path):
    ref_run, _ = reference
    run = _copy_run(ref_run, tmp_path / "run")
    before = {str(p.relative_to(run)): _sha(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as ei:
        _train(_cfg("model.ch=64"), run, resume="auto")
    assert "model.ch" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(UserError) as ei:
        _train(_cfg("train.lr=5e-4"), run, resume=str(_ckpt(run, N_STEPS)))
    assert "train.lr" in str(ei.value)
    assert {str(p.relative_to(run)): _sha(p) for p in run.rglob("*") if p.is_file()} == before
