"""The size family for one's own images (ddpm.sizes): pinned parameter counts, depth and resolution rules."""

from __future__ import annotations

import pytest
import torch

from ddpm.cliutil import count_parameters
from ddpm.config import get_preset
from ddpm.errors import ConfigError
from ddpm.nets.unet import UNet
from ddpm.sizes import CH_MULT, RESOLUTIONS, auto_resolution, config_for, model_for

# Parameter counts of the RGB networks (output 3 channels), pinned: a change to the family or to
# the U-Net shows up here. base at 32 and 256 are the paper's CIFAR-10 and 256x256 models.
PINNED = {
    "tiny": {8: 702_499, 16: 1_113_955, 32: 1_525_411, 48: 1_525_411, 64: 3_595_491, 96: 3_704_963,
             128: 3_704_963, 192: 4_849_987, 256: 4_849_987},
    "small": {8: 3_992_323, 16: 6_472_195, 32: 8_952_067, 48: 8_952_067, 64: 20_761_923, 96: 21_424_323,
              128: 21_424_323, 192: 28_447_235, 256: 28_447_235},
    "base": {8: 15_930_883, 16: 25_838_595, 32: 35_746_307, 48: 35_746_307, 64: 82_958_979, 96: 85_602_691,
             128: 85_602_691, 192: 113_673_219, 256: 113_673_219},
}


@pytest.mark.parametrize("size", sorted(PINNED))
def test_parameter_counts_are_pinned(size):
    got = {r: count_parameters(config_for(r, 3, size, "x")) for r in RESOLUTIONS}
    assert got == PINNED[size]


def test_base_is_the_papers_network():
    assert count_parameters(config_for(32, 3, "base", "x")) == count_parameters(get_preset("cifar10"))
    assert count_parameters(config_for(256, 3, "base", "x")) == count_parameters(get_preset("celebahq256"))
    assert model_for(32, 3, "base").ch_mult == get_preset("cifar10").model.ch_mult
    assert model_for(256, 3, "base").ch_mult == get_preset("celebahq256").model.ch_mult


def test_grey_networks_differ_only_in_the_image_convs():
    # conv_in: 3x3xC_in x ch weights; conv_out: 3x3 x ch x C_out weights + C_out biases.
    for size, ch in (("tiny", 32), ("small", 64), ("base", 128)):
        diff = count_parameters(config_for(32, 3, size, "x")) - count_parameters(config_for(32, 1, size, "x"))
        assert diff == 2 * 9 * ch + 2 * 9 * ch + 2


def test_improved_diffusion_multipliers_and_attention():
    assert CH_MULT[32] == (1, 2, 2, 2) and CH_MULT[64] == (1, 2, 3, 4)
    assert CH_MULT[128] == (1, 1, 2, 3, 4) and CH_MULT[256] == (1, 1, 2, 2, 4, 4)
    for r in RESOLUTIONS:
        lowest = r // 2 ** (len(CH_MULT[r]) - 1)
        assert 4 <= lowest <= 8, r  # every network ends at a 4-8 pixel feature map
    assert {r: model_for(r, 3, "tiny").attn_resolutions for r in (8, 16, 32, 48, 64, 96, 256)} == {
        8: (4,), 16: (8,), 32: (16,), 48: (12,), 64: (16,), 96: (12,), 256: (16,)}


@pytest.mark.parametrize("r", [8, 48])
def test_family_networks_run_at_their_resolution(r):
    cfg = config_for(r, 3, "tiny", "x")
    model = UNet.from_config(cfg.model, cfg.out_channels).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, r, r), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 3, r, r)


def test_auto_resolution_never_enlarges_and_caps_at_256():
    assert [auto_resolution(s) for s in (8, 15, 32, 47, 48, 50, 63, 64, 100, 255, 4000)] == \
        [8, 8, 32, 32, 48, 48, 48, 64, 96, 192, 256]
    assert auto_resolution(5) == 8  # nothing fits: the loader then refuses the images in one line


def test_unknown_size_or_resolution_is_a_config_error():
    with pytest.raises(ConfigError, match="huge"):
        model_for(32, 3, "huge")
    with pytest.raises(ConfigError, match="--resolution 40"):
        model_for(40, 3, "tiny")
