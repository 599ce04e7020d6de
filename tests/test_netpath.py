"""The network path on the CPU (ddpm.netpath): memory layout and convolution routing decided
together, by timing whole network calls at the batch the work runs. The timer is replaced
throughout (the `tuned` fixture of test_autotune): each candidate really runs, then 'takes' the
seconds the test gives it, so nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ddpm import autotune, fast, netpath
from ddpm import winograd as wg
from ddpm.config import apply_overrides, get_preset
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling import sample
from ddpm.speed import Speed
from test_autotune import tuned  # noqa: F401  (the fixture)
from test_cli import run
from test_winograd import NET_REL_TOL, _unet

pytestmark = pytest.mark.usefixtures("one_thread")

COMBOS = ("nchw/direct", "nhwc/direct", "nchw/winograd", "nhwc/winograd")
# the per-layer routing inside a Winograd candidate asks the timer too; a tie keeps "direct"
# except where a test says otherwise
PER_LAYER = {"direct": 1.0, "winograd": 0.5}


def _times(fastest: str, **others) -> dict:
    return {name: 1.0 for name in COMBOS} | {fastest: 0.5} | PER_LAYER | others


@pytest.mark.parametrize("fastest", COMBOS)
def test_picks_the_combination_the_timer_says_is_fastest(tuned, fastest):  # noqa: F811
    calls = tuned(_times(fastest))
    m = _unet(128).eval()
    snap = [(p, p.data_ptr(), p.stride(), p.detach().clone()) for p in m.parameters()]
    path = netpath.decide(m, "cpu", (16, 1, 8, 8))
    assert path.name == fastest and path.how == "timed" and path.batch == 16
    assert (path.channels_last, path.winograd) == (fastest.startswith("nhwc"), fastest.endswith("winograd"))
    # all four were timed, interleaved: a warm-up each, then at least MIN_ROUNDS rounds
    joint = [c for c in calls if c in COMBOS]
    assert set(joint) == set(COMBOS) and len(joint) >= 4 * (1 + netpath.MIN_ROUNDS)
    assert path.seconds == {name: (0.5 if name == fastest else 1.0) for name in COMBOS}
    text = path.describe()
    assert text.startswith(f"network path {fastest} (timed at batch 16: {fastest} 500.0 ms")
    # the model itself is untouched (each candidate ran on its own copy)
    assert all(p.data_ptr() == ptr and p.stride() == st and torch.equal(p, v) and p.grad is None
               for p, ptr, st, v in snap)
    assert not any("forward" in c.__dict__ for c in m.modules())  # no routing left behind


def test_decision_is_cached_and_invalidated_by_a_change(tuned, monkeypatch):  # noqa: F811
    calls = tuned(_times("nhwc/winograd"))
    m = _unet(128).eval()
    first = netpath.decide(m, "cpu", (16, 1, 8, 8))
    n = len(calls)
    again = netpath.decide(m, "cpu", (16, 1, 8, 8))  # this process: from memory
    assert again.name == first.name and again.how == "cached" and again.seconds == first.seconds
    autotune.clear_memory()  # a new process: from the file, with its timings
    from_file = netpath.decide(m, "cpu", (16, 1, 8, 8))
    assert from_file.name == "nhwc/winograd" and from_file.how == "cached" and from_file.seconds == first.seconds
    assert len(calls) == n
    (entry,) = [v for k, v in json.loads(autotune.cache_path().read_text())["decisions"].items()
                if k.startswith("path|")]
    assert entry["choice"] == "nhwc/winograd"
    # what the speed depends on is part of the key: another batch, another network, the mode,
    # the autocast dtype, the thread count: each is timed afresh
    tuned(_times("nchw/direct"))
    assert netpath.decide(m, "cpu", (32, 1, 8, 8)).name == "nchw/direct"
    assert netpath.decide(_unet(128, seed=1).eval(), "cpu", (16, 1, 8, 8)).name == "nhwc/winograd"  # same shapes
    assert netpath.decide(_unet(64).eval(), "cpu", (16, 1, 8, 8)).how == "timed"
    assert netpath.decide(m, "cpu", (16, 1, 8, 8), train=True).how == "timed"
    torch.set_num_threads(2)
    assert netpath.decide(m, "cpu", (16, 1, 8, 8)).how == "timed"


def test_plain_path_kept_within_the_margin(tuned):  # noqa: F811
    close = 1.0 - netpath.MARGIN / 2
    tuned({name: 1.0 for name in COMBOS} | {"nhwc/winograd": close} | PER_LAYER)
    assert netpath.decide(_unet(128).eval(), "cpu", (8, 1, 8, 8)).name == "nchw/direct"
    tuned({name: 1.0 for name in COMBOS} | {"nhwc/winograd": 1.0 - 2 * netpath.MARGIN} | PER_LAYER)
    assert netpath.decide(_unet(128).eval(), "cpu", (4, 1, 8, 8)).name == "nhwc/winograd"


def test_fixed_options_narrow_the_candidates(tuned):  # noqa: F811
    calls = tuned(_times("nhwc/winograd", **{"nhwc/direct": 0.7, "nchw/winograd": 0.6}))
    m = _unet(128).eval()
    p = netpath.decide(m, "cpu", (8, 1, 8, 8), channels_last=False)
    assert p.name == "nchw/winograd" and set(c for c in calls if c in COMBOS) == {"nchw/direct", "nchw/winograd"}
    calls.clear()
    p = netpath.decide(m, "cpu", (8, 1, 8, 8), winograd=False)
    assert p.name == "nhwc/direct" and set(c for c in calls if c in COMBOS) == {"nchw/direct", "nhwc/direct"}
    calls.clear()
    # under autocast (bf16) or compile Winograd does not apply: only the layouts are timed
    p = netpath.decide(m, "cpu", (8, 1, 8, 8), amp_dtype=torch.bfloat16)
    assert p.name == "nhwc/direct" and set(c for c in calls if c in COMBOS) == {"nchw/direct", "nhwc/direct"}
    calls.clear()
    p = netpath.decide(m, "cpu", (8, 1, 8, 8), channels_last=True, winograd=False)
    assert (p.name, p.how, calls) == ("nhwc/direct", "set", [])


def test_static_rules_without_timing_and_on_cuda(tuned, monkeypatch):  # noqa: F811
    calls = tuned(_times("nchw/winograd"))
    m = _unet(128).eval()
    # CUDA: nothing timed; NHWC only under compile, never Winograd
    assert netpath.decide(m, "cuda", (8, 1, 8, 8)).name == "nchw/direct"
    assert netpath.decide(m, "cuda", (8, 1, 8, 8), compile=True).name == "nhwc/direct"
    # not a module, or a network whose input channels do not match: the static rule
    assert netpath.decide(lambda x, t: x, "cpu", (8, 1, 8, 8)).how == "static"
    assert netpath.decide(m, "cpu", (8, 3, 8, 8)).how == "static"
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")  # static: NHWC from 32x32 pixels, Winograd's own rule
    assert netpath.decide(m, "cpu", (8, 1, 8, 8)).name == "nchw/winograd"
    assert netpath.decide(m, "cpu", (8, 1, 32, 32)).name == "nhwc/winograd"
    assert netpath.decide(m, "cpu", (8, 1, 32, 32), train=True).name == "nchw/winograd"  # training: NCHW
    assert calls == []


def test_probe_batch_is_capped(tuned, monkeypatch):  # noqa: F811
    tuned(_times("nhwc/direct"))
    monkeypatch.setattr(netpath, "PROBE_MAX_PIXELS", 6 * 64)  # 6 images of 8x8 (the real cap: 64 of 32x32)
    p = netpath.decide(_unet(128).eval(), "cpu", (50, 1, 8, 8))
    assert p.batch == 6 and "at batch 6:" in p.describe()


def test_training_path_times_forward_and_backward_at_the_micro_batch(tuned, monkeypatch):  # noqa: F811
    """for_training: the run's micro-batch (batch / world size / accumulation), fwd+bwd, the
    options of train.channels_last / train.winograd; weights, gradients and the RNG untouched."""
    calls = tuned(_times("nchw/winograd"))
    cfg = apply_overrides(get_preset("digits"), ["model.ch=128", "model.ch_mult=1,1", "model.attn_resolutions=",
                                                 "train.batch_size=32", "train.grad_accum=2"])
    from ddpm.nets.unet import UNet

    m = UNet.from_config(cfg.model, cfg.out_channels).train()
    snap = [(p, p.detach().clone()) for p in m.parameters()]
    rng = torch.get_rng_state()
    p = netpath.for_training(cfg, m, "cpu", world_size=2)
    assert p.name == "nchw/winograd" and p.batch == 8  # 32 / 2 ranks / 2 accumulation steps
    keys = [k for k in json.loads(autotune.cache_path().read_text())["decisions"] if k.startswith("path|")]
    assert len(keys) == 1 and "|fwd+bwd|" in keys[0] and "|8x1x8x8|" in keys[0]
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in the probe did not move the seed
    assert all(q.grad is None and torch.equal(q, v) for q, v in snap)
    calls.clear()
    off = apply_overrides(cfg, ["train.winograd=false", "train.channels_last=true"])
    assert netpath.for_training(off, m, "cpu").name == "nhwc/direct" and calls == []


def test_sampling_uses_the_decision_and_says_so(tuned, caplog):  # noqa: F811
    """ddpm.sample decides at its batch (guidance doubles it), logs the path, and its samples
    agree with the plain path within the Winograd bound."""
    tuned(_times("nhwc/winograd", direct=1.0, winograd=0.5))
    m = _unet(128).eval()
    d = GaussianDiffusion.from_config(get_preset("digits").diffusion)
    with caplog.at_level(logging.INFO, logger="ddpm"):
        got = sample(d, m, (1, 8, 8), list(range(6)), steps=3, sampler="ddim", batch_size=4)
    assert any(r.getMessage().startswith("network path nhwc/winograd (timed at batch 4:") for r in caplog.records)
    ref = sample(d, m, (1, 8, 8), list(range(6)), steps=3, sampler="ddim", batch_size=4,
                 speed=Speed(channels_last=False, winograd=False))
    torch.testing.assert_close(got, ref, rtol=0, atol=50 * NET_REL_TOL)
    assert not torch.equal(got, ref)  # Winograd really ran (its rounding differs from the direct sum)
    assert not any("forward" in c.__dict__ for c in m.modules())


def test_bare_fastmodel_times_the_layout_alone(tuned):  # noqa: F811
    calls = tuned(_times("nhwc/winograd", **{"nhwc/direct": 0.7}))
    m = _unet(128).eval()
    assert fast.wants_channels_last(m, "cpu", (8, 8)) is True
    assert set(c for c in calls if c in COMBOS) == {"nchw/direct", "nhwc/direct"}


def test_cli_sample_verbose_prints_the_path(tuned, tmp_path, capsys):  # noqa: F811
    """`ddpm sample -v` names the chosen path and its timings on stderr; without -v it is quiet."""
    from ddpm.checkpoint import add_prefix, save_checkpoint
    from ddpm.nets.unet import UNet

    tuned(_times("nhwc/direct"))
    cfg = apply_overrides(get_preset("digits"), ["model.ch=64", "model.ch_mult=1", "model.attn_resolutions=",
                                                 "diffusion.num_timesteps=10"])
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, add_prefix(UNet.from_config(cfg.model, cfg.out_channels).state_dict(), "ema/"),
                    {"config": cfg.to_dict(), "step": 1, "kind": "weights"})
    argv = ["sample", "--ckpt", str(ckpt), "--n", "4", "--batch-size", "4", "--sampler", "ddim", "--steps", "2"]
    rc, _, err = run(argv + ["--out", str(tmp_path / "a.npz"), "-v"], capsys)
    assert rc == 0, err
    assert "ddpm: network path nhwc/direct (timed at batch 4: nhwc/direct 500.0 ms" in err
    rc, _, err = run(argv + ["--out", str(tmp_path / "b.npz")], capsys)
    assert rc == 0 and "network path" not in err
    assert logging.getLogger("ddpm").level == logging.NOTSET  # -v undone after the command
    from ddpm.cli import build_parser  # every command and sub-command takes -v, before or after its own

    p = build_parser()
    assert p.parse_args(["eval", "steps", "--ckpt", "x", "-v"]).verbose
    assert p.parse_args(["eval", "-v", "steps", "--ckpt", "x"]).verbose
    assert p.parse_args(["train", "-v", "--preset", "digits", "--out", "o"]).verbose
    assert not hasattr(p.parse_args(["eval", "steps", "--ckpt", "x"]), "verbose")
