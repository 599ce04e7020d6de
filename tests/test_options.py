"""Each option vocabulary is declared once (ddpm.options) and every reader agrees with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddpm import options
from ddpm.diffusion import LossType, MeanType, VarType


def test_diffusion_enums_are_the_declared_vocabularies():
    assert tuple(m.value for m in MeanType) == options.MEAN_TYPES
    assert tuple(m.value for m in VarType) == options.VAR_TYPES
    assert tuple(m.value for m in LossType) == options.LOSS_TYPES


@pytest.mark.parametrize("name", options.BETA_SCHEDULES)
def test_every_declared_schedule_is_implemented(name):
    from ddpm.schedule import get_beta_schedule

    assert get_beta_schedule(name, 10).shape == (10,)


def test_config_validation_reads_the_vocabularies():
    from dataclasses import replace

    from ddpm.config import get_preset
    from ddpm.errors import ConfigError

    cfg = get_preset("digits")
    for value in options.PRECISIONS:
        replace(cfg, train=replace(cfg.train, precision=value)).validate()
    for value in options.T_SAMPLERS:
        replace(cfg, train=replace(cfg.train, t_sampler=value)).validate()
    with pytest.raises(ConfigError, match="fp32"):
        replace(cfg, train=replace(cfg.train, precision="fp8")).validate()


def test_cli_choices_come_from_the_vocabularies_and_the_registry():
    from ddpm import samplers
    from ddpm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    sample = sub.choices["sample"]
    by_dest = {a.dest: a for a in sample._actions}
    assert tuple(by_dest["sampler"].choices) == samplers.names()
    assert tuple(by_dest["precision"].choices) == options.SAMPLE_PRECISIONS
    assert tuple(by_dest["conv"].choices) == options.CONV_MODES


def test_options_module_does_not_import_torch():
    code = "import sys, ddpm.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_channels_last_accepts_auto_true_false():
    """train.channels_last: "auto" by default; --set spellings of true/false and "auto" parse;
    anything else is refused naming the key; booleans survive the JSON round trip."""
    from ddpm.config import Config, ConfigError, apply_overrides, get_preset

    cfg = get_preset("digits")
    assert cfg.train.channels_last == "auto"
    for raw, want in (("true", True), ("on", True), ("1", True), ("false", False), ("off", False), ("Auto", "auto")):
        got = apply_overrides(cfg, [f"train.channels_last={raw}"])
        assert got.train.channels_last == want and type(got.train.channels_last) is type(want)
        assert Config.from_json(got.to_json()).train.channels_last == want
    with pytest.raises(ConfigError, match="train.channels_last"):
        apply_overrides(cfg, ["train.channels_last=sometimes"])
