"""Training recipes since the paper: loss weighting (Min-SNR, P2), LR schedules, the EMA warm-up,
few-step progress grids, and exact resume with all of them on."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig, apply_overrides, get_preset
from ddpm.errors import ConfigError
from ddpm.training.schedules import ema_decay_at, ema_init_share, lr_at
from ddpm.training.weighting import loss_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), dropout=0.1)


def tiny_config(**train) -> Config:
    base = TrainConfig(total_steps=6, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=2,
                       sample_every=0, save_every=0, keep_last=10)
    return Config(preset="tiny", model=TINY_MODEL, diffusion=DiffusionConfig(num_timesteps=20),
                  data=DataConfig(source="digits", random_flip=True), train=replace(base, **train))


def run(cfg: Config, out: Path, resume=None, log=None):
    from ddpm.training import train

    return train(cfg, out, resume=resume, device="cpu", progress=False,
                 log=(log.append if log is not None else (lambda m: None)))


def _abar(T=1000):
    betas = np.linspace(1e-4, 0.02, T)
    return np.cumprod(1 - betas)


# ---------------------------------------------------------------------------------------------- weighting

@pytest.mark.parametrize("G", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_hang_et_al(G):
    abar = _abar()
    # SNR written the other way round: (1 / (1 - abar)) - 1
    s = 1.0 / (1.0 - abar) - 1.0
    eps_expected = np.where(s > G, G / s, 1.0)  # min(SNR, G) / SNR
    v_expected = np.array([min(x, G) / (x + 1) for x in s])
    x0_expected = np.array([x if x < G else G for x in s])
    # (the two SNR formulas round differently by ~1e-12 where abar is near 0)
    np.testing.assert_allclose(loss_weights(f"min_snr:{G}", abar, "eps"), eps_expected, rtol=1e-9)
    np.testing.assert_allclose(loss_weights(f"min_snr:{G}", abar, "v"), v_expected, rtol=1e-9)
    np.testing.assert_allclose(loss_weights(f"min_snr:{G}", abar, "xstart"), x0_expected, rtol=1e-9)
    # the noisy end is not reweighted for eps, the clean end is capped
    assert loss_weights(f"min_snr:{G}", abar, "eps")[-1] == 1.0
    assert loss_weights(f"min_snr:{G}", abar, "eps")[0] < 1e-2


def test_weights_agree_across_parameterisations():
    """The same prediction error, measured as an eps, x0 or v error and weighted for that space,
    gives the same weighted loss: the weighting is one objective in three parameterisations."""
    g = torch.Generator().manual_seed(0)
    abar = _abar(50)
    for spec in ("min_snr:5", "p2:1,1", "p2:2,0.5"):  # ("none" is each space's own unweighted MSE)
        w = {m: loss_weights(spec, abar, m) for m in ("eps", "xstart", "v")}
        for t in (0, 10, 49):
            a = abar[t]
            x0 = torch.randn(64, generator=g, dtype=torch.float64)
            eps = torch.randn(64, generator=g, dtype=torch.float64)
            xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
            eps_hat = eps + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
            x0_hat = (xt - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
            v, v_hat = (math.sqrt(a) * e - math.sqrt(1 - a) * x for e, x in ((eps, x0), (eps_hat, x0_hat)))
            l_eps = w["eps"][t] * ((eps - eps_hat) ** 2).mean()
            l_x0 = w["xstart"][t] * ((x0 - x0_hat) ** 2).mean()
            l_v = w["v"][t] * ((v - v_hat) ** 2).mean()
            assert float(l_x0) == pytest.approx(float(l_eps), rel=1e-9)
            assert float(l_v) == pytest.approx(float(l_eps), rel=1e-9)


def test_p2_weights_match_choi_et_al():
    abar = _abar()
    snr = abar / (1 - abar)
    for k, gam in ((1.0, 1.0), (1.0, 0.5), (3.0, 2.0)):
        np.testing.assert_allclose(loss_weights(f"p2:{k},{gam}", abar, "eps"), (k + snr) ** -gam, rtol=1e-12)
    np.testing.assert_array_equal(loss_weights("none", abar, "eps"), np.ones(1000))


@pytest.mark.parametrize("bad", ["min_snr:0", "min_snr:-1", "min_snr:a", "p2:1", "p2:0,1", "snr", "none:3"])
def test_bad_loss_weighting_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="train.loss_weighting"):
        apply_overrides(get_preset("digits"), [f"train.loss_weighting={bad}"])


def test_loss_weighting_needs_mse_and_a_weightable_mean_type():
    with pytest.raises(ConfigError, match="loss_type=mse"):
        apply_overrides(get_preset("cifar10_eps_kl_fixed"), ["train.loss_weighting=min_snr:5"])
    with pytest.raises(ConfigError, match="mean_type"):
        apply_overrides(get_preset("cifar10_mu_mse"), ["train.loss_weighting=min_snr:5"])
    cfg = apply_overrides(get_preset("digits"), ["train.loss_weighting=min_snr", "train.lr_schedule=cosine",
                                                 "train.ema_warmup=ramp"])
    assert cfg.train.loss_weighting == "min_snr"  # G defaults to Hang et al.'s 5
    for key, bad in (("lr_schedule", "cosin"), ("ema_warmup", "yes"), ("grid_sampler", "dpm++9m"),
                     ("grid_steps", "-1")):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            apply_overrides(get_preset("digits"), [f"train.{key}={bad}"])


def test_train_step_multiplies_each_example_by_its_weight():
    from ddpm.training.step import draw_t_and_noise
    from ddpm.training.tsampler import make_t_sampler

    cfg = tiny_config(loss_weighting="min_snr:2", batch_size=64)
    base = tiny_config(batch_size=64)
    t, w, noise = draw_t_and_noise(cfg, make_t_sampler("uniform", 20), 3, torch.device("cpu"))
    t0, w0, noise0 = draw_t_and_noise(base, make_t_sampler("uniform", 20), 3, torch.device("cpu"))
    assert torch.equal(t, t0) and torch.equal(noise, noise0) and torch.all(w0 == 1)
    betas = np.linspace(1e-4, 0.02, 20)  # DiffusionConfig(num_timesteps=20): the linear schedule as given
    abar = np.cumprod(1 - betas)
    expected = [min(abar[k] / (1 - abar[k]), 2.0) / (abar[k] / (1 - abar[k])) for k in t.tolist()]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- schedules

def test_lr_schedules_at_warmup_end_middle_and_end():
    tc = TrainConfig(total_steps=1100, lr=2e-4, warmup_steps=100)
    for sched in ("constant", "cosine", "linear"):
        c = replace(tc, lr_schedule=sched)
        assert lr_at(0, c) == 0.0
        assert lr_at(50, c) == pytest.approx(1e-4, rel=1e-12)  # warm-up: the paper's linear ramp
        assert lr_at(100, c) == pytest.approx(2e-4, rel=1e-12)  # warm-up end
    assert lr_at(600, replace(tc, lr_schedule="constant")) == pytest.approx(2e-4)
    assert lr_at(1100, replace(tc, lr_schedule="constant")) == pytest.approx(2e-4)
    # middle of the decay (step 600 of 100..1100): both at half
    assert lr_at(600, replace(tc, lr_schedule="cosine")) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(600, replace(tc, lr_schedule="linear")) == pytest.approx(1e-4, rel=1e-12)
    # a quarter in: cos(pi/4) = sqrt(2)/2, so (2 + sqrt 2)/4 of lr; linear 3/4 of lr
    assert lr_at(350, replace(tc, lr_schedule="cosine")) == pytest.approx(2e-4 * (2 + 2 ** 0.5) / 4, rel=1e-12)
    assert lr_at(350, replace(tc, lr_schedule="linear")) == pytest.approx(1.5e-4, rel=1e-12)
    for sched in ("cosine", "linear"):
        assert lr_at(1100, replace(tc, lr_schedule=sched)) == pytest.approx(0.0, abs=1e-20)
        last = lr_at(1099, replace(tc, lr_schedule=sched))
        assert 0 < last < 2e-4 * 0.01
    no_warm = replace(tc, warmup_steps=0, lr_schedule="linear", total_steps=10)
    assert [lr_at(k, no_warm) for k in (0, 5)] == pytest.approx([2e-4, 1e-4])


def test_ema_ramp_decays_and_initial_share():
    tc = TrainConfig(ema_decay=0.995, ema_warmup="ramp")
    assert ema_decay_at(0, tc) == pytest.approx(0.1)
    assert ema_decay_at(1, tc) == pytest.approx(2 / 11)
    assert ema_decay_at(10, tc) == pytest.approx(11 / 20)
    crossing = next(n for n in range(10_000) if (1 + n) / (10 + n) >= 0.995)
    assert crossing == 1790
    assert ema_decay_at(crossing - 1, tc) < 0.995 and ema_decay_at(crossing, tc) == 0.995
    assert ema_decay_at(5, replace(tc, ema_warmup="none")) == 0.995
    # initial-weight share: an explicit product of the decays
    prod = 1.0
    for n in range(300):
        prod *= min(0.995, (1 + n) / (10 + n))
    assert ema_init_share(300, tc) == pytest.approx(prod, rel=1e-9)
    assert ema_init_share(300, replace(tc, ema_warmup="none")) == pytest.approx(0.995 ** 300, rel=1e-9)


def test_trainer_uses_the_schedules(tmp_path):
    """The lr in metrics.jsonl and the EMA after the run follow lr_at / ema_decay_at."""
    import json

    from ddpm.checkpoint import load_checkpoint, split_prefix

    cfg = tiny_config(total_steps=4, log_every=1, lr_schedule="linear", ema_warmup="ramp", ema_decay=0.99,
                      save_every=1, warmup_steps=1)
    r = run(cfg, tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([lr_at(k, cfg.train) for k in range(4)])
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-3 / 3)
    # the EMA after step 4 from the checkpoints' weights: ema_k = d_k ema_{k-1} + (1 - d_k) w_k
    ck = sorted((tmp_path / "checkpoints").glob("ckpt_*.safetensors"))
    w = [split_prefix(load_checkpoint(p)[0], "model/") for p in ck]
    e = [split_prefix(load_checkpoint(p)[0], "ema/") for p in ck]
    key = next(k for k in w[0] if k.endswith("weight"))
    expect = e[2][key].double()
    d = ema_decay_at(3, cfg.train)
    expect = d * expect + (1 - d) * w[3][key].double()
    torch.testing.assert_close(e[3][key].double(), expect, rtol=1e-5, atol=1e-7)
    assert r["step"] == 4


def test_resume_is_exact_with_the_recipes_on(tmp_path):
    """A crash after the step-3 checkpoint and a resume give the straight run's bits, with a
    decaying LR, Min-SNR weights, the EMA ramp and importance-free uniform t."""
    from test_resume import assert_identical_state

    cfg = tiny_config(loss_weighting="min_snr:5", lr_schedule="cosine", ema_warmup="ramp", save_every=3)
    straight = run(cfg, tmp_path / "straight")
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "straight" / "checkpoints" / "ckpt_000000003.safetensors", crashed / "checkpoints")
    resumed = run(cfg, crashed, resume="auto")
    assert resumed["step"] == 6
    assert_identical_state(straight["checkpoint"], resumed["checkpoint"])


def test_resume_refuses_a_changed_recipe(tmp_path):
    from ddpm.errors import CheckpointError

    run(tiny_config(total_steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="train.loss_weighting"):
        run(tiny_config(total_steps=4, loss_weighting="min_snr:5"), tmp_path, resume="auto")
    # what the grids are drawn with may change
    r = run(tiny_config(total_steps=3, grid_sampler="ddim", grid_steps=5), tmp_path, resume="auto")
    assert r["step"] == 3


def test_paper_presets_keep_the_paper_recipe():
    from ddpm.config import PRESETS

    for name, cfg in PRESETS.items():
        if name.startswith(("cifar10", "celebahq", "lsun")):
            tc = cfg.train
            assert (tc.loss_weighting, tc.lr_schedule, tc.ema_warmup) == ("none", "constant", "none"), name
