"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2): the target against two
teacher DDIM steps written out independently, the last step, the truncated-SNR weight, the
kept indices, exact resume of a phase, and sampling with the students."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import add_prefix, load_checkpoint, save_checkpoint
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.distill import grid
from ddpm.distill.phase import Phase
from ddpm.distill.settings import DistillSettings, default_settings, phases
from ddpm.distill.target import truncated_snr_weight, two_step_target
from ddpm.errors import ConfigError
from ddpm.nets.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(T: int = 16, mean_type: str = "eps", num_classes: int = 0) -> Config:
    model = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0, num_classes=num_classes)
    train = TrainConfig(total_steps=10, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9, p_uncond=0.2)
    return Config(preset="tiny", model=model, diffusion=DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4,
                                                                          mean_type=mean_type),
                  data=DataConfig(source="digits", random_flip=False), train=train).validate()


def make_teacher(path: Path, cfg: Config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = UNet.from_config(cfg.model, cfg.out_channels)
    with torch.no_grad():  # unlike a fresh network (zero output layers), a trained one depends on its inputs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, add_prefix(net.state_dict(), "ema/"), {"config": cfg.to_dict(), "step": 0, "kind": "weights"})
    return path


# ------------------------------------------------------------------------------------ the target

def _abar(d: GaussianDiffusion, t: int) -> float:
    return 1.0 if t < 0 else float(d.alphas_cumprod[t])


def _teacher_ddim_by_hand(model, d: GaussianDiffusion, z: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """One DDIM step written as Song et al. 2021 Eq. 12 (eta = 0), in double precision: eps from the
    network, x0 = (z - sqrt(1 - abar) eps) / sqrt(abar) clamped, then eps re-derived from the
    clamped x0 and z_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps."""
    with torch.no_grad():
        eps = model(z.float(), torch.full((z.shape[0],), t, dtype=torch.int64)).double()
    ab, ab_s = _abar(d, t), _abar(d, s)
    x0 = ((z - (1 - ab) ** 0.5 * eps) / ab ** 0.5).clamp(-1, 1)
    eps = (z - ab ** 0.5 * x0) / (1 - ab) ** 0.5
    return ab_s ** 0.5 * x0 + (1 - ab_s) ** 0.5 * eps


@pytest.mark.parametrize("t,t1,t2", [(15, 11, 7), (7, 3, -1), (3, 1, 0)])
def test_target_is_two_teacher_ddim_steps_and_one_student_step_lands_on_them(t, t1, t2):
    cfg = tiny_cfg()
    d = GaussianDiffusion.from_config(cfg.diffusion)
    torch.manual_seed(1)
    model = UNet.from_config(cfg.model, cfg.out_channels).eval()
    z = torch.randn(4, 1, 8, 8)
    abar_ext = np.concatenate([[1.0], d.alphas_cumprod])
    B = z.shape[0]
    x_tilde, z2 = two_step_target(model, d, z, torch.full((B,), t), torch.full((B,), t1), torch.full((B,), t2),
                                  abar_ext)
    # independently: two hand-written DDIM steps of the teacher
    want_z2 = _teacher_ddim_by_hand(model, d, _teacher_ddim_by_hand(model, d, z.double(), t, t1), t1, t2)
    assert torch.allclose(z2.double(), want_z2, atol=2e-5, rtol=1e-5)
    # one student DDIM step from t with x0 = x_tilde lands on the teacher's z_t''
    ab, ab2 = _abar(d, t), _abar(d, t2)
    eps_student = (z.double() - ab ** 0.5 * x_tilde.double()) / (1 - ab) ** 0.5
    one_step = ab2 ** 0.5 * x_tilde.double() + (1 - ab2) ** 0.5 * eps_student
    assert torch.allclose(one_step, want_z2, atol=5e-5, rtol=1e-4)
    if t2 == -1:  # the last step: the target is the teacher's x0 after its two steps
        assert torch.allclose(x_tilde.double(), want_z2, atol=2e-5)


def test_truncated_snr_weight_is_max_of_snr_and_one():
    d = GaussianDiffusion.from_config(tiny_cfg().diffusion)
    t = torch.arange(16)
    w = truncated_snr_weight(np.concatenate([[1.0], d.alphas_cumprod]), t)
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    assert np.allclose(w.numpy(), np.where(snr > 1, snr, 1.0), rtol=1e-6)
    assert (snr > 1).any() and (snr < 1).any()  # both branches exercised
    w = truncated_snr_weight(np.concatenate([[1.0], d.alphas_cumprod]), t, floor=0.05)
    assert np.allclose(w.numpy(), [max(a / (1 - a), 0.05) for a in d.alphas_cumprod], rtol=1e-6)
    assert (snr < 0.05).any() and ((snr > 0.05) & (snr < 1)).any()


# ------------------------------------------------------------------------------------ kept indices

def test_kept_indices_halve_to_every_other_keeping_the_top():
    g = grid.grids(200, 64, 4)
    assert [len(k) for k in g] == [64, 32, 16, 8, 4]
    assert g[0][-1] == 199 and all(k[-1] == 199 for k in g)
    for a, b in zip(g, g[1:]):
        assert b == tuple(a[i] for i in range(1, len(a), 2))
        assert set(b) <= set(a)
    assert grid.grids(16, 8, 1)[-1] == (15,)
    # trailing spacing: round(T - j T / n) - 1
    assert g[0] == tuple(sorted(int(round(200 - j * 200 / 64)) - 1 for j in range(64)))


def test_phase_positions_pair_two_teacher_steps_per_student_step():
    P = (1, 3, 5, 7, 9, 11, 13, 15)
    ph = Phase(0, P, grid.halve(P), 1, 1e-3, 0, 0.9)
    t, t1, t2 = ph.positions()
    assert list(t) == [3, 7, 11, 15] and list(t1) == [1, 5, 9, 13] and list(t2) == [-1, 3, 7, 11]
    warm = Phase(0, P, P, 1, 1e-3, 0, 0.9)
    t, t1, t2 = warm.positions()
    assert list(t) == list(P) and list(t1) == list(t2) == [-1, 1, 3, 5, 7, 9, 11, 13]


@pytest.mark.parametrize("steps,start,msg", [(3, 8, "--steps 3"), (4, 32, "--start 32"), (8, 8, "--steps 8"),
                                             (2, 12, "--start 12")])
def test_bad_step_counts_are_one_line_config_errors(steps, start, msg):
    with pytest.raises(ConfigError, match=msg):
        grid.check_steps(steps, start, 16)


def test_default_start_is_16_or_the_largest_power_of_two():
    assert grid.default_start(200) == 16 and grid.default_start(1000) == 16 and grid.default_start(16) == 16
    assert grid.default_start(12) == 8 and grid.default_start(1) == 1
    s = default_settings(tiny_cfg(T=16))
    assert s.start == 16 and s.steps == 4 and s.phase_steps == 3600 and s.v_warmup == 1600
    assert default_settings(tiny_cfg(T=16), phase_steps=900).v_warmup == 400   # 4/9 of a phase
    ph = phases(s, 16)
    assert [p.describe() for p in ph] == ["16 -> 16 (v warm-up)", "16 -> 8", "8 -> 4"]


# ------------------------------------------------------------------------------------ runs and resume

def _settings(**kw) -> DistillSettings:
    base = DistillSettings(start=8, steps=2, phase_steps=4, lr=1e-3, batch_size=8, ema_decay=0.5, save_every=2,
                           log_every=2)
    return replace(base, **kw)


def _distill(teacher, out, settings, log=None):
    from ddpm.distill import distill

    return distill(teacher, out, settings, device="cpu", progress=False,
                   log=(log if log is not None else (lambda m: None)))


def _assert_same_files(a: Path, b: Path, names):
    for name in names:
        ta, ma = load_checkpoint(a / name)
        tb, mb = load_checkpoint(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs"
        assert ma.get("distill") == mb.get("distill") and ma.get("data_sampler") == mb.get("data_sampler")


def test_a_stopped_and_a_crashed_distillation_resume_bit_identically(tmp_path):
    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    st = _settings()
    straight = _distill(teacher, tmp_path / "a", st)
    assert straight["steps"] == 2 and straight["optimizer_steps"] == 8 and not straight["stopped_by"]

    # SIGINT in the middle of phase 1 (raised as phase 1 starts): a graceful stop after one step
    def interrupt(msg):
        if msg.startswith("phase 1:"):
            signal.raise_signal(signal.SIGINT)
    first = _distill(teacher, tmp_path / "b", st, interrupt)
    assert first["stopped_by"] == signal.SIGINT and first["global_step"] == 5
    # a crash at the start of phase 1 after phase 0's last checkpoint (as kill -9 would leave it)
    class Crash(Exception):
        pass

    def crash(msg):
        if msg.startswith("phase 1:"):
            raise Crash()
    with pytest.raises(Crash):
        _distill(teacher, tmp_path / "c", st, crash)
    msgs = []
    for run in ("b", "c"):
        r = _distill(teacher, tmp_path / run, st, msgs.append)
        assert r["steps"] == 2 and not r["stopped_by"]
    import re
    assert any(re.match(r"resumed phase 1 \(4 -> 2\) at step 1 of 4", m) for m in msgs), msgs
    assert any(re.match(r"resumed phase 0 \(8 -> 4\) at step 4 of 4", m) for m in msgs), msgs
    names = ["students/steps_0004.safetensors", "students/steps_0002.safetensors", "checkpoints/ckpt_000000008.safetensors"]
    _assert_same_files(tmp_path / "a", tmp_path / "b", names)
    _assert_same_files(tmp_path / "a", tmp_path / "c", names)
    # the student's meta stores its kept indices: every other one of the teacher's, top kept
    meta = load_checkpoint(tmp_path / "a" / names[1])[1]
    g = grid.grids(16, 8, 2)
    assert meta["distill"]["kept"] == list(g[2]) == [7, 15] and meta["config"]["diffusion"]["mean_type"] == "v"


def test_settings_that_change_the_optimisation_are_refused_and_more_phases_can_be_appended(tmp_path):
    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    _distill(teacher, tmp_path / "a", _settings(steps=4))
    with pytest.raises(Exception, match="other settings.*lr"):
        _distill(teacher, tmp_path / "a", _settings(steps=4, lr=2e-3))
    r = _distill(teacher, tmp_path / "a", _settings(steps=2))
    assert r["steps"] == 2 and r["optimizer_steps"] == 4
    from ddpm.distill import list_students
    assert sorted(list_students(tmp_path / "a")) == [2, 4]


# ------------------------------------------------------------------------------------ sampling

def test_student_sampler_is_the_package_ddim_on_its_kept_steps():
    from ddpm.distill import sample_student
    from ddpm.samplers import get
    from ddpm.samplers.base import Chain as ChainT, Denoiser
    from ddpm.rng import ImageNoise

    cfg = tiny_cfg(mean_type="v")
    d = GaussianDiffusion.from_config(cfg.diffusion)
    model = UNet.from_config(cfg.model, cfg.out_channels).eval()
    kept = (3, 7, 11, 15)
    ours = sample_student(model, d, kept, (1, 8, 8), range(5), batch_size=3)
    for eta in (0.0, 0.6):  # eta > 0: the same noise stream (one draw per step) and Eq. 16's variance
        ours = sample_student(model, d, kept, (1, 8, 8), range(5), batch_size=3, eta=eta)
        chain = ChainT(d, kept, torch.device("cpu"), eta=eta)
        noise = ImageNoise(list(range(5)), (1, 8, 8), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            ref = get("ddim")(chain).run(Denoiser(model, chain, 5), noise.next(), noise)
        assert torch.allclose(ours, ref, atol=1e-5), eta
    one = sample_student(model, d, (15,), (1, 8, 8), range(2))  # a 1-step student: x0 of its one call
    z = ImageNoise([0, 1], (1, 8, 8), torch.device("cpu"), torch.float32).next()
    with torch.no_grad():
        v = model(z, torch.full((2,), 15))
    a, s = float(d.alphas_cumprod[15]) ** 0.5, float(1 - d.alphas_cumprod[15]) ** 0.5
    assert torch.allclose(one, (a * z - s * v).clamp(-1, 1), atol=1e-6)


def _stochastic_walk_by_hand(model, d: GaussianDiffusion, kept, seeds) -> torch.Tensor:
    """Meng et al. 2023's stochastic walk written out per image in double precision: from kept
    position i >= 2, x0 = clamp(alpha z - sigma v), a DDIM step to position i - 2 (eps re-derived
    from x0), then z <- sqrt(abar_{i-1} / abar_{i-2}) z + sqrt(1 - abar_{i-1} / abar_{i-2}) n with the
    image's next noise draw; plain DDIM steps from positions 1 and 0."""
    from ddpm.rng import ImageNoise

    outs = []
    for seed in seeds:
        noise = ImageNoise([seed], (1, 8, 8), torch.device("cpu"), torch.float32)
        z = noise.next().double()
        ab = lambda i: _abar(d, kept[i] if i >= 0 else -1)  # noqa: E731
        for i in range(len(kept) - 1, -1, -1):
            with torch.no_grad():
                v = model(z.float(), torch.full((1,), kept[i], dtype=torch.int64)).double()
            a, s = ab(i) ** 0.5, (1 - ab(i)) ** 0.5
            x0 = (a * z - s * v).clamp(-1, 1)
            eps = (z - a * x0) / s
            to = i - 2 if i >= 2 else i - 1
            z = ab(to) ** 0.5 * x0 + (1 - ab(to)) ** 0.5 * eps
            if i >= 2:
                r = ab(i - 1) / ab(i - 2)
                z = r ** 0.5 * z + (1 - r) ** 0.5 * noise.next().double()
        outs.append(z)
    return torch.cat(outs).float()


def test_stochastic_student_walk_steps_twice_as_far_and_noises_back():
    from ddpm.distill import sample_student

    cfg = tiny_cfg(mean_type="v")
    d = GaussianDiffusion.from_config(cfg.diffusion)
    torch.manual_seed(1)
    model = UNet.from_config(cfg.model, cfg.out_channels).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kept = (3, 7, 11, 15)
    ours = sample_student(model, d, kept, (1, 8, 8), range(4), batch_size=3, stochastic=True)
    assert torch.allclose(ours, _stochastic_walk_by_hand(model, d, kept, range(4)), atol=1e-5)
    # the same images one at a time, and not the deterministic walk
    alone = sample_student(model, d, kept, (1, 8, 8), [2], stochastic=True)
    assert torch.allclose(alone[0], ours[2], atol=1e-5)  # its own noise stream; only the batch's roundoff differs
    assert not torch.allclose(ours, sample_student(model, d, kept, (1, 8, 8), range(4)), atol=1e-3)
    # with two steps there is no step to double: the deterministic walk exactly
    two = (7, 15)
    assert torch.equal(sample_student(model, d, two, (1, 8, 8), range(3), stochastic=True),
                       sample_student(model, d, two, (1, 8, 8), range(3)))
    with pytest.raises(ValueError, match="eta applies to the DDIM walk"):
        sample_student(model, d, kept, (1, 8, 8), range(2), stochastic=True, eta=0.5)


def test_choose_student_picks_the_step_count_and_names_the_ones_there_are(tmp_path):
    from ddpm.distill import choose_student
    from ddpm.errors import CheckpointError

    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    _distill(teacher, tmp_path / "run", _settings(steps=2, phase_steps=1, v_warmup=1))
    path, kept = choose_student(tmp_path / "run", None)
    assert path.name == "steps_0002.safetensors" and kept == (7, 15)
    path, kept = choose_student(tmp_path / "run", 4)
    assert path.name == "steps_0004.safetensors" and kept == (3, 7, 11, 15)
    assert choose_student(tmp_path / "run", 8)[1] == grid.start_grid(16, 8)  # the v warm-up's student
    with pytest.raises(CheckpointError, match="--steps 16: .* has students for 2, 4, 8 steps"):
        choose_student(tmp_path / "run", 16)
    assert choose_student(teacher, None) is None


# ------------------------------------------------------------------------------------ diffusers export

def test_a_student_exports_to_a_diffusers_ddim_scheduler_that_samples_it(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, UNet2DModel

    from ddpm.api import load
    from ddpm.distill import sample_student
    from ddpm.distill.export import student_scheduler
    from ddpm.interop.diffusers import to_diffusers_dir
    from ddpm.rng import ImageNoise

    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    _distill(teacher, tmp_path / "run", _settings(steps=2, phase_steps=2))
    student = tmp_path / "run" / "students" / "steps_0002.safetensors"
    out = to_diffusers_dir(student, tmp_path / "hf")
    sched = DDIMScheduler.from_pretrained(out)
    assert sched.config.prediction_type == "v_prediction"
    unet = UNet2DModel.from_pretrained(out).eval()
    sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [15, 7]
    x = ImageNoise([0, 1, 2], (1, 8, 8), torch.device("cpu"), torch.float32).next()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    model, d, _, _ = load(student, device="cpu")
    ours = sample_student(model, d, (7, 15), (1, 8, 8), [0, 1, 2])
    assert torch.allclose(x, ours, atol=1e-4)
    # a 16-step student of T = 200 is not walkable by diffusers' DDIM (it steps by T // K = 12)
    kept16 = grid.grids(200, 64, 16)[-1]
    assert student_scheduler({"num_train_timesteps": 200}, kept16)[0] is None
    assert student_scheduler({"num_train_timesteps": 200}, grid.grids(200, 64, 8)[-1])[0] is not None


# ------------------------------------------------------------------------------------ command line

def _cli(argv, capsys):
    from ddpm.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("extra,msg", [(["--steps", "3"], "--steps 3: expected a power of two"),
                                       (["--steps", "32", "--start", "16"], "--steps 32: expected fewer steps"),
                                       (["--start", "32"], "--start 32: the teacher has T=16 steps")])
def test_distill_command_errors_are_one_line_exit_2(tmp_path, capsys, extra, msg):
    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    rc, _, err = _cli(["distill", "--ckpt", teacher, "--out", tmp_path / "run", *extra], capsys)
    assert rc == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written
    rc, _, err = _cli(["distill", "--ckpt", tmp_path / "nope", "--out", tmp_path / "run"], capsys)
    assert rc == 2 and "no such checkpoint file or run folder" in err and err.count("\n") == 1


def test_a_continued_run_keeps_its_own_settings_for_options_not_given(tmp_path, capsys, monkeypatch):
    # a run started with settings other than today's defaults (as one started under older defaults)
    # continues with the plain command; an option given that differs is still refused
    import json

    monkeypatch.setenv("DDPM_PLAN_WARMUP", "0")
    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    run = tmp_path / "run"
    rc, out, _ = _cli(["distill", "--ckpt", teacher, "--out", run, "--start", "8", "--steps", "4",
                       "--phase-steps", "1", "--v-warmup", "1", "--batch-size", "4", "--seed", "3",
                       "--no-progress"], capsys)
    assert rc == 0 and "4-step student" in out
    started = json.loads((run / "distill.json").read_text())["settings"]
    rc, out, err = _cli(["distill", "--ckpt", teacher, "--out", run, "--steps", "2", "--no-progress"], capsys)
    assert rc == 0 and "2-step student" in out, err
    after = json.loads((run / "distill.json").read_text())["settings"]
    assert {k: v for k, v in after.items() if k != "steps"} == {k: v for k, v in started.items() if k != "steps"}
    from ddpm.distill import list_students
    assert sorted(list_students(run)) == [2, 4, 8]
    rc, _, err = _cli(["distill", "--ckpt", teacher, "--out", run, "--steps", "1", "--phase-steps", "2"], capsys)
    assert rc == 2 and "other settings" in err and "phase_steps" in err and err.count("\n") == 1
    (run / "distill.json").write_text("{")  # a damaged record: one line, exit 2, the file left as it is
    rc, _, err = _cli(["distill", "--ckpt", teacher, "--out", run, "--steps", "1"], capsys)
    assert rc == 2 and "distill.json: not a readable distillation record" in err and err.count("\n") == 1
    assert (run / "distill.json").read_text() == "{"


def test_sample_command_picks_the_requested_student(tmp_path, capsys, monkeypatch):
    from ddpm.api import load
    from ddpm.distill import sample_student
    from ddpm.images import to_uint8

    monkeypatch.setenv("DDPM_PLAN_WARMUP", "0")
    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    rc, out, _ = _cli(["distill", "--ckpt", teacher, "--out", tmp_path / "run", "--start", "8", "--steps", "2",
                       "--phase-steps", "1", "--batch-size", "4", "--no-progress"], capsys)
    assert rc == 0 and "2-step student" in out
    rc, out, _ = _cli(["sample", "--ckpt", tmp_path / "run", "--steps", "4", "--n", "3", "--out", tmp_path / "s.npz",
                       "--no-progress"], capsys)
    assert rc == 0 and "4-step student" in out and "[3, 7, 11, 15]" in out
    assert "stochastic" in out  # the default walk of a student (Meng et al.)
    student = tmp_path / "run" / "students" / "steps_0004.safetensors"
    model, d, _, _ = load(student, device="cpu")
    want = to_uint8(sample_student(model, d, (3, 7, 11, 15), (1, 8, 8), range(3), stochastic=True))
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], want)
    for extra, kw in ((["--sampler", "ddim"], {}), (["--sampler", "ddim", "--eta", "0.5"], {"eta": 0.5})):
        rc, out, _ = _cli(["sample", "--ckpt", tmp_path / "run", "--steps", "4", "--n", "3", "--out",
                           tmp_path / "d.npz", "--no-progress", "--overwrite", *extra], capsys)
        assert rc == 0 and "DDIM" in out
        want = to_uint8(sample_student(model, d, (3, 7, 11, 15), (1, 8, 8), range(3), **kw))
        assert np.array_equal(np.load(tmp_path / "d.npz")["arr_0"], want)
    rc, _, err = _cli(["sample", "--ckpt", tmp_path / "run", "--eta", "0.5", "--out", tmp_path / "e.npz"], capsys)
    assert rc == 2 and "--eta 0.5: applies to --sampler ddim" in err and not (tmp_path / "e.npz").exists()
    rc, out, _ = _cli(["sample", "--ckpt", tmp_path / "run", "--n", "2", "--out", tmp_path / "t.npz", "--no-progress"],
                      capsys)
    assert rc == 0 and "2-step student" in out  # default: the last (fewest steps) student
    rc, _, err = _cli(["sample", "--ckpt", tmp_path / "run", "--steps", "8", "--out", tmp_path / "u.npz"], capsys)
    assert rc == 2 and "has students for 2, 4 steps" in err


def test_eval_steps_rows_for_the_students_use_the_run_teacher_and_the_same_seeds(tmp_path):
    from ddpm.api import load
    from ddpm.distill import sample_student
    from ddpm.distill.evaluate import student_rows, teacher_path
    from ddpm.evaluate.steps import format_table
    from ddpm.images import to_uint8

    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg())
    _distill(teacher, tmp_path / "run", _settings(steps=2, phase_steps=1))
    assert teacher_path(tmp_path / "run") == tmp_path / "run" / "teacher.safetensors"
    assert teacher_path(teacher) == teacher
    seen = []

    def quality(u8):
        seen.append(u8)
        return float(u8.mean()), "mean"
    rows = student_rows(tmp_path / "run", quality, n=3, seed=5, batch_size=2, max_nfe=2)
    assert [(r["sampler"], r["nfe"], r["steps"]) for r in rows] == [("distilled", 2, 2)]  # 4 > max_nfe
    model, d, _, _ = load(tmp_path / "run" / "students" / "steps_0002.safetensors", device="cpu")
    assert np.array_equal(seen[0], to_uint8(sample_student(model, d, (7, 15), (1, 8, 8), range(5, 8))))
    assert "distilled student (DDIM)" in format_table(rows)
    # with 4 steps: the DDIM walk (at the command's eta) and the stochastic walk, same seeds
    seen.clear()
    rows = student_rows(tmp_path / "run", quality, n=3, seed=5, max_nfe=4, eta=0.3)
    assert [(r["sampler"], r["nfe"], r["eta"]) for r in rows] == [
        ("distilled", 2, 0.3), ("distilled", 4, 0.3), ("distilled-stochastic", 4, 0.0)]
    model4, d4, _, _ = load(tmp_path / "run" / "students" / "steps_0004.safetensors", device="cpu")
    assert np.array_equal(seen[1], to_uint8(sample_student(model4, d4, (3, 7, 11, 15), (1, 8, 8), range(5, 8),
                                                           eta=0.3)))
    assert np.array_equal(seen[2], to_uint8(sample_student(model4, d4, (3, 7, 11, 15), (1, 8, 8), range(5, 8),
                                                           stochastic=True)))
    table = format_table(rows)
    assert "distilled student (DDIM eta 0.3)" in table and "distilled student (stochastic)" in table
    assert student_rows(teacher, quality, n=3) == []


def test_a_class_conditional_teacher_distils_and_its_student_samples_with_guidance(tmp_path):
    from ddpm.api import load
    from ddpm.distill import sample_student

    teacher = make_teacher(tmp_path / "teacher.safetensors", tiny_cfg(num_classes=10))
    r = _distill(teacher, tmp_path / "run", _settings(steps=4, phase_steps=2))
    assert r["steps"] == 4
    model, d, cfg, _ = load(r["student"], device="cpu")
    assert cfg.model.num_classes == 10 and cfg.diffusion.mean_type == "v"
    y = {"y": torch.tensor([3, 7])}
    plain = sample_student(model, d, (3, 7, 11, 15), (1, 8, 8), [0, 1], model_kwargs=y)
    guided = sample_student(model, d, (3, 7, 11, 15), (1, 8, 8), [0, 1], model_kwargs=y, guidance=1.0)
    assert torch.allclose(plain, guided, atol=1e-5)  # W = 1 is the conditional model
    other = sample_student(model, d, (3, 7, 11, 15), (1, 8, 8), [0, 1], model_kwargs=y, guidance=3.0)
    assert not torch.allclose(plain, other)
