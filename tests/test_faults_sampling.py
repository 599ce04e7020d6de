"""A long ``ddpm sample --n`` killed part-way keeps its finished chunks, and the same command
continues it to the file an uninterrupted run writes (ddpm.chunks).

Real processes: the command runs as ``python -c STALL`` (the CLI with one hook: it stops for
good after its k-th chunk, or in the middle of writing chunk k+1), the test polls the chunk
folder until the process is there, then sends SIGKILL, SIGINT or SIGTERM. The rerun must give
arrays byte-equal to a run that was never interrupted; a different command on the same output
is refused in one line naming the differing option, unless --overwrite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import add_prefix, save_checkpoint
from ddpm.chunks import parts_dir
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0", "diffusion.num_timesteps=20"]
N, CHUNK = 12, 2  # 6 chunks

# The CLI, stalled (sleep) once it has written STALL_AFTER chunks: "after" = between chunks,
# "write" = inside the atomic write of the next chunk (its temporary file complete, not renamed).
# "exit" = this process dies (exit status 3) after its STALL_AFTER-th chunk; under torchrun
# only rank STALL_RANK stalls or dies.
STALL = textwrap.dedent("""
    import json, os, sys, time
    import ddpm.chunks as chunks
    after, mode = int(os.environ["STALL_AFTER"]), os.environ["STALL_MODE"]
    if os.environ.get("RANK", "0") != os.environ.get("STALL_RANK", "0"):
        mode = "none"
    real, calls = chunks.write_chunk, [0]

    def write_chunk(path, arrays):
        calls[0] += 1
        if mode == "write" and calls[0] == after + 1:
            os.fsync = lambda fd: time.sleep(600)
        real(path, arrays)
        if mode == "after" and calls[0] == after:
            time.sleep(600)
        if mode == "exit" and calls[0] == after:
            os._exit(3)

    chunks.write_chunk = write_chunk
    from ddpm.cli import main
    # under torchrun the command's options come through the environment (torchrun's own parser
    # would take --n for one of its abbreviated options)
    sys.exit(main(json.loads(os.environ["DDPM_ARGV"]) if "DDPM_ARGV" in os.environ else sys.argv[1:]))
""")


def tiny_checkpoint(p: Path) -> Path:
    """A tiny U-Net (T = 20) with perturbed weights, so that images depend on their seeds."""
    from ddpm.nets.unet import UNet

    cfg = apply_overrides(get_preset("digits"), TINY)
    g = torch.Generator().manual_seed(1234)
    model = UNet.from_config(cfg.model, cfg.out_channels)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    save_checkpoint(p, add_prefix(model.state_dict(), "ema/"), {"config": cfg.to_dict(), "step": 0, "kind": "weights"})
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("fs") / "weights.safetensors")


def _argv(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--out", str(out), "--n", str(N), "--chunk-size", str(CHUNK),
            "--batch-size", "2", "--seed", "5", "--no-progress", "--device", "cpu", *extra]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> np.ndarray:
    """An uninterrupted run; its chunk folder is gone afterwards."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run outside the one_thread fixture)
    try:
        assert main(_argv(ckpt, out)) == 0
    finally:
        torch.set_num_threads(old)
    assert not parts_dir(out).exists(), "the chunk folder stays after a finished run"
    x = _arrays(out)
    assert sorted(x) == ["arr_0"] and x["arr_0"].shape == (N, 8, 8, 1)
    assert len({x["arr_0"][i].tobytes() for i in range(N)}) == N
    return x["arr_0"]


def _chunks(parts: Path) -> list[str]:
    return sorted(p.name for p in parts.glob("chunk_*.npz"))


def _start_stalled(argv: list[str], after: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, "STALL_AFTER": str(after), "STALL_MODE": mode, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", STALL, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early (rc {proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the process to reach its stall point")
        time.sleep(0.05)


def _interrupt(ckpt: Path, out: Path, sig: int, after: int, mode: str = "after") -> tuple[int, str]:
    """Run the stalled command, wait until it has ``after`` chunks (and is where ``mode`` says),
    send ``sig``; (exit status, stderr)."""
    parts = parts_dir(out)
    proc = _start_stalled(_argv(ckpt, out), after, mode)
    if mode == "after":
        _wait_for(lambda: len(_chunks(parts)) >= after, proc)
        time.sleep(0.2)  # past the rename, into the sleep
    else:  # the stalled write's own temporary (an earlier chunk's may exist for a moment too)
        _wait_for(lambda: any(parts.glob(f".chunk_{after:06d}.npz.*.tmp")), proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.parametrize("sig,after", [(signal.SIGKILL, 1), pytest.param(signal.SIGKILL, 3, marks=pytest.mark.slow),
                                       pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow), (signal.SIGTERM, 3)],
                         ids=["kill9-after1", "kill9-after3", "sigint-after1", "sigterm-after3"])
def test_interrupted_sample_continues_to_the_same_arrays(ckpt, reference, tmp_path, capsys, sig, after):
    out = tmp_path / "s.npz"
    rc, err = _interrupt(ckpt, out, sig, after)
    expected_rc = {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    assert rc == expected_rc, err
    if sig != signal.SIGKILL:  # a catchable signal: one line saying what was kept, no traceback
        assert "Traceback" not in err, err
        assert f"{after} of {N // CHUNK} chunks kept" in err and "interrupted" in err, err
    parts = parts_dir(out)
    assert _chunks(parts) == [f"chunk_{c:06d}.npz" for c in range(after)]
    assert not out.exists()
    assert not list(parts.glob(".*.tmp")), "an interrupted write left its temporary file"
    assert main(_argv(ckpt, out)) == 0  # the same command again
    log = capsys.readouterr().out
    assert f"{after} of {N // CHUNK} chunks" in log, log
    x = _arrays(out)
    assert sorted(x) == ["arr_0"]
    np.testing.assert_array_equal(x["arr_0"], reference)
    assert not parts.exists()


def test_kill9_inside_a_chunk_write_leaves_a_temp_that_the_rerun_clears(ckpt, reference, tmp_path, capsys):
    out = tmp_path / "w.npz"
    rc, _ = _interrupt(ckpt, out, signal.SIGKILL, 2, mode="write")
    assert rc == -9
    parts = parts_dir(out)
    temps = list(parts.glob(".chunk_000002.npz.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0, "the kill did not land inside the write"
    assert _chunks(parts) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert main(_argv(ckpt, out)) == 0
    assert f"removed {temps[0]}" in capsys.readouterr().out
    np.testing.assert_array_equal(_arrays(out)["arr_0"], reference)


def _unfinished(ckpt: Path, out: Path, kept: int) -> Path:
    """A chunk folder with ``kept`` finished chunks (as a killed run leaves it)."""
    rc, err = _interrupt(ckpt, out, signal.SIGKILL, kept)
    assert rc == -9, err
    return parts_dir(out)


def test_a_damaged_chunk_is_drawn_again(ckpt, reference, tmp_path):
    out = tmp_path / "d.npz"
    parts = _unfinished(ckpt, out, 3)
    bad = parts / "chunk_000001.npz"
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated
    flipped = parts / "chunk_000002.npz"
    with np.load(flipped) as z:  # a valid npz whose pixels no longer match the digest
        arrays = {k: z[k].copy() for k in z.files}
    arrays["arr_0"][0, 0, 0, 0] ^= 1
    np.savez(flipped, **arrays)
    assert main(_argv(ckpt, out)) == 0
    np.testing.assert_array_equal(_arrays(out)["arr_0"], reference)


@pytest.mark.parametrize("extra,option", [(["--steps", "10"], "--steps"),
                                          pytest.param(["--seed", "6"], "--seed", marks=pytest.mark.slow),
                                          pytest.param(["--sampler", "ddim", "--steps", "5"], "--sampler",
                                                       marks=pytest.mark.slow)],
                         ids=["steps", "seed", "sampler"])
def test_another_command_on_unfinished_samples_is_refused(ckpt, tmp_path, capsys, extra, option):
    out = tmp_path / "c.npz"
    parts = _unfinished(ckpt, out, 1)
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    argv = _argv(ckpt, out)
    for i in range(0, len(extra), 2):  # replace or append the changed options
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert option in lines[0] and "--overwrite" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before, "the refusal changed the chunk folder"
    assert not out.exists()
    # --overwrite starts again: the result is that of the new command run fresh elsewhere
    assert main(argv + ["--overwrite"]) == 0
    fresh = tmp_path / "fresh.npz"
    assert main([*argv[:4], str(fresh), *argv[5:]]) == 0
    np.testing.assert_array_equal(_arrays(out)["arr_0"], _arrays(fresh)["arr_0"])
    assert not parts.exists()


def test_batch_size_and_chunk_size_do_not_change_the_job(ckpt, reference, tmp_path):
    """--batch-size is not part of the job (a rerun may change it); a continued job keeps its chunk size."""
    out = tmp_path / "b.npz"
    parts = _unfinished(ckpt, out, 2)
    argv = _argv(ckpt, out)
    argv[argv.index("--batch-size") + 1] = "3"
    argv[argv.index("--chunk-size") + 1] = "5"
    assert main(argv) == 0
    np.testing.assert_array_equal(_arrays(out)["arr_0"], reference)
    assert not parts.exists()


# ----------------------------------------------------------------------------------------------
# torchrun: each rank its chunks; any number of ranks continues the same job


def _torchrun(script: Path, argv: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DDPM_ARGV=json.dumps(argv), **env_extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_gloo_sample_resumed_by_one_process(ckpt, reference, tmp_path, capsys):
    """Rank 1 of a 2-rank torchrun `ddpm sample` dies after its first chunk (torchrun then stops
    rank 0); one plain process continues the job: the same arrays as an uninterrupted run."""
    out = tmp_path / "d.npz"
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc = _torchrun(script, _argv(ckpt, out), STALL_AFTER="1", STALL_MODE="exit", STALL_RANK="1")
    assert proc.returncode != 0, "rank 1 should have died"
    have = _chunks(parts_dir(out))
    assert "chunk_000001.npz" in have and "chunk_000003.npz" not in have, (have, proc.stderr[-2000:])
    assert not out.exists()
    assert main(_argv(ckpt, out)) == 0  # one process, the same command
    np.testing.assert_array_equal(_arrays(out)["arr_0"], reference)
    assert not parts_dir(out).exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_gloo_sample_gives_the_one_process_file(ckpt, reference, tmp_path):
    out = tmp_path / "two.npz"
    script = tmp_path / "plain.py"
    script.write_text(STALL)
    proc = _torchrun(script, _argv(ckpt, out), STALL_AFTER="0", STALL_MODE="none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 12 samples") == 1, proc.stdout  # rank 0 alone writes
    np.testing.assert_array_equal(_arrays(out)["arr_0"], reference)
    assert not parts_dir(out).exists()


# ----------------------------------------------------------------------------------------------
# the samples of `ddpm eval fid --ckpt` (ddpm.evaluate.fid.generate_samples)


def test_fid_samples_continue_after_an_interrupt(tmp_path, monkeypatch):
    import ddpm.chunks as chunks
    from ddpm.chunks import ArgumentsChanged
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.evaluate import fid

    diffusion = GaussianDiffusion(np.linspace(1e-3, 0.2, 6))

    class Model(torch.nn.Module):  # class-conditional (null label 3), so that labels and guidance matter
        num_classes = 3

        def forward(self, x, t, y=None):
            return 0.5 * x + (0.0 if y is None else 0.1 * y.view(-1, 1, 1, 1).float())

    model = Model()

    kw = dict(seed=3, batch_size=4, num_classes=3, guidance=2.0, log=lambda m: None)
    full = fid.generate_samples(diffusion, model, 10, (1, 4, 4), **kw)  # no chunks
    out = tmp_path / "fid.json"
    real, calls = chunks.write_chunk, [0]

    def interrupted(path, arrays):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        real(path, arrays)

    monkeypatch.setattr(chunks, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fid.generate_samples(diffusion, model, 10, (1, 4, 4), resume_at=out, chunk=3, identity={"--ckpt": "x"}, **kw)
    monkeypatch.undo()
    assert _chunks(parts_dir(out)) == ["chunk_000000.npz", "chunk_000001.npz"]
    with pytest.raises(ArgumentsChanged, match="--guidance"):
        fid.generate_samples(diffusion, model, 10, (1, 4, 4), resume_at=out, chunk=3, identity={"--ckpt": "x"},
                             **{**kw, "guidance": 3.0})
    again = fid.generate_samples(diffusion, model, 10, (1, 4, 4), resume_at=out, chunk=3, identity={"--ckpt": "x"},
                                 **{**kw, "batch_size": 2})
    np.testing.assert_array_equal(again, full)
    assert parts_dir(out).exists()  # until the caller has written its result
    chunks.finish(out)
    assert not parts_dir(out).exists()


def test_an_option_error_found_while_sampling_leaves_no_chunk_folder(ckpt, tmp_path, capsys):
    """--steps 1 is refused by the sampler itself (after the manifest was written): no trace."""
    out = tmp_path / "e.npz"
    argv = _argv(ckpt, out)
    argv[argv.index("--n") + 1] = "2"
    assert main(argv + ["--steps", "1"]) == 2
    assert "steps must be >= 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
