"""Two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ddpm.checkpoint import load_checkpoint
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CFG = Config(
    preset="tiny",
    model=ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      dropout=0.0),
    diffusion=DiffusionConfig(num_timesteps=20),
    data=DataConfig(source="digits", random_flip=True),
    # lr 2e-4 (the paper's CIFAR value): Adam divides by sqrt(v)+eps, so a parameter whose gradient
    # is nearly zero turns summation-order rounding into differences of up to ~lr per step; the
    # 1e-5 tolerance below holds for a few steps at this lr, while weights move by ~1e-4 per step.
    train=TrainConfig(total_steps=4, batch_size=8, lr=2e-4, warmup_steps=1, ema_decay=0.9, log_every=2,
                      sample_every=0, save_every=2, keep_last=5),
)

# Each rank trains, then dumps its own final weights (model and EMA) to rank<k>.safetensors.
SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    from ddpm.config import Config
    import ddpm.training.loop as loop

    cfg = Config.from_json(open(sys.argv[1]).read())
    out = sys.argv[2]
    real_run = loop._Trainer.run

    def run_and_dump(self, resume):
        result = real_run(self, resume)
        state = {"model/" + k: v.detach().contiguous() for k, v in self.parts.model.state_dict().items()}
        state.update({"ema/" + k: v.detach().contiguous() for k, v in self.parts.ema.state_dict().items()})
        save_file(state, os.path.join(out, f"rank{self.env.rank}.safetensors"))
        return result

    loop._Trainer.run = run_and_dump
    r = loop.train(cfg, out, device="cpu", progress=False)
    # one write() per line: the two ranks share stdout, and print() may interleave them
    os.write(1, f"RESULT {r['rank']} {r['world_size']} {r['step']}\\n".encode())
""")


# Rank STOP_RANK sends itself SIGTERM during its STOP_CALL-th step (0: never); every rank
# reports (rank, stopped_by, step). Resuming (argv[3] == "auto") continues the run folder.
STOP_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from ddpm.config import Config
    import ddpm.training.loop as loop

    cfg = Config.from_json(open(sys.argv[1]).read())
    out, resume, stop_call = sys.argv[2], (sys.argv[3] if sys.argv[3] != "none" else None), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    real, calls = loop.train_step, [0]

    def step(parts, batch, s):
        calls[0] += 1
        if rank == 1 and calls[0] == stop_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(parts, batch, s)

    loop.train_step = step
    r = loop.train(cfg, out, resume=resume, device="cpu", progress=False)
    os.write(1, f"STOP {r['rank']} {r['stopped_by']} {r['step']} {r['checkpoint']}\\n".encode())
""")


def _torchrun(tmp_path, cfg: Config, nproc: int, script_text: str = SCRIPT, args: tuple = (), out=None):
    script = tmp_path / "run_rank.py"
    script.write_text(script_text)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    out = out or tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(cfg_path), str(out), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_two_process_gloo_matches_one_process(tmp_path):
    # Two ranks with 2 micro-batches each (exercises no_sync) against one process, one micro-batch.
    cfg2 = replace(CFG, train=replace(CFG.train, grad_accum=2))
    out, stdout = _torchrun(tmp_path, cfg2, 2)
    assert "RESULT 0 2 4" in stdout and "RESULT 1 2 4" in stdout
    r0 = load_file(str(out / "rank0.safetensors"))
    r1 = load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and any(k.startswith("ema/") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"

    # Rank 0 alone wrote the run folder; the checkpoint holds both ranks' RNG states.
    ck, meta = load_checkpoint(out / "checkpoints" / "ckpt_000000004.safetensors")
    assert meta["world_size"] == 2 and {"rng/cpu/0", "rng/cpu/1"} <= ck.keys()
    for k in r0:
        assert torch.equal(ck[k], r0[k]), f"checkpoint and rank 0 disagree on {k}"

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from ddpm.training import train

        single = train(CFG, tmp_path / "single", device="cpu", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(n)
    s = load_checkpoint(single["checkpoint"])[0]
    moved = 0
    for k in r0:
        torch.testing.assert_close(r0[k], s[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # the comparison is not vacuous: training moved the weights far more than the tolerance
    first = load_checkpoint(out / "checkpoints" / "ckpt_000000002.safetensors")[0]
    for k in r0:
        if k.startswith("model/") and (r0[k] - first[k]).abs().max() > 1e-4:
            moved += 1
    assert moved > 0


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only, during step 3: the all-reduced stop flag stops both ranks after
    step 3, rank 0 writes ckpt 3, and resuming under torchrun ends bit-identical to a two-rank run
    that was never stopped."""
    cfg = replace(CFG, train=replace(CFG.train, total_steps=6, save_every=0))
    run = tmp_path / "run"
    _, stdout = _torchrun(tmp_path, cfg, 2, STOP_SCRIPT, ("none", 3), out=run)
    ckpt = run / "checkpoints" / "ckpt_000000003.safetensors"
    assert f"STOP 0 15 3 {ckpt}" in stdout and "STOP 1 15 3" in stdout, stdout[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt_*")) == [ckpt.name]
    assert load_checkpoint(ckpt)[1]["world_size"] == 2
    _, stdout = _torchrun(tmp_path, cfg, 2, STOP_SCRIPT, ("auto", 0), out=run)
    assert "STOP 0 None 6" in stdout, stdout[-2000:]
    straight = tmp_path / "straight"
    _torchrun(tmp_path, cfg, 2, STOP_SCRIPT, ("none", 0), out=straight)
    a = load_checkpoint(run / "checkpoints" / "ckpt_000000006.safetensors")[0]
    b = load_checkpoint(straight / "checkpoints" / "ckpt_000000006.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: stopped + resumed differs from the uninterrupted run"
