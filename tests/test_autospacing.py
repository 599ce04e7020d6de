"""``spacing="auto"``: the measured table is well formed and sampling, ``eval steps`` and the
respacing all resolve it the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm import samplers
from ddpm.autospacing import AUTO_SPACING, FALLBACK, resolve_spacing
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import SamplingOptionError
from ddpm.evaluate.steps import run_steps
from ddpm.options import TIMESTEP_SPACINGS
from ddpm.respacing import space_timesteps
from ddpm.sampling import sample
from ddpm.schedule import get_beta_schedule

CONCRETE = tuple(s for s in TIMESTEP_SPACINGS if s != "auto")


def test_table_is_well_formed():
    assert "auto" in TIMESTEP_SPACINGS and FALLBACK in CONCRETE
    assert AUTO_SPACING, "the measured table is empty"
    for name, rows in AUTO_SPACING.items():
        assert name in samplers.names(), name
        budgets = [n for n, _ in rows]
        assert budgets == sorted(set(budgets)) and budgets[0] >= 2, (name, budgets)
        assert all(s in CONCRETE for _, s in rows), (name, rows)


def test_resolve_reads_the_table_row_by_row():
    for name, rows in AUTO_SPACING.items():
        lo = 2
        for upto, spacing in rows:
            for n in range(lo, upto + 1):
                assert resolve_spacing("auto", name, n) == spacing, (name, n)
            lo = upto + 1
        # beyond the measured budgets: the previous default
        assert resolve_spacing("auto", name, rows[-1][0] + 1) == FALLBACK
    assert resolve_spacing("auto", "no-such-sampler", 5) == FALLBACK
    assert resolve_spacing("auto", "unipc", None) == FALLBACK  # full chain: every step anyway
    assert resolve_spacing("auto", None, 5) == FALLBACK
    for s in CONCRETE:  # an explicit spacing is never replaced
        assert resolve_spacing(s, "unipc", 5) == s
    with pytest.raises(SamplingOptionError):
        resolve_spacing("auto", "unipc", 5.5)


def test_the_measured_few_step_choice_is_not_trailing():
    """What the issue measured (trailing is clearly worse for UniPC at 5 calls): the table says so."""
    assert resolve_spacing("auto", "unipc", 5) != "trailing"


def _toy(x, t):
    return 0.6 * torch.tanh(x) + 0.05 * torch.cos(t.view(-1, 1, 1, 1).float() / 9.0)


D = GaussianDiffusion(get_beta_schedule("linear", 200, 5e-4, 0.1))


@pytest.mark.parametrize("name", samplers.names())
def test_sample_auto_is_the_resolved_spacing(name, caplog):
    nfe = 5
    used = resolve_spacing("auto", name, nfe)
    with caplog.at_level("INFO", logger="ddpm.sampling"):
        got = sample(D, _toy, (1, 3, 3), [1, 2], sampler=name, steps=nfe)  # the default is auto
    assert torch.equal(got, sample(D, _toy, (1, 3, 3), [1, 2], sampler=name, steps=nfe, spacing=used))
    if used != "auto":
        assert f"spacing auto -> {used}" in caplog.text


def test_space_timesteps_auto_without_a_sampler_is_the_fallback():
    for k in (2, 5, 17):
        assert space_timesteps(200, k, "auto", D.alphas_cumprod) == space_timesteps(200, k, FALLBACK)


def test_eval_steps_records_the_resolved_spacing():
    rows = run_steps(D, _toy, (1, 3, 3), lambda u8: (float(np.mean(u8)), "mean"), samplers=["unipc", "ddim"],
                     nfes=[4, 5], n=2, spacings=("auto", "trailing"), progress=False)
    for r in rows:
        want = resolve_spacing(r["spacing"], r["sampler"], r["nfe"])
        assert r["spacing_used"] == want
        same = [q for q in rows if q["sampler"] == r["sampler"] and q["nfe"] == r["nfe"]
                and q["spacing"] == want and q is not r]
        if r["spacing"] == "auto" and same:  # auto and the explicit spacing it chose: the same samples
            assert same[0]["quality"] == r["quality"]


def test_ddpm_sample_says_what_auto_chose(tmp_path, capsys):
    import ddpm
    from ddpm.checkpoint import add_prefix, save_checkpoint
    from ddpm.cli import main
    from ddpm.config import Config, DiffusionConfig, ModelConfig
    from ddpm.nets.unet import UNet

    mc = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0)
    cfg = Config(preset="test", model=mc, diffusion=DiffusionConfig(num_timesteps=20)).validate()
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, add_prefix(UNet.from_config(mc, cfg.out_channels).state_dict(), "ema/"),
                    {"config": cfg.to_dict(), "kind": "weights", "step": 0, "version": ddpm.__version__})
    out = tmp_path / "s.npz"
    argv = ["sample", "--ckpt", str(ckpt), "--sampler", "unipc", "--steps", "5", "--n", "2", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    want = resolve_spacing("auto", "unipc", 5)
    assert f"spacing: auto -> {want}" in capsys.readouterr().out
    auto = np.load(out)["arr_0"]
    assert main(argv + ["--spacing", want]) == 0
    assert "spacing: auto" not in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out)["arr_0"], auto)
