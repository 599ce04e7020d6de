"""Bad command-line input: one line on stderr, exit status 2, no traceback, nothing written.

Every option of ``ddpm train`` and ``ddpm sample`` gets an out-of-range or mistyped value.
An existing run folder must be byte-identical afterwards (every file hashed before and after),
and no output file may appear. Most cases run in-process through ``ddpm.cli.main`` (fast);
a few go through the real entry points (``python -m ddpm.cli`` and the ``ddpm`` script).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import add_prefix, checkpoint_name, save_checkpoint
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=20", "train.batch_size=8", "train.total_steps=4",
        "train.save_every=2", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2"]
TINY_SET = [x for kv in TINY for x in ("--set", kv)]


def _tiny_cfg():
    return apply_overrides(get_preset("digits"), TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run folder: 2 training steps of the tiny config (of total_steps=4), one checkpoint."""
    from ddpm.training.loop import train

    cfg = apply_overrides(_tiny_cfg(), ["train.total_steps=2", "train.keep_last=1"])
    run = tmp_path_factory.mktemp("cli_faults") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, run, device="cpu", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(old)
    assert (run / "checkpoints" / checkpoint_name(2)).is_file()
    return run  # the cases below pass total_steps=4: a resume that went ahead would train and write


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (folders included, as '<dir>')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_inproc(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors raise SystemExit(2)
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line_error(rc, err, needle=None):
    assert rc == 2, f"exit status {rc}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert "error" in lines[0], lines[0]
    if needle is not None:
        assert needle.lower() in lines[0].lower(), lines[0]


# ----------------------------------------------------------------------------------------------
# ddpm train

# (extra argv, a word the one-line message must contain). RUN is the existing run folder.
TRAIN_CASES = [
    (["--preset", "cifar100"], "unknown preset"),
    (["--preset", ""], "preset"),
    (["--set", "train.lrr=1e-4"], "did you mean"),
    (["--set", "model.chh=32"], "model.chh"),
    (["--set", "modle.ch=32"], "section"),
    (["--set", "nosuchkey=3"], "unknown config key"),
    (["--set", "lr"], "key=value"),
    (["--set", "train.lr=fast"], "train.lr"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.batch_size=2.5"], "train.batch_size"),
    (["--set", "train.total_steps=0"], "train.total_steps"),
    (["--set", "train.ema_decay=1.5"], "train.ema_decay"),
    (["--set", "train.grad_accum=3"], "train.grad_accum"),
    (["--set", "train.compile=maybe"], "train.compile"),
    (["--set", "train.precision=fp8"], "train.precision"),
    (["--set", "model.ch=33"], "model.ch"),
    (["--set", "model.ch_mult=1,x"], "model.ch_mult"),
    (["--set", "model.ch_mult=1,2,2,2,2"], "model.ch_mult"),
    (["--set", "model.dropout=1"], "model.dropout"),
    (["--set", "model.in_channels=2"], "model.in_channels"),
    (["--set", "diffusion.num_timesteps=1"], "diffusion.num_timesteps"),
    (["--set", "diffusion.beta_schedule=cosin"], "diffusion.beta_schedule"),
    (["--set", "diffusion.var_type=big"], "diffusion.var_type"),
    (["--set", "diffusion.beta_start=0.5", "--set", "diffusion.beta_end=0.1"], "beta"),
    (["--set", "batch_size=8", "--set", "ch_mult="], "model.ch_mult"),
    (["--resume", "RUN/checkpoints/nope.safetensors"], "--resume"),
    (["--resume", "RUN/checkpoints/latest"], None),
    (["--device", "gpu7"], "--device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--data", "RUN/no_such_dataset.npz"], "no_such_dataset"),
    (["--data", ""], "data"),
    (["--bogus-option"], "unrecognized"),
    (["--resume"], "--resume"),
    (["--set"], "--set"),
]


def _subst(argv: list[str], run: Path) -> list[str]:
    return [a.replace("RUN", str(run)) for a in argv]


_IDS = [" ".join(c[0])[:60] for c in TRAIN_CASES]


@pytest.mark.parametrize("extra, needle", TRAIN_CASES, ids=_IDS)
def test_train_bad_option_existing_run(run_dir, capsys, extra, needle):
    """``--resume auto`` into an existing run, with one bad option: refused, folder untouched."""
    before = _snapshot(run_dir)
    argv = ["train", "--out", str(run_dir), "--no-progress", *TINY_SET]
    if "--resume" not in extra:
        argv += ["--resume", "auto"]
    rc, _, err = _run_inproc(argv + _subst(extra, run_dir), capsys)
    _assert_one_line_error(rc, err, needle)
    assert _snapshot(run_dir) == before, "the existing run folder was modified"


@pytest.mark.parametrize("extra, needle", [c for c in TRAIN_CASES if not any("RUN" in a for a in c[0])],
                         ids=[i for i, c in zip(_IDS, TRAIN_CASES) if not any("RUN" in a for a in c[0])])
def test_train_bad_option_new_folder(tmp_path, capsys, extra, needle):
    """A fresh run with one bad option: refused, and no run folder is created."""
    out_dir = tmp_path / "new_run"
    rc, _, err = _run_inproc(["train", "--out", str(out_dir), "--no-progress", *TINY_SET, *extra], capsys)
    _assert_one_line_error(rc, err, needle)
    assert not out_dir.exists(), "a run folder was created for a command that failed"


def test_train_existing_run_without_resume(run_dir, capsys):
    before = _snapshot(run_dir)
    rc, _, err = _run_inproc(["train", "--out", str(run_dir), "--no-progress", *TINY_SET], capsys)
    _assert_one_line_error(rc, err, "--resume auto")
    assert _snapshot(run_dir) == before


def test_train_resume_with_another_preset(run_dir, capsys):
    """The run's checkpoint belongs to another config (T 20 and one res block vs the digits preset)."""
    before = _snapshot(run_dir)
    rc, _, err = _run_inproc(["train", "--preset", "digits", "--out", str(run_dir), "--no-progress",
                              "--resume", "auto"], capsys)
    _assert_one_line_error(rc, err, "diffusion.num_timesteps")
    assert _snapshot(run_dir) == before


def test_train_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_bytes(b"keep me")
    rc, _, err = _run_inproc(["train", "--out", str(f), "--no-progress", *TINY_SET], capsys)
    _assert_one_line_error(rc, err)
    assert f.read_bytes() == b"keep me"


def test_train_resume_corrupt_checkpoint_file(run_dir, tmp_path, capsys):
    """--resume PATH to a corrupt file: refused before anything is written."""
    bad = tmp_path / checkpoint_name(2)
    data = bytearray((run_dir / "checkpoints" / checkpoint_name(2)).read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    before = _snapshot(run_dir)
    rc, _, err = _run_inproc(["train", "--out", str(run_dir), "--no-progress", *TINY_SET, "--resume", str(bad)], capsys)
    _assert_one_line_error(rc, err, "checksum")
    assert _snapshot(run_dir) == before


def test_train_resume_pickle_is_refused(run_dir, tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "resume.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    before = _snapshot(run_dir)
    rc, _, err = _run_inproc(["train", "--out", str(run_dir), "--no-progress", *TINY_SET, "--resume", str(bad)], capsys)
    _assert_one_line_error(rc, err, "not a ddpm checkpoint")
    assert not marker.exists()
    assert _snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------
# ddpm sample

SAMPLE_CASES = [
    (["--n", "0"], "--n"),
    (["--n", "-3"], "--n"),
    (["--n", "ten"], "--n"),
    (["--n", "1.5"], "--n"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "abc"], "--seed"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--steps", "21"], "--steps"),       # the model has T=20
    (["--steps", "many"], "--steps"),
    (["--sampler", "euler"], "--sampler"),
    (["--sampler", ""], "--sampler"),
    (["--eta", "-0.5"], "--eta"),
    (["--eta", "abc"], "--eta"),
    (["--eta", "nan"], "--eta"),
    (["--precision", "fp16"], "--precision"),
    (["--device", "gpu7"], "--device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--out", "OUTDIR/samples.png"], ".npz"),
    (["--out", "OUTDIR"], None),            # an existing folder
    (["--grid", "OUTDIR/grid.jpg"], ".png"),
    (["--interp-t", "20", "--interpolate"], "--interp-t"),
    (["--interp-t", "-1"], "--interp-t"),
    (["--interpolate", "--data", "OUTDIR/no_such_data.npz"], "no_such_data"),
    (["--ckpt", "OUTDIR/missing.safetensors"], "not found"),
    (["--ckpt", "OUTDIR"], "no checkpoint found"),  # a folder without checkpoints
    (["--ckpt", "NOTOURS"], "not a ddpm checkpoint"),
    (["--ckpt", "PICKLE"], "not a ddpm checkpoint"),
    (["--ckpt", "EMPTY"], "empty"),
    (["--ckpt", "TRUNC"], "truncated"),
    (["--ckpt", "FLIPPED"], "checksum"),
    (["--ckpt"], "--ckpt"),
    (["--bogus"], "unrecognized"),
]


@pytest.fixture()
def bad_files(tmp_path, run_dir) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path / "bad"
    d.mkdir()
    good = (run_dir / "checkpoints" / checkpoint_name(2)).read_bytes()
    save_file({"conv_in.weight": torch.zeros(4, 1, 3, 3)}, str(d / "diffusion_pytorch_model.safetensors"))
    (d / "model.pt").write_bytes(pickle.dumps({"state_dict": {"a": 1}}))
    (d / "empty.safetensors").write_bytes(b"")
    (d / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(good) - 100] ^= 0x10
    (d / "flipped.safetensors").write_bytes(bytes(flipped))
    return {"NOTOURS": d / "diffusion_pytorch_model.safetensors", "PICKLE": d / "model.pt",
            "EMPTY": d / "empty.safetensors", "TRUNC": d / "trunc.safetensors", "FLIPPED": d / "flipped.safetensors"}


def _sample_argv(extra, run_dir, outdir, bad_files):
    argv = ["sample", "--ckpt", str(run_dir), "--n", "2", "--out", str(outdir / "s.npz"), "--no-progress"]
    subst = []
    for a in extra:
        a = bad_files.get(a, a)
        subst.append(str(a).replace("OUTDIR", str(outdir)))
    if "--ckpt" in extra:  # the case's own --ckpt replaces the default one
        i = argv.index("--ckpt")
        del argv[i:i + 2]
    return argv + subst


@pytest.mark.parametrize("extra, needle", SAMPLE_CASES, ids=[" ".join(c[0])[:50] for c in SAMPLE_CASES])
def test_sample_bad_option(run_dir, tmp_path, capsys, bad_files, extra, needle):
    outdir = tmp_path / "out"
    outdir.mkdir()
    before_run = _snapshot(run_dir)
    before_out = _snapshot(outdir)
    rc, _, err = _run_inproc(_sample_argv(extra, run_dir, outdir, bad_files), capsys)
    _assert_one_line_error(rc, err, needle)
    assert _snapshot(run_dir) == before_run, "the run folder was modified"
    assert _snapshot(outdir) == before_out, f"files were written: {sorted(set(_snapshot(outdir)) - set(before_out))}"


def test_sample_checkpoint_of_another_shape_is_refused(run_dir, tmp_path, capsys):
    """A checkpoint whose weights do not fit its own config (e.g. edited header): one line, names keys."""
    from ddpm.nets.unet import UNet

    cfg = _tiny_cfg()
    other = apply_overrides(cfg, ["model.ch=64"])
    model = UNet.from_config(other.model, other.out_channels)
    p = tmp_path / "mismatch.safetensors"
    save_checkpoint(p, add_prefix(model.state_dict(), "ema/"), {"config": cfg.to_dict(), "step": 1, "kind": "weights"})
    rc, _, err = _run_inproc(["sample", "--ckpt", str(p), "--n", "1", "--out", str(tmp_path / "s.npz")], capsys)
    _assert_one_line_error(rc, err, "shape mismatch")
    assert "temb.dense0.weight (256, 64) vs (128, 32)" in err, err  # the first differing key, both shapes
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------------------------
# the real entry points behave the same


def _entry_points() -> list[list[str]]:
    eps = [[sys.executable, "-m", "ddpm.cli"]]
    script = shutil.which("ddpm") or str(Path(sys.executable).parent / "ddpm")
    if Path(script).exists():
        eps.append([script])
    return eps


@pytest.mark.parametrize("argv, needle, entry", [
    (["train", "--out", "RUN", "--set", "train.lr=-1", "--resume", "auto"], "train.lr", 0),
    (["sample", "--ckpt", "RUN", "--n", "0"], "--n", 1),
    (["sample", "--ckpt", "RUN/checkpoints/missing.safetensors", "--out", "RUN/s.npz"], "not found", 1),
])
def test_real_entry_points(run_dir, argv, needle, entry):
    """``python -m ddpm.cli`` (0) and the installed ``ddpm`` script (1)."""
    eps = _entry_points()
    assert len(eps) == 2, "the `ddpm` console script is not installed"
    before = _snapshot(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(eps[entry] + [a.replace("RUN", str(run_dir)) for a in argv], capture_output=True, text=True,
                       timeout=120, env=env)
    _assert_one_line_error(r.returncode, r.stderr, needle)
    assert r.stdout == "", r.stdout
    assert _snapshot(run_dir) == before
