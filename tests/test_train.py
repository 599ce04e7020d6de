"""Trainer pieces: LR warm-up, EMA, clipping, gradient accumulation, importance sampling of t,
run folder (keep_last, latest, metrics, samples), and the non-finite guard."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import list_checkpoints, load_checkpoint, split_prefix
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm.training.ema import EMA
from ddpm.training.optim import grad_norm_and_clip, warmup_lr
from ddpm.training.tsampler import LossSecondMomentSampler, UniformSampler

TINY_MODEL = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**train) -> Config:
    base = TrainConfig(total_steps=4, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=0,
                       sample_every=0, save_every=0, keep_last=10)
    return Config(preset="tiny", model=TINY_MODEL, diffusion=DiffusionConfig(num_timesteps=20),
                  data=DataConfig(source="digits", random_flip=False), train=replace(base, **train))


def run(cfg: Config, out: Path, resume=None, log=None):
    from ddpm.training import train

    msgs = [] if log is None else log
    return train(cfg, out, resume=resume, device="cpu", progress=False, log=msgs.append)


def ckpt(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------- LR

def test_warmup_lr_values():
    assert warmup_lr(0, 2e-4, 5000) == 0.0
    assert warmup_lr(2500, 2e-4, 5000) == pytest.approx(1e-4, rel=1e-12)
    assert warmup_lr(5000, 2e-4, 5000) == pytest.approx(2e-4, rel=1e-12)
    assert warmup_lr(10_000, 2e-4, 5000) == pytest.approx(2e-4, rel=1e-12)
    assert warmup_lr(0, 2e-4, 0) == pytest.approx(2e-4)  # no warm-up


def test_first_step_has_zero_lr_and_metrics_report_the_schedule(tmp_path):
    # Step 0 uses LR 0 (paper Appendix B): after one step the weights are the initial ones, so the EMA
    # (started as a copy) still equals them exactly. With LR > 0 they would differ.
    r = run(tiny_config(total_steps=1, warmup_steps=4, log_every=1), tmp_path / "a")
    t = ckpt(r["checkpoint"])
    model, ema = split_prefix(t, "model/"), split_prefix(t, "ema/")
    assert all(torch.equal(model[k], ema[k]) for k in model)
    r2 = run(tiny_config(total_steps=3, warmup_steps=4, log_every=1), tmp_path / "b")
    t2 = ckpt(r2["checkpoint"])
    m2, e2 = split_prefix(t2, "model/"), split_prefix(t2, "ema/")
    assert any(not torch.equal(m2[k], e2[k]) for k in m2)
    recs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    # Record at step s reports the LR of the update with index s-1: lr·(s-1)/warmup.
    assert [rec["lr"] for rec in recs] == pytest.approx([0.0, 1e-3 * 1 / 4, 1e-3 * 2 / 4])


# ---------------------------------------------------------------------------------------------- EMA

def test_ema_matches_hand_computation():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    decay = 0.9
    ema = EMA(net, decay)
    expected = {k: v.detach().clone().double() for k, v in net.state_dict().items()}
    for k, v in ema.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])  # starts as a copy
    assert not any(p.requires_grad for p in ema.module.parameters())
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        for k, v in net.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v.double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(v, net.state_dict()[k])  # it really lags behind


def test_trainer_updates_ema_every_step(tmp_path):
    # ema_k = d·ema_{k-1} + (1-d)·model_k between consecutive checkpoints.
    r = run(tiny_config(total_steps=4, warmup_steps=0, save_every=1, ema_decay=0.75), tmp_path)
    files = list_checkpoints(Path(r["run_dir"]) / "checkpoints")
    assert len(files) == 4
    for prev, cur in zip(files[:-1], files[1:]):
        a, b = ckpt(prev), ckpt(cur)
        ema_prev, ema, model = split_prefix(a, "ema/"), split_prefix(b, "ema/"), split_prefix(b, "model/")
        for k in model:
            expected = 0.75 * ema_prev[k].double() + 0.25 * model[k].double()
            torch.testing.assert_close(ema[k].double(), expected, rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(ema[k], ema_prev[k]) for k in model)


# ---------------------------------------------------------------------------------------------- clipping

def test_grad_norm_and_clip():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = grad_norm_and_clip([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)  # the norm before clipping
    assert a.grad.tolist() == pytest.approx([0.6, 0.0, 0.0], rel=1e-5)
    assert b.grad[0, 1].item() == pytest.approx(0.8, rel=1e-5)
    # below the threshold nothing changes; 0 disables clipping but still reports the norm
    norm = grad_norm_and_clip([a, b], 10.0)
    assert float(norm) == pytest.approx(1.0, rel=1e-5) and a.grad[0].item() == pytest.approx(0.6, rel=1e-5)
    b.grad.mul_(100)
    norm = grad_norm_and_clip([a, b], 0.0)
    assert float(norm) == pytest.approx(math.hypot(0.6, 80.0), rel=1e-5)
    assert b.grad[0, 1].item() == pytest.approx(80.0, rel=1e-5)


def test_trainer_clips_at_train_grad_clip(tmp_path, monkeypatch):
    import ddpm.training.step as step

    seen = []

    def spy(params, max_norm):
        norm = grad_norm_and_clip(params, max_norm)
        after = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
        seen.append((max_norm, float(norm), float(after)))
        return norm

    monkeypatch.setattr(step, "grad_norm_and_clip", spy)
    run(tiny_config(total_steps=2, grad_clip=0.05), tmp_path)
    assert [s[0] for s in seen] == [0.05, 0.05]
    for _, before, after in seen:
        assert before > 0.05  # a fresh U-Net's gradient is far above this
        assert after == pytest.approx(0.05, rel=1e-4)


# ---------------------------------------------------------------------------------------------- accumulation

def test_grad_accumulation_equals_full_batch(tmp_path):
    # One real update (warm-up 0): Adam's first moment is (1-β1)·gradient, so comparing it compares
    # the gradients of 1×8 and 2×4; the weights after the update must agree as well.
    one = ckpt(run(tiny_config(total_steps=1, warmup_steps=0, grad_clip=0.0), tmp_path / "a")["checkpoint"])
    two = ckpt(run(tiny_config(total_steps=1, warmup_steps=0, grad_clip=0.0, grad_accum=2),
                   tmp_path / "b")["checkpoint"])
    assert one.keys() == two.keys()
    m1 = [k for k in one if k.endswith("/exp_avg")]
    assert m1
    for k in m1:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-9)
    for k in one:
        if k.startswith(("model/", "ema/")):
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    # ... and accumulation is not a no-op: the second micro-batch really contributes.
    half = ckpt(run(tiny_config(total_steps=1, warmup_steps=0, grad_clip=0.0, batch_size=4),
                    tmp_path / "c")["checkpoint"])
    assert any(not torch.allclose(half[k], one[k], rtol=1e-3, atol=1e-7) for k in m1)


# ---------------------------------------------------------------------------------------------- t sampling

def test_uniform_sampler():
    s = UniformSampler(10)
    t, w = s.sample(5000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 9
    assert torch.equal(w, torch.ones(5000))
    assert torch.allclose(s.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))


def test_importance_sampler_probabilities_and_weights():
    T, H = 4, 10
    s = LossSecondMomentSampler(T, history=H, uniform_prob=1e-3)
    g = torch.Generator().manual_seed(0)
    # Before every t has 10 losses: uniform, weight 1.
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert not s.warmed_up()
    t, w = s.sample(6, g)
    assert torch.equal(w, torch.ones(6))
    assert torch.allclose(s.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))
    # Fill histories: t gets losses whose RMS is known.
    rms = np.array([1.0, 2.0, 3.0, 4.0])
    for _ in range(H + 3):  # more than H: old values are pushed out
        s.update(torch.arange(T), torch.tensor(rms))
    assert s.warmed_up() and s.loss_counts.tolist() == [H] * T
    p_expected = (1 - 1e-3) * rms / rms.sum() + 1e-3 / T
    np.testing.assert_allclose(s.probabilities().numpy(), p_expected, rtol=1e-12)
    t, w = s.sample(200_000, g)
    np.testing.assert_allclose(w.double().numpy(), 1.0 / (T * p_expected[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / len(t)
    np.testing.assert_allclose(freq, p_expected, atol=0.005)
    # Unbiased: E_p[w·L_t] equals the uniform average of L_t.
    assert float((p_expected * (1.0 / (T * p_expected)) * rms).sum()) == pytest.approx(rms.mean())
    # The history is a sliding window: the newest value replaces the oldest.
    s.update(torch.tensor([3]), torch.tensor([100.0]))
    assert s.loss_history[3, -1].item() == 100.0 and s.loss_history[3, :-1].tolist() == [4.0] * (H - 1)
    # state round trip
    s2 = LossSecondMomentSampler(T, history=H)
    s2.load_state_tensors(s.state_tensors())
    assert torch.equal(s2.probabilities(), s.probabilities())


# ---------------------------------------------------------------------------------------------- run folder

def test_keep_last_latest_metrics_and_samples(tmp_path):
    cfg = tiny_config(total_steps=4, save_every=1, keep_last=2, log_every=2, sample_every=2, sample_n=4)
    r = run(cfg, tmp_path)
    files = list_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files] == ["ckpt_000000003.safetensors", "ckpt_000000004.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt_000000004.safetensors"
    assert r["checkpoint"] == str(files[-1]) and r["step"] == 4
    assert Config.from_json((tmp_path / "config.json").read_text()) == cfg
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [2, 4]
    for rec in recs:
        for key in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr", "images_per_s",
                    "skipped_nonfinite", "time"):
            assert key in rec, key
        assert math.isfinite(rec["loss"]) and rec["loss"] > 0 and rec["grad_norm"] > 0
        assert rec["images_per_s"] > 0 and rec["skipped_nonfinite"] == 0
        quarters = [rec[f"loss_q{k}"] for k in range(4) if rec[f"loss_q{k}"] is not None]
        assert quarters and min(quarters) <= rec["loss"] <= max(quarters)
    from PIL import Image

    for step in (2, 4):
        png = tmp_path / "samples" / f"step_{step:09d}.png"
        assert png.is_file()
        im = Image.open(png)
        assert im.mode == "L" and min(im.size) >= 2 * 8  # a 2x2 grid of 8x8 images (maybe enlarged)
    meta = load_checkpoint(files[-1])[1]
    assert meta["kind"] == "train" and meta["step"] == 4 and meta["data_sampler"]["position"] == 32
    assert Config.from_dict(meta["config"]) == cfg


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    from ddpm.errors import UserError

    run(tiny_config(total_steps=1), tmp_path)
    before = (tmp_path / "checkpoints" / "ckpt_000000001.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume auto"):
        run(tiny_config(total_steps=2), tmp_path)
    assert (tmp_path / "checkpoints" / "ckpt_000000001.safetensors").read_bytes() == before


def test_batch_not_divisible_by_accumulation_is_a_config_error(tmp_path):
    from ddpm.errors import ConfigError

    cfg = tiny_config()
    bad = replace(cfg, train=replace(cfg.train, batch_size=6, grad_accum=4))
    with pytest.raises(ConfigError, match="grad_accum"):
        run(bad, tmp_path)


def test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import ddpm.checkpoint as ck
    from ddpm.errors import CheckpointError

    real = ck.atomic_write_bytes

    def flaky(path, data):
        if Path(path).name == "ckpt_000000002.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", flaky)
    with pytest.raises(CheckpointError, match="No space left"):
        run(tiny_config(total_steps=3, save_every=1), tmp_path)
    files = list_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files] == ["ckpt_000000001.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == files[0].name
    load_checkpoint(files[0])  # intact


# ---------------------------------------------------------------------------------------------- non-finite guard

def _nan_at(monkeypatch, bad_calls):
    """Make GaussianDiffusion.training_losses return NaN on the given (0-based) calls."""
    from ddpm.diffusion import GaussianDiffusion

    real = GaussianDiffusion.training_losses
    counter = {"n": 0}

    def patched(self, model, x0, t, noise=None, **kw):
        out = real(self, model, x0, t, noise=noise, **kw)
        k = counter["n"]
        counter["n"] += 1
        return out * float("nan") if k in bad_calls else out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)


def _all_finite(path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in ckpt(path).values() if v.is_floating_point())


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 3})
    msgs = []
    r = run(tiny_config(total_steps=5, save_every=1, log_every=5, max_nonfinite_in_row=3), tmp_path, log=msgs)
    assert r["skipped_nonfinite"] == 2 and r["step"] == 5
    files = {f.name: f for f in list_checkpoints(tmp_path / "checkpoints")}
    assert all(_all_finite(f) for f in files.values())
    # The skipped steps changed nothing: after steps 3 and 4 the state equals the one after step 2.
    a, b = ckpt(files["ckpt_000000002.safetensors"]), ckpt(files["ckpt_000000004.safetensors"])
    for k in a:
        if k.startswith(("model/", "ema/", "optim/")):
            assert torch.equal(a[k], b[k]), k
    c = ckpt(files["ckpt_000000005.safetensors"])
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model/"))  # step 5 trained again
    assert sum("non-finite loss or gradient" in m for m in msgs) == 2
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_nonfinite"] == 2 and math.isfinite(rec["loss"])


def test_run_stops_after_max_nonfinite_in_row(tmp_path, monkeypatch):
    from ddpm.errors import UserError

    _nan_at(monkeypatch, set(range(2, 100)))
    with pytest.raises(UserError, match="max_nonfinite_in_row=3"):
        run(tiny_config(total_steps=20, save_every=1, max_nonfinite_in_row=3), tmp_path)
    files = list_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files][-1] == "ckpt_000000004.safetensors"  # stopped during step 5
    assert files and all(_all_finite(f) for f in files)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_trains_in_fp32_weights(tmp_path, precision):
    r = run(tiny_config(total_steps=2, warmup_steps=0, precision=precision, log_every=2), tmp_path)
    tensors, meta = load_checkpoint(r["checkpoint"])
    assert meta["precision"] == precision
    assert (meta["grad_scaler"] is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.startswith(("model/", "ema/")))
    assert _all_finite(r["checkpoint"]) and math.isfinite(r["loss"])
    fp32 = ckpt(run(tiny_config(total_steps=2, warmup_steps=0, log_every=2), tmp_path / "fp32")["checkpoint"])
    # autocast really ran: the update differs from fp32's, but only slightly (~ one Adam step of lr)
    diffs = [float((tensors[k] - fp32[k]).abs().max()) for k in fp32 if k.startswith("model/")]
    assert max(diffs) > 0 and max(diffs) < 2 * 1e-3 * 2


# ---------------------------------------------------------------------------------------------- train_step alone

class _LabelNet(torch.nn.Module):
    """eps-prediction from x, t and a per-example label y (an embedding added to a 1x1 conv);
    records the labels each call received."""

    def __init__(self, num_classes: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.emb = torch.nn.Embedding(num_classes, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.seen.append(None if y is None else y.clone())
        out = self.conv(x)
        return out if y is None else out + self.emb(y)[:, :, None, None]


def _parts(model, **train):
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.training.optim import make_optimizer
    from ddpm.training.precision import resolve_precision
    from ddpm.training.step import TrainParts
    from ddpm.training.tsampler import make_t_sampler

    cfg = tiny_config(warmup_steps=0, **train)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    return TrainParts(cfg=cfg, model=model, train_model=model, diffusion=diffusion, ema=EMA(model, 0.5),
                      optimizer=make_optimizer(list(model.parameters()), cfg.train, torch.device("cpu")),
                      t_sampler=make_t_sampler("uniform", diffusion.num_timesteps),
                      precision=resolve_precision("fp32", torch.device("cpu")), device=torch.device("cpu"))


def test_train_step_passes_each_micro_batch_its_slice_of_model_kwargs():
    from ddpm.training.step import Batch, train_step

    net = _LabelNet()
    parts = _parts(net, grad_accum=2)
    y = torch.tensor([3, 1, 4, 1, 5, 2, 6, 0])
    before = net.emb.weight.detach().clone()
    result = train_step(parts, Batch(torch.rand(8, 1, 8, 8) * 2 - 1, {"y": y}), step=0)
    assert result.applied and result.lr == pytest.approx(1e-3)
    assert [s.tolist() for s in net.seen] == [y[:4].tolist(), y[4:].tolist()]
    # the labels reached the loss: exactly the rows of the labels used got a gradient and moved
    moved = (net.emb.weight.detach() != before).any(dim=1)
    assert moved.tolist() == [i in set(y.tolist()) for i in range(8)]
    # without kwargs the network is called as model(x, t)
    net.seen.clear()
    train_step(parts, Batch(torch.rand(8, 1, 8, 8) * 2 - 1), step=1)
    assert net.seen == [None, None]


def test_train_step_draws_depend_on_the_step_index_only():
    """Same step index, same t/noise (so the same loss from the same state); another index differs.
    (The loss, not the update: Adam's first update is lr·sign(gradient) almost everywhere.)"""
    from ddpm.training.step import Batch, train_step

    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    losses = []
    for step in (5, 5, 6):
        torch.manual_seed(0)
        losses.append(train_step(_parts(_LabelNet()), Batch(x0), step=step).stats)
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
