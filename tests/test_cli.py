"""The command line: help, presets, one-line user errors with exit status 2, dry runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddpm.cli import main
from ddpm.config import PRESETS, get_preset


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits on --help and on its own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["eval", "nll", "--help"],
                 ["eval", "rd", "--help"], ["eval", "fid", "--help"], ["eval", "quality", "--help"],
                 ["convert", "from-diffusers", "--help"], ["convert", "to-diffusers", "--help"],
                 ["config", "show", "--help"]):
        rc, out, _ = run(argv, capsys)
        assert rc == 0 and "usage: ddpm" in out, argv


def test_help_states_defaults(capsys):
    _, out, _ = run(["sample", "--help"], capsys)
    assert "(default: 64)" in out and "(default: ancestral)" in out and "(default: 0)" in out


def test_config_show_lists_every_preset(capsys):
    rc, out, _ = run(["config", "show"], capsys)
    assert rc == 0
    for name in PRESETS:
        assert name in out


def test_config_show_prints_resolved_json(capsys):
    rc, out, _ = run(["config", "show", "--preset", "cifar10", "--set", "train.lr=1e-4"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["train"]["lr"] == 1e-4 and d["model"]["ch_mult"] == [1, 2, 2, 2]
    assert d["diffusion"]["var_type"] == "fixedlarge"


@pytest.mark.parametrize("argv, needle", [
    (["config", "show", "--preset", "cifar1O"], "did you mean 'cifar10'"),
    (["train", "--preset", "digts", "--dry-run"], "did you mean 'digits'"),
    (["train", "--set", "train.lrr=1", "--dry-run"], "did you mean 'lr'"),
    (["train", "--set", "train.batch_size=many", "--dry-run"], "train.batch_size"),
    (["train", "--set", "train.lr=-1", "--dry-run"], "train.lr"),
    (["train", "--set", "nonsense", "--dry-run"], "key=value"),
    (["sample", "--ckpt", "does/not/exist.safetensors"], "not found"),
    (["sample", "--ckpt", "x", "--n", "0"], "--n"),
    (["sample", "--ckpt", "x", "--batch-size", "-1"], "--batch-size"),
    (["sample", "--ckpt", "x", "--sampler", "euler"], "--sampler"),
    (["sample", "--ckpt", "x", "--eta", "abc"], "--eta"),
    (["sample", "--ckpt", "x", "--out", "x.png"], ".npz"),
    (["train", "--resume", "nope.safetensors", "--dry-run"], "--resume"),
    (["eval", "rd"], "--ckpt"),
])
def test_user_mistakes_are_one_line_exit_2(argv, needle, capsys):
    rc, _, err = run(argv, capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_not_a_checkpoint_is_refused(tmp_path, capsys):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"this is not a checkpoint at all")
    rc, _, err = run(["sample", "--ckpt", str(bogus), "--out", str(tmp_path / "s.npz")], capsys)
    assert rc == 2 and "not a ddpm checkpoint" in err and str(bogus) in err
    assert not (tmp_path / "s.npz").exists()


def test_dry_run_prints_config_and_exact_model_size(capsys, tmp_path):
    rc, out, _ = run(["train", "--preset", "cifar10", "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert rc == 0
    assert "35,746,307 parameters" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_dry_run_learned_variance_doubles_output(capsys):
    rc, out, _ = run(["train", "--preset", "cifar10_mu_kl_learned", "--dry-run"], capsys)
    assert rc == 0 and "output channels 6" in out
    assert get_preset("cifar10_mu_kl_learned").out_channels == 6


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "ddpm.cli", "config", "show", "--preset", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown preset 'nope'" in r.stderr
