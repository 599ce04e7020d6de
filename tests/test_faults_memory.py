"""Out of memory: a training batch that does not fit is split into micro-batches (the results of
the same run with that ``train.grad_accum``); ``ddpm sample`` halves its batch (the same images).

The device's out-of-memory error is simulated: the U-Net's forward raises
``torch.OutOfMemoryError`` (what CUDA raises) after doing its work (so that dropout has drawn
from the RNG, as a real failure late in the network would), for batches above a limit or on
its k-th call only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.config import apply_overrides, get_preset
from ddpm.errors import ConfigError
from ddpm.nets.unet import UNet
from ddpm.training.oom import next_split

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.ch=32", "model.ch_mult=1,2", "model.num_res_blocks=1", "model.attn_resolutions=4",
        "model.dropout=0.1", "diffusion.num_timesteps=20", "train.batch_size=8", "train.total_steps=4",
        "train.save_every=2", "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
        "train.keep_last=5"]


def _oom_forward(monkeypatch, *, above: int | None = None, at_call: int | None = None) -> list[int]:
    """UNet.forward raises OutOfMemoryError for batches larger than ``above`` or on call ``at_call``
    (1-based); returns the batch sizes of every call."""
    real, sizes = UNet.forward, []

    def forward(self, x, t, *a, **k):
        sizes.append(int(x.shape[0]))
        out = real(self, x, t, *a, **k)
        if (above is not None and x.shape[0] > above) or len(sizes) == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return out

    monkeypatch.setattr(UNet, "forward", forward)
    return sizes


def _train(cfg, out: Path, resume=None) -> tuple[dict, list[str]]:
    from ddpm.training.loop import train

    lines: list[str] = []
    return train(cfg, out, resume=resume, device="cpu", progress=False, log=lines.append), lines


def _same_weights(a: str, b: str) -> None:
    ta, tb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


def test_next_split():
    assert next_split(8, 1) == 2 and next_split(8, 2) == 4 and next_split(8, 4) == 8 and next_split(8, 8) is None
    assert next_split(6, 2) == 3 and next_split(7, 1) == 7


def test_batch_that_never_fits_is_split_like_grad_accum(tmp_path, monkeypatch):
    cfg = apply_overrides(get_preset("digits"), TINY)
    sizes = _oom_forward(monkeypatch, above=4)
    res, lines = _train(cfg, tmp_path / "split")
    monkeypatch.undo()
    notes = [ln for ln in lines if "out of memory" in ln]
    assert len(notes) == 1, lines  # said once, kept for the run
    assert "step 0" in notes[0] and "2 micro-batches of 4" in notes[0] and "train.grad_accum=2" in notes[0]
    assert sizes == [8] + [4] * 8, sizes  # one failed pass of 8, then 4 steps x 2 micro-batches
    ref, _ = _train(apply_overrides(cfg, ["train.grad_accum=2"]), tmp_path / "ref")
    assert res["step"] == ref["step"] == 4
    _same_weights(res["checkpoint"], ref["checkpoint"])
    # the configured value stays in the run's config (the split is not a setting)
    assert load_checkpoint(res["checkpoint"])[1]["config"]["train"]["grad_accum"] == 1


def test_one_oom_mid_run_splits_from_that_step_on(tmp_path, monkeypatch):
    """A transient failure at step 2 (the 3rd forward call): steps 0-1 as configured, 2-3 split;
    the same as a run whose steps 2-3 are called with train.grad_accum=2 (set here by hand)."""
    cfg = apply_overrides(get_preset("digits"), TINY)
    sizes = _oom_forward(monkeypatch, at_call=3)
    res, lines = _train(cfg, tmp_path / "split")
    monkeypatch.undo()
    assert sizes == [8, 8, 8, 4, 4, 4, 4], sizes
    assert sum("out of memory at step 2" in ln for ln in lines) == 1, lines
    import copy

    import ddpm.training.loop as loop

    real_step, cfg2 = loop.train_step, apply_overrides(cfg, ["train.grad_accum=2"])

    def by_hand(parts, batch, step):
        if step >= 2:
            parts = copy.copy(parts)
            parts.cfg = cfg2
        return real_step(parts, batch, step)

    monkeypatch.setattr(loop, "train_step", by_hand)
    ref, _ = _train(cfg, tmp_path / "ref")
    monkeypatch.undo()
    _same_weights(res["checkpoint"], ref["checkpoint"])
    # and it differs from the run without the failure only by summation order (dropout masks
    # are drawn per micro-batch, so not bitwise): a sanity check that the split really happened
    plain, _ = _train(cfg, tmp_path / "plain")
    a, b = load_checkpoint(res["checkpoint"])[0], load_checkpoint(plain["checkpoint"])[0]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_oom_at_one_image_per_pass_stops_naming_grad_accum(tmp_path, monkeypatch):
    cfg = apply_overrides(get_preset("digits"), TINY)
    _oom_forward(monkeypatch, above=0)
    with pytest.raises(ConfigError, match="train.grad_accum") as ei:
        _train(cfg, tmp_path / "run")
    assert "out of memory at step 0" in str(ei.value) and "\n" not in str(ei.value)


# ----------------------------------------------------------------------------------------------
# sampling


def _sample(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    rc = main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--n", "8", "--chunk-size", "4",
               "--seed", "3", "--no-progress", "--device", "cpu", *extra])
    assert rc == 0
    with np.load(out) as z:
        return z["arr_0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from test_faults_sampling import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("mem") / "weights.safetensors")


@pytest.mark.parametrize("above,at_call", [(2, None), (None, 25)], ids=["never-fits", "once-in-chunk-2"])
def test_sample_halves_its_batch_and_gives_the_same_images(ckpt, tmp_path, monkeypatch, capsys, above, at_call):
    ref = _sample(ckpt, tmp_path / "ref.npz", "--batch-size", "4")
    capsys.readouterr()
    sizes = _oom_forward(monkeypatch, above=above, at_call=at_call)
    got = _sample(ckpt, tmp_path / "oom.npz", "--batch-size", "4")
    monkeypatch.undo()
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if "out of memory" in ln]
    assert len(notes) == 1 and "batch 4" in notes[0] and "batch 2" in notes[0], out
    assert 2 in sizes and 4 in sizes, sizes  # a failed pass of 4, then passes of 2
    np.testing.assert_array_equal(got, ref)


def test_sample_oom_at_batch_1_is_an_error(ckpt, tmp_path, monkeypatch):
    _oom_forward(monkeypatch, above=0)
    with pytest.raises(torch.OutOfMemoryError):
        main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), "--n", "2", "--batch-size", "2",
              "--no-progress", "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# the plan: a warning before the first step


def test_plan_warns_when_the_step_will_not_fit():
    from ddpm.plan import StepMeasure, fit_line

    cfg = apply_overrides(get_preset("digits"), TINY)
    mib = 1 << 20
    # state 100 MiB, activations 800 MiB for a micro-batch of 8 (100 MiB per image)
    m = StepMeasure(seconds=1.0, params=1, state_bytes=100 * mib, activation_bytes=800 * mib, measured_batch=8,
                    micro_batch=8, update_bytes=10 * mib)
    assert fit_line(cfg, m, "cuda:0", free_total=(2000 * mib, 4000 * mib)) is None  # 900 MiB fits
    line = fit_line(cfg, m, "cuda:0", free_total=(510 * mib, 4000 * mib))
    # (510 - 100 - 10) MiB of room / 100 MiB per image = 4 images per forward pass
    assert line.startswith("warning: memory") and "~900 MiB" in line and "510 MiB free" in line, line
    assert "at most ~4 images" in line and "train.grad_accum" in line, line
    assert "smaller model" in fit_line(cfg, m, "cuda:0", free_total=(50 * mib, 4000 * mib))
    assert fit_line(cfg, m, "cpu") is None  # no device query on a CPU


def test_plan_survives_an_oom_in_its_warm_up_step(monkeypatch):
    import ddpm.plan as plan

    def measure(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(plan, "measure_step", measure)
    cfg = apply_overrides(get_preset("digits"), TINY)
    lines = plan.build_plan(cfg, torch.device("cpu"), measure=True)
    assert any("ran out of memory" in ln and "micro-batches" in ln for ln in lines), lines
