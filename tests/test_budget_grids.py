"""Progress grids drawn with a few-step solver (and the raw weights early on), their time in the
plan, and ``--minutes``: the steps that fit a time budget, from an injected step time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.budget import GRIDS, fit_minutes, run_seconds
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm.errors import ConfigError
from ddpm.sizes import config_for

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**train) -> Config:
    base = TrainConfig(total_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=0.9, log_every=0,
                       sample_every=2, sample_n=4, save_every=0, keep_last=10)
    model = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.1)
    return Config(preset="tiny", model=model, diffusion=DiffusionConfig(num_timesteps=40),
                  data=DataConfig(source="digits", random_flip=False), train=replace(base, **train))


def _spy_sample(monkeypatch):
    import ddpm.sampling as sampling

    calls = []
    real = sampling.sample

    def spy(diffusion, model, shape, seeds, **kw):
        calls.append({"sampler": kw.get("sampler"), "steps": kw.get("steps"), "training": model.training,
                      "model": model})
        return real(diffusion, model, shape, seeds, **kw)

    monkeypatch.setattr(sampling, "sample", spy)
    return calls


def test_grids_use_the_few_step_solver_and_show_the_raw_weights_early(tmp_path, monkeypatch):
    from ddpm.training import train

    calls = _spy_sample(monkeypatch)
    log = []
    r = train(tiny_config(), tmp_path, device="cpu", progress=False, log=log.append)
    assert r["step"] == 2
    # defaults: DPM-Solver++(2M) in 20 network calls, for the EMA and (0.9^2 = 81% initial) the raw weights
    assert [(c["sampler"], c["steps"]) for c in calls] == [("dpm++2m", 20), ("dpm++2m", 20)]
    assert not calls[1]["training"]  # the raw network is sampled in eval mode ...
    assert calls[1]["model"].training  # ... and put back in train mode afterwards
    assert any("left EMA, right the raw weights" in m for m in log)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_000000002.png"))
    # two 2x2 grids of 8x8 cells (pad 1: 19 px) side by side with a 4 px band, enlarged x8
    assert grid.shape[:2] == (19 * 8, (19 + 4 + 19) * 8)
    assert (grid[:, 19 * 8:23 * 8] == 255).all()


def test_grids_show_only_the_ema_once_it_has_moved_and_follow_the_options(tmp_path, monkeypatch):
    from ddpm.training import train

    calls = _spy_sample(monkeypatch)
    # decay 0.5: after 4 updates the EMA holds 0.5^4 = 6% of its initial weights (< 10%)
    train(tiny_config(total_steps=4, sample_every=4, ema_decay=0.5, grid_sampler="ddim", grid_steps=0),
          tmp_path, device="cpu", progress=False, log=lambda m: None)
    assert [(c["sampler"], c["steps"]) for c in calls] == [("ddim", None)]  # grid_steps 0: the full chain
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_000000004.png"))
    assert grid.shape[:2] == (19 * 8, 19 * 8)


def _explicit_run_seconds(steps, every, step_s, call_s, k, decay):
    """Steps plus, at each grid, k calls (2k while decay^step > 0.1): written out again."""
    total = steps * step_s
    for s in range(every, steps + 1, every):
        share = 1.0
        for _ in range(s):
            share *= decay
        total += k * call_s * (2 if share > 0.1 else 1)
    return total


@pytest.mark.parametrize("minutes,step_s,call_s", [(15, 0.6, 0.08), (2, 0.05, 0.5), (30, 1.3, 0.02)])
def test_minutes_plan_the_most_steps_that_fit(minutes, step_s, call_s):
    cfg = config_for(32, 1, "tiny", "folder")
    cfg = replace(cfg, train=replace(cfg.train, lr_schedule="cosine"))
    fit = fit_minutes(cfg, minutes, step_s, call_s)
    tc = fit.train
    assert tc.total_steps % GRIDS == 0 and tc.sample_every == tc.save_every == tc.total_steps // GRIDS
    k = cfg.train.grid_steps
    est = _explicit_run_seconds(tc.total_steps, tc.sample_every, step_s, call_s, k, cfg.train.ema_decay)
    assert run_seconds(fit, step_s, call_s) == pytest.approx(est)
    assert est <= 60 * minutes
    every = tc.sample_every + 1  # one more step per grid no longer fits
    assert _explicit_run_seconds(GRIDS * every, every, step_s, call_s, k, cfg.train.ema_decay) > 60 * minutes
    assert tc.warmup_steps == min(cfg.train.warmup_steps, tc.total_steps // 5)
    # the decaying schedule is as long as the planned run
    from ddpm.training.schedules import lr_at

    assert lr_at(tc.total_steps, tc) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(tc.total_steps // 2, tc) > 0


def test_minutes_too_short_is_a_config_error():
    cfg = config_for(32, 1, "tiny", "folder")
    with pytest.raises(ConfigError, match="--minutes 0.01: too short"):
        fit_minutes(cfg, 0.01, 1.0, 1.0)
    with pytest.raises(ConfigError, match="positive"):
        fit_minutes(cfg, 0, 1.0, 1.0)


def test_plan_counts_the_grids():
    from ddpm.plan import StepMeasure, step_lines

    cfg = config_for(32, 1, "tiny", "folder")
    cfg = replace(cfg, train=replace(cfg.train, total_steps=1000, sample_every=250, ema_decay=0.995))  # grids at 250..1000
    m = StepMeasure(seconds=0.05, params=1, state_bytes=20, activation_bytes=0, measured_batch=4, micro_batch=32)
    lines = step_lines(cfg, m, "cpu", grid_call_seconds=0.1)
    # 0.995^250 = 29% and 0.995^500 = 8%: the first grid draws twice; 5 x 20 calls x 0.1 s = 10 s
    assert "all 1,000 steps ~ 50 s, with the progress grids ~ 60 s" in lines[0]
    assert lines[-1].strip().startswith("progress grids: 4 x 64 samples (dpm++2m, 20 network calls")
    assert lines[-1].endswith("~ 10 s")


def test_measure_grid_call_restores_the_rng():
    from ddpm.plan import measure_grid_call

    before = torch.random.get_rng_state()
    s = measure_grid_call(tiny_config(), "cpu")
    assert s > 0 and torch.equal(before, torch.random.get_rng_state())


def test_grid_quality_goes_into_the_metrics_on_digits(tmp_path, monkeypatch):
    import json

    import ddpm.sampling as sampling
    from ddpm.evaluate.digits_quality import digits_quality
    from ddpm.images import to_uint8
    from ddpm.training import train

    drawn = []
    real = sampling.sample

    def spy(*a, **kw):
        x = real(*a, **kw)
        drawn.append(x)
        return x

    monkeypatch.setattr(sampling, "sample", spy)
    cfg = tiny_config(sample_n=32, sample_every=2, log_every=1, total_steps=3, ema_decay=0.01, grid_steps=4)
    train(cfg, tmp_path, device="cpu", progress=False, log=lambda m: None)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert "grid_fd" not in recs[0] and "grid_fd" not in recs[2]
    assert recs[1]["grid_step"] == 2 and recs[1]["grid_n"] == 32
    expected = digits_quality(to_uint8(drawn[0]))  # the EMA's samples (0.01^2: no raw grid)
    assert len(drawn) == 1
    assert recs[1]["grid_fd"] == pytest.approx(expected["fd"], rel=1e-9)
    assert recs[1]["grid_confidence"] == pytest.approx(expected["confidence"], rel=1e-9)


def test_shrink_enlarged_inverts_the_digits_enlargement():
    from ddpm.data import load_images
    from ddpm.evaluate.digits_quality import shrink_enlarged

    small = load_images("digits", "test", 8, 1, n=50)
    for r in (16, 32):
        big = load_images("digits", "test", r, 1, n=50)
        back = shrink_enlarged(big)
        assert back.shape == small.shape and back.dtype == np.uint8
        assert np.abs(back.astype(int) - small.astype(int)).max() <= 1  # the uint8 rounding of the enlargement
        f = r // 8
        box = big.reshape(50, 8, f, 8, f, 1).mean(axis=(2, 4))
        assert np.abs(box - small).max() > 10  # a block mean is no inverse
    assert shrink_enlarged(small) is small


def test_cli_minutes_plans_the_run_and_a_resume_keeps_it(tmp_path, capsys, monkeypatch):
    """``ddpm train --minutes``: the planned total in the printed config and the plan's line (an
    injected step time: 0.5 s per step, 0.01 s per grid call); a resume does not plan again."""
    import json

    import ddpm.plan as plan
    from ddpm.plan import StepMeasure
    from test_cli import run as cli

    m = StepMeasure(seconds=0.5, params=1, state_bytes=20, activation_bytes=0, measured_batch=4, micro_batch=128)
    monkeypatch.setattr(plan, "measure_step", lambda cfg, device, world_size=1, batch=None: m)
    monkeypatch.setattr(plan, "measure_grid_call", lambda cfg, device: 0.01)
    rc, out, err = cli(["train", "--preset", "digits", "--minutes", "2", "--dry-run", "--out", str(tmp_path / "r"),
                        "--set", "train.lr_schedule=cosine"], capsys)
    assert rc in (0, None), err
    cfg = json.loads(out[:out.index("\n}\n") + 3])
    expected = fit_minutes(get_digits(lr_schedule="cosine"), 2, 0.5, 0.01)
    assert cfg["train"]["total_steps"] == expected.train.total_steps == 4 * expected.train.sample_every
    assert 0.5 * expected.train.total_steps <= 120 < 0.5 * (expected.train.total_steps + 2 * GRIDS)
    assert f"time budget: --minutes 2 -> {expected.train.total_steps:,} steps" in out
    assert "lr cosine to 0 at step" in out
    # a run folder with a checkpoint: --resume auto keeps its own total_steps
    from ddpm.training import train

    small = replace(tiny_config(), train=replace(tiny_config().train, total_steps=1, sample_every=0))
    train(small, tmp_path / "r2", device="cpu", progress=False, log=lambda s: None)
    rc, out, err = cli(["train", "--out", str(tmp_path / "r2"), "--resume", "auto", "--minutes", "2", "--dry-run"],
                       capsys)
    assert rc in (0, None), err
    assert json.loads(out[:out.index("\n}\n") + 3])["train"]["total_steps"] == 1
    assert "time budget: --minutes 2 not applied: resuming" in out


def get_digits(**train):
    from ddpm.config import get_preset

    cfg = get_preset("digits")
    return replace(cfg, train=replace(cfg.train, **train))
