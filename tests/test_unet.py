"""The paper's U-Net (paper Appendix B): structure, sizes, init, attention, modes, compile."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm.config import PRESETS as RUN_PRESETS
from ddpm.config import ModelConfig
from ddpm.errors import ConfigError
from ddpm.nets.unet import AttnBlock, Downsample, UNet, Upsample, timestep_embedding


pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Random offsets on every parameter, so near-zero-initialised layers matter in comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _tiny(**kw) -> UNet:
    args = dict(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                dropout=0.0, resolution=8)
    args.update(kw)
    return UNet(**args)


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,out_ch,expected", [
    ("cifar10", None, 35_746_307),       # paper Appendix B: 35.7M
    ("cifar10", 6, 35_749_766),          # learned-variance head (2C outputs)
    ("256", None, 113_673_219),          # CelebA-HQ / LSUN 114M
    ("256-large", None, 255_677_955),    # large LSUN Bedroom 256M (ch 192)
])
def test_parameter_counts_exact(name, out_ch, expected):
    kw = {} if out_ch is None else {"out_channels": out_ch}
    with torch.device("meta"):  # no memory for the 256M model
        model = UNet.from_preset(name, **kw)
    assert _n_params(model) == expected


def test_presets_match_run_configs_and_arguments():
    digits = UNet.from_preset("digits")
    want = RUN_PRESETS["digits"].model
    assert digits.config == UNet.from_config(want, want.in_channels).config
    assert digits.config["resolution"] == 8 and digits.config["in_channels"] == 1 and digits.config["ch"] == 32
    assert digits.config["ch_mult"] == (1, 2) and digits.config["attn_resolutions"] == (4,)
    with torch.device("meta"):
        assert UNet.from_preset("28").config == dict(in_channels=1, out_channels=1, ch=64, ch_mult=(1, 2, 2),
                                                     num_res_blocks=2, attn_resolutions=(14,), dropout=0.0,
                                                     resolution=28, num_classes=0)
        m64 = UNet.from_preset("64")
        assert (m64.config["resolution"], m64.config["ch_mult"], m64.config["attn_resolutions"]) == (64, (1, 2, 2, 2), (16,))
        cifar = UNet.from_preset("cifar10", dropout=0.0, out_channels=6)
        assert cifar.config["dropout"] == 0.0 and cifar.config["out_channels"] == 6
        assert UNet.from_preset("cifar10").config == UNet.from_config(RUN_PRESETS["cifar10"].model, 3).config


def test_preset_errors_name_the_problem():
    with pytest.raises(ConfigError, match="cifar10"):
        UNet.from_preset("cifar1")
    with pytest.raises(ConfigError, match="dropuot"):
        UNet.from_preset("digits", dropuot=0.1)
    with pytest.raises(ConfigError, match="ch=48"):
        UNet.from_preset("digits", ch=48)


def test_attention_placement_and_blocks_per_level():
    with torch.device("meta"):
        m = UNet.from_preset("cifar10")
    # attention only at 16x16 (level 1) down and up, plus the middle
    assert [len(lvl.attn) for lvl in m.down] == [0, 2, 0, 0]
    assert [len(lvl.attn) for lvl in m.up] == [0, 3, 0, 0]
    assert [len(lvl.block) for lvl in m.down] == [2] * 4 and [len(lvl.block) for lvl in m.up] == [3] * 4
    assert [hasattr(lvl, "downsample") for lvl in m.down] == [True, True, True, False]
    assert [hasattr(lvl, "upsample") for lvl in m.up] == [False, True, True, True]
    # 1x1 shortcut exactly where channels change; official widths (concat of skip + current)
    assert m.down[1].block[0].nin_shortcut is not None and m.down[1].block[1].nin_shortcut is None
    assert m.up[0].block[2].conv1.in_channels == 128 + 128  # last block at level 0 eats conv_in's skip
    assert m.up[3].block[0].conv1.in_channels == 256 + 256
    assert m.temb.dense0.in_features == 128 and m.temb.dense1.out_features == 512


# ---------------------------------------------------------------------------------------------- pieces


def test_timestep_embedding_sin_first_divisor_half_minus_one():
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = timestep_embedding(t, 128)
    assert emb.shape == (5, 128) and emb.dtype == torch.float32
    k = np.arange(64)
    freqs = np.exp(-math.log(10000.0) * k / 63.0)  # float64 reference, paper Appendix B
    arg = t.numpy()[:, None].astype(np.float64) * freqs[None]
    ref = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    # fp32 phase t*f at t = 999 carries ~1e-4 rounding; everything else far tighter.
    np.testing.assert_allclose(emb.numpy(), ref, atol=2e-4, rtol=0)
    assert abs(freqs[-1] - 1e-4) < 1e-12  # divisor half-1: the last frequency is exactly 1e-4
    odd = timestep_embedding(t, 7)
    assert odd.shape == (5, 7) and torch.all(odd[:, -1] == 0)


def test_downsample_is_tf_same_padding():
    d = Downsample(2)
    with torch.no_grad():
        d.conv.weight.zero_()
        d.conv.bias.zero_()
        for c in range(2):
            d.conv.weight[c, c, 0, 0] = 1.0  # output(i, j) = padded input(2i, 2j)
    x = torch.randn(1, 2, 8, 8)
    y = d(x)
    assert y.shape == (1, 2, 4, 4)
    # TF SAME on even sizes pads only right/bottom: tap (0,0) reads x[2i, 2j] (symmetric padding would read x[2i-1, 2j-1])
    torch.testing.assert_close(y, x[:, :, ::2, ::2], rtol=0, atol=0)
    x5 = torch.randn(1, 2, 5, 5)
    y5 = d(x5)
    assert y5.shape == (1, 2, 3, 3)  # ceil(5/2)
    # odd sizes: one row/column of padding on each side, so tap (0,0) reads x[2i-1, 2j-1]
    assert torch.all(y5[:, :, 0, :] == 0) and torch.all(y5[:, :, :, 0] == 0)
    torch.testing.assert_close(y5[:, :, 1:, 1:], x5[:, :, 1::2, 1::2], rtol=0, atol=0)


def test_upsample_is_nearest_repeat_and_fits_odd_skips():
    u = Upsample(2)
    with torch.no_grad():
        u.conv.weight.zero_()
        u.conv.bias.zero_()
        for c in range(2):
            u.conv.weight[c, c, 1, 1] = 1.0  # identity conv
    x = torch.randn(1, 2, 3, 3)
    y = u(x)
    torch.testing.assert_close(y, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), rtol=0, atol=0)
    assert u(torch.randn(1, 2, 4, 4), (7, 7)).shape == (1, 2, 7, 7)


def test_attention_uses_sdpa_and_equals_plain_softmax(monkeypatch):
    torch.manual_seed(3)
    att = _perturb(AttnBlock(64), scale=0.1).eval()
    x = torch.randn(2, 64, 6, 5)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        y = att(x)
        # plain formula, paper Appendix B: single head, softmax over all H*W keys of q.k / sqrt(C)
        h = F.group_norm(x, 32, att.norm.weight, att.norm.bias, eps=1e-6).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (h @ m.weight.T + m.bias for m in (att.q, att.k, att.v))
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)
        out = (w @ v) @ att.proj_out.weight.T + att.proj_out.bias
        ref = x + out.transpose(1, 2).reshape(2, 64, 6, 5)
    assert calls == [torch.Size([2, 1, 30, 64])]  # one head, all 30 positions
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_initialisation_xavier_uniform_and_near_zero_layers():
    torch.manual_seed(0)
    m = UNet.from_preset("digits")
    near_zero = {"conv_out.weight"}
    for name, p in m.named_parameters():
        if name.endswith(("conv2.weight", "proj_out.weight")):
            near_zero.add(name)
    # conv_out + 12 resblocks (2x2 down, 2 mid, 2x3 up) + 6 attentions (level 1: 2 down, 3 up, 1 mid)
    assert len(near_zero) == 1 + (2 * 2 + 2 + 2 * 3) + (2 + 3 + 1)
    for name, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w = mod.weight
            rf = w[0, 0].numel() if w.dim() == 4 else 1
            fan_in, fan_out = w.shape[1] * rf, w.shape[0] * rf
            scale = 1e-10 if f"{name}.weight" in near_zero else 1.0
            limit = math.sqrt(6.0 * scale / (fan_in + fan_out))  # TF variance_scaling fan_avg uniform
            assert w.abs().max() <= limit + 1e-12, name
            assert w.abs().max() > 0.8 * limit, name  # uniform on the whole interval, not exactly zero
            if w.numel() > 1000:
                assert abs(w.std().item() - limit / math.sqrt(3)) < 0.05 * limit, name
            assert torch.all(mod.bias == 0), name
        if isinstance(mod, torch.nn.GroupNorm):
            assert mod.num_groups == 32 and mod.eps == 1e-6
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


# ---------------------------------------------------------------------------------------------- forward


def test_output_shapes_learned_variance_head_and_odd_sizes():
    m = UNet.from_preset("digits", out_channels=2).eval()
    with torch.no_grad():
        assert m(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 999])).shape == (3, 2, 8, 8)
        # float and scalar timesteps are accepted
        assert m(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 4.5])).shape == (2, 2, 8, 8)
        assert m(torch.randn(2, 1, 8, 8), torch.tensor(7)).shape == (2, 2, 8, 8)
        # 28 -> 14 -> 7 (the "28" preset layout, reduced width)
        m28 = UNet(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,),
                   dropout=0.0, resolution=28).eval()
        assert [len(lvl.attn) for lvl in m28.down] == [0, 1, 0]
        assert m28(torch.randn(2, 1, 28, 28), torch.tensor([0, 10])).shape == (2, 1, 28, 28)
        # odd size downsampled: 18 -> 9 -> 5 and back up to the skips' sizes
        assert m28(torch.randn(1, 1, 18, 18), torch.tensor([5])).shape == (1, 1, 18, 18)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = _perturb(UNet.from_preset("digits", out_channels=2)).train()
    x = torch.randn(4, 1, 8, 8)
    out = m(x, torch.tensor([0, 10, 500, 999]))
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_eval_deterministic_and_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = _perturb(_tiny(dropout=0.3))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    m.eval()
    with torch.no_grad():
        a, b = m(x, t), m(x, t)
    assert torch.equal(a, b)
    m.train()
    with torch.no_grad():
        c, d = m(x, t), m(x, t)
    assert not torch.allclose(c, d) and not torch.allclose(c, a)
    # with dropout 0, train mode is the same function as eval mode (no other randomness)
    m0 = _tiny(dropout=0.0)
    m0.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m0.train()(x, t), m0.eval()(x, t), rtol=0, atol=0)
        torch.testing.assert_close(m0.eval()(x, t), a, rtol=0, atol=0)


def test_channels_last_same_output():
    torch.manual_seed(0)
    m = _perturb(_tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    with torch.no_grad():
        ref = m(x, t)
        m_cl = m.to(memory_format=torch.channels_last)
        y = m_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    m = _perturb(_tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    with torch.no_grad():
        ref = m(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x, t)
    assert y.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: a few percent of the output scale, far below a wrong network's error
    err = (y.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


@pytest.mark.slow
def test_torch_compile_cpu_matches_eager():
    torch.manual_seed(0)
    m = _perturb(_tiny()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    start = time.perf_counter()
    compiled = torch.compile(m, fullgraph=True)  # no graph breaks anywhere
    with torch.no_grad():
        ref = m(x, t)
        y = compiled(x, t)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4)
    print(f"torch.compile on CPU: {time.perf_counter() - start:.1f} s")


def test_from_config_builds_what_the_config_says():
    mc = ModelConfig(resolution=16, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.2)
    m = UNet.from_config(mc, 6)
    assert m.config == dict(in_channels=3, out_channels=6, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                            attn_resolutions=(8,), dropout=0.2, resolution=16, num_classes=0)
    assert [len(lvl.attn) for lvl in m.down] == [0, 1, 0]
    assert m.conv_out.out_channels == 6
    assert not hasattr(m, "class_emb") and m.num_classes == 0
    cond = UNet.from_config(ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_classes=7), 1)
    assert cond.num_classes == 7 and tuple(cond.class_emb.weight.shape) == (8, 4 * 32)  # 7 classes + null


# ---------------------------------------------------------------------------------------------- classes


def test_class_embedding_is_built_last_and_only_adds_a_table():
    """A conditional network draws every other weight exactly as the unconditional one (same seed),
    so its state dict is the unconditional one plus ``class_emb.weight`` [C + 1, 4ch]."""
    torch.manual_seed(3)
    plain = _tiny()
    torch.manual_seed(3)
    cond = _tiny(num_classes=5)
    a, b = plain.state_dict(), cond.state_dict()
    assert set(b) - set(a) == {"class_emb.weight"} and set(a) <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tuple(b["class_emb.weight"].shape) == (6, 4 * 32)


def test_class_labels_condition_the_output_and_none_is_the_null_label():
    torch.manual_seed(0)
    m = _perturb(_tiny(num_classes=3)).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 999])
    with torch.no_grad():
        outs = [m(x, t, torch.full((4,), k)) for k in range(4)]  # 3 classes and the null label
        null = m(x, t)
        scalar = m(x, t, torch.tensor(1))
    for i in range(4):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-3  # each label moves the output
    torch.testing.assert_close(null, outs[3], rtol=0, atol=0)
    torch.testing.assert_close(scalar, outs[1], rtol=0, atol=0)
    # per-image labels: image k of a mixed batch is image k of the batch with its own label
    y = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        mixed = m(x, t, y)
    for k in range(4):
        torch.testing.assert_close(mixed[k], outs[int(y[k])][k], rtol=0, atol=1e-6)


def test_zero_class_row_gives_the_unconditional_network_exactly():
    """The embedding is added to the time embedding: a zero row adds exactly nothing."""
    torch.manual_seed(4)
    plain = _perturb(_tiny()).eval()
    cond = _tiny(num_classes=2).eval()
    cond.load_state_dict(dict(plain.state_dict(), **{"class_emb.weight": torch.zeros(3, 128)}))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, torch.tensor([0, 1])), plain(x, t), rtol=0, atol=0)


def test_class_embedding_gets_gradients_and_labels_are_refused_without_classes():
    m = _tiny(num_classes=2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    m(x, t, torch.tensor([0, 2])).square().sum().backward()
    g = m.class_emb.weight.grad
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0 and g[1].abs().sum() == 0  # only the used rows
    with pytest.raises(ValueError, match="unconditional"):
        _tiny()(x, t, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="num_classes"):
        _tiny(num_classes=-1)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_forward_without_autograd_is_bitwise_the_autograd_one(layout):
    """Without autograd the ResBlocks apply SiLU and their additions in place: the output must be
    the same bits as the out-of-place forward (which autograd needs), and the input untouched."""
    torch.manual_seed(0)
    m = _perturb(UNet(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(8,), dropout=0.0, resolution=16)).eval().to(memory_format=layout)
    x = torch.randn(3, 3, 16, 16).contiguous(memory_format=layout)
    t = torch.tensor([0, 7, 999])
    x0 = x.clone()
    with torch.enable_grad():
        ref = m(x, t)
    assert ref.requires_grad
    with torch.no_grad():
        nog = m(x, t)
    with torch.inference_mode():
        inf = m(x, t)
    assert torch.equal(nog, ref.detach()) and torch.equal(inf, ref.detach()) and torch.equal(x, x0)
