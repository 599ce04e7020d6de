"""Winograd F(4x4, 3x3) convolution (ddpm.winograd, issue 6): exact in exact arithmetic, float32
error of the same order as the direct convolution's, routed only where it applies, and the
model left exactly as it was. Speed is measured by benchmarks/run.py, never asserted here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm import winograd as wg
from ddpm.diffusion import GaussianDiffusion
from ddpm.nets.unet import UNet
from ddpm.sampling import SamplingOptionError, sample
from ddpm.schedule import get_beta_schedule


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_args(b, c_in, c_out, h, w, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype) / (3 * c_in ** 0.5)
    bias_t = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, weight, bias_t


def test_1d_transform_is_correlation():
    """y = A^T [(G g) * (B^T d)] is the valid correlation of a 6-tap signal with a 3-tap filter."""
    bt, g, at = wg.matrices()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        d, f = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
        y = at @ ((g @ f) * (bt @ d))
        direct = torch.stack([(d[i:i + 3] * f).sum() for i in range(4)])
        torch.testing.assert_close(y, direct, rtol=0, atol=1e-12)


def test_hand_written_transforms_equal_the_matrices():
    bt, _, at = wg.matrices()
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    out = [torch.empty(5, 7, dtype=torch.float64) for _ in range(6)]
    wg._bt_1d(list(d), out, torch.empty(5, 7, dtype=torch.float64))
    torch.testing.assert_close(torch.stack(out), torch.einsum("ik,kxy->ixy", bt, d), rtol=0, atol=1e-12)
    y = [torch.empty(5, 7, dtype=torch.float64) for _ in range(4)]
    wg._at_1d(list(d), y, [torch.empty(5, 7, dtype=torch.float64) for _ in range(4)])
    torch.testing.assert_close(torch.stack(y), torch.einsum("ik,kxy->ixy", at, d), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 4), (1, 3, 4, 5, 7), (2, 8, 6, 9, 6), (3, 4, 5, 16, 16),
                                   (1, 2, 2, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nhwc", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
def test_equals_conv2d_in_float64(shape, bias, nhwc, grouped, monkeypatch):
    """Any size (including ones that are not multiples of 4, and 1x1), any layout, either pass
    grouping: the same as F.conv2d(padding=1) up to float64 rounding."""
    monkeypatch.setattr(wg, "GROUP_MAX", 1 << 30 if grouped else 0)
    x, weight, b = _conv_args(*shape, bias=bias)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    u = wg.transform_weight(weight, torch.float64)
    y = wg.winograd_conv2d(x, u, b)
    ref = F.conv2d(x, weight, b, padding=1)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) if nhwc else y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-11)


def test_float32_error_is_of_the_direct_convolutions_order():
    """In float32 the transforms add rounding, but it stays within a few times oneDNN's own."""
    x, weight, b = _conv_args(4, 128, 128, 16, 16, dtype=torch.float32, seed=3)
    ref = F.conv2d(x.double(), weight.double(), b.double(), padding=1)
    err_direct = (F.conv2d(x, weight, b, padding=1).double() - ref).abs().max().item()
    err_wino = (wg.winograd_conv2d(x, wg.transform_weight(weight), b).double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err_wino < 8 * err_direct, (err_wino, err_direct)
    assert err_wino < 2e-5 * scale, (err_wino, scale)


def test_shared_workspace_has_no_stale_padding():
    """One workspace serves maps of different sizes whose padded buffers have the same shape
    (8x8 and 5x5 both pad to 10x10): the zero border must be rewritten every call."""
    ws = wg.Workspace()
    for shape in [(2, 6, 6, 8, 8), (2, 6, 6, 5, 5), (2, 6, 6, 8, 8), (1, 6, 6, 7, 5)]:
        x, weight, b = _conv_args(*shape, seed=sum(shape))
        y = wg.winograd_conv2d(x, wg.transform_weight(weight, torch.float64), b, ws)
        torch.testing.assert_close(y, F.conv2d(x, weight, b, padding=1), rtol=0, atol=1e-11)


def test_rejects_mismatched_weight():
    x, weight, _ = _conv_args(1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        wg.winograd_conv2d(x[:, :3], wg.transform_weight(weight, torch.float64), None)
    with pytest.raises(ValueError, match="3, 3"):
        wg.transform_weight(torch.zeros(4, 4, 5, 5))


def _unet(ch: int, seed: int = 0) -> UNet:
    """A small 8x8 U-Net whose near-zero output layers are perturbed (so its output depends on
    the convolutions). ch=128 has Winograd-eligible convolutions, ch=32 none."""
    torch.manual_seed(seed)
    m = UNet(in_channels=1, out_channels=1, ch=ch, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
             dropout=0.0, resolution=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m.eval()


def _inputs(b: int = 8):
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 8, (b,), generator=g)


def test_routes_eligible_convs_and_restores_the_model():
    m = _unet(128)
    x, t = _inputs()
    eligible = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3)
                and c.stride == (1, 1) and min(c.in_channels, c.out_channels) >= wg.MIN_CHANNELS]
    assert len(eligible) >= 4  # the res blocks; not conv_in (1 channel), conv_out, or stride-2 downsampling
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode():
        before = m(x, t)
        with wg.winograd_convs(m) as n:
            routed = m(x, t)
        after = m(x, t)
    assert n == len(eligible)
    assert all("forward" not in c.__dict__ for c in m.modules())
    assert torch.equal(before, after)
    assert not torch.equal(routed, before)  # the Winograd path really ran ...
    torch.testing.assert_close(routed, before, rtol=0, atol=1e-5 * before.abs().max().item())  # ... and agrees
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with wg.winograd_convs(_unet(32)) as n32:
        assert n32 == 0  # 32 channels: the direct convolution is faster
    with wg.winograd_convs(m, enabled=False) as n_off:
        assert n_off == 0


def test_falls_back_to_the_direct_convolution_bit_for_bit():
    """Autograd, autocast, float64 and calls too small to pay all take the module's own forward."""
    m = _unet(128)
    x, t = _inputs()
    with wg.winograd_convs(m):
        # autograd (training): identical outputs and gradients flow
        out = m(x, t)
        out.square().mean().backward()
        assert m.conv_in.weight.grad is not None
    m.zero_grad(set_to_none=True)
    ref = m(x, t)
    assert torch.equal(out, ref)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = m(x, t)
        small_ref = m(x[:1], t[:1])  # 1 image x 4 tiles x 128 channels < MIN_WORK
        m64 = _unet(128).double()
        ref64 = m64(x.double(), t)
        with wg.winograd_convs(m), wg.winograd_convs(m64):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(m(x, t), ref_bf16)
            assert torch.equal(m(x[:1], t[:1]), small_ref)
            assert torch.equal(m64(x.double(), t), ref64)


def test_follows_weight_updates_inside_the_block():
    m = _unet(128)
    x, t = _inputs()
    with torch.inference_mode(), wg.winograd_convs(m):
        first = m(x, t)
        with torch.no_grad():
            for c in m.modules():
                if wg.is_eligible(c):
                    c.weight.mul_(1.5)
        second = m(x, t)
    with torch.inference_mode():
        direct = m(x, t)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, direct, rtol=0, atol=1e-5 * direct.abs().max().item())


def test_sampling_uses_it_by_default_on_cpu():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 8, 1e-4 * 125, 0.02 * 40))
    m = _unet(128)
    seeds = list(range(8))
    kw = dict(batch_size=8, clip_denoised=True)
    auto = sample(diffusion, m, (1, 8, 8), seeds, **kw)
    on = sample(diffusion, m, (1, 8, 8), seeds, winograd=True, **kw)
    off = sample(diffusion, m, (1, 8, 8), seeds, winograd=False, **kw)
    assert torch.equal(auto, on)
    assert not torch.equal(on, off)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-4)
    with pytest.raises(SamplingOptionError, match="compile"):
        sample(diffusion, m, (1, 8, 8), seeds, winograd=True, compile=True, **kw)


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("shape", [(2, 5, 3, 8, 8), (1, 4, 6, 7, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_autograd_function_equals_conv2d_gradients_in_float64(shape, bias):
    """Forward, input gradient and weight gradient by Winograd (bias gradient by a sum): all
    equal to F.conv2d's up to float64 rounding."""
    x, weight, b = _conv_args(*shape, bias=bias)
    leaves = [x.requires_grad_(), weight.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    gy = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(9))
    ref = torch.autograd.grad(F.conv2d(x, weight, b, padding=1), leaves, gy)
    y = wg._WinogradFn.apply(x, weight, b, wg.transform_weight(weight, torch.float64), wg.Workspace())
    got = torch.autograd.grad(y, leaves, gy)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


@pytest.mark.parametrize("shape", [(2, 5, 3, 8, 8), (1, 4, 6, 7, 5), (3, 4, 5, 16, 16), (1, 2, 2, 1, 1)])
@pytest.mark.parametrize("grouped", [True, False])
def test_weight_gradient_equals_conv2d_weight_in_float64(shape, grouped, monkeypatch):
    monkeypatch.setattr(wg, "GROUP_MAX", 1 << 30 if grouped else 0)
    x, weight, _ = _conv_args(*shape, bias=False)
    gy = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(11))
    ref = torch.nn.grad.conv2d_weight(x, weight.shape, gy, padding=1)
    got = wg.winograd_weight_grad(x, gy)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-11 * ref.abs().max().item())


def test_weight_gradient_float32_error_is_of_the_direct_ones_order():
    x, _, _ = _conv_args(8, 128, 128, 16, 16, dtype=torch.float32, seed=4)
    gy = torch.randn(8, 128, 16, 16, generator=torch.Generator().manual_seed(12))
    ref = torch.nn.grad.conv2d_weight(x.double(), (128, 128, 3, 3), gy.double(), padding=1)
    err_direct = (torch.nn.grad.conv2d_weight(x, (128, 128, 3, 3), gy, padding=1).double() - ref).abs().max().item()
    err_wino = (wg.winograd_weight_grad(x, gy).double() - ref).abs().max().item()
    assert err_wino < 8 * err_direct, (err_wino, err_direct)  # measured 2.2-4.5x over 6 seeds
    assert err_wino < 2e-5 * ref.abs().max().item()  # measured 6-9e-6


def test_transposed_transform_is_the_input_gradient_kernel():
    _, weight, _ = _conv_args(1, 3, 5, 4, 4)
    torch.testing.assert_close(wg.transform_weight(weight, torch.float64, transpose=True),
                               wg.transform_weight(weight.flip(2, 3).transpose(0, 1), torch.float64),
                               rtol=0, atol=1e-14)


def test_autograd_routing_only_when_asked_and_nesting_restores():
    m = _unet(128)
    x, t = _inputs()
    ref = m(x, t)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    with wg.winograd_convs(m, autograd=True):
        with torch.inference_mode(), wg.winograd_convs(m):  # a sampler inside a training run
            m(x, t)
        out = m(x, t)  # the outer (autograd) routing is back
        out.square().mean().backward()
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    for (name, p), r in zip(m.named_parameters(), ref_grads):
        if name.endswith("k.bias"):  # softmax is shift-invariant: its true gradient is 0 (float noise)
            continue
        torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-4 * r.abs().max().item() + 1e-12, msg=name)
    assert all("forward" not in c.__dict__ for c in m.modules())


def _wide_config(total_steps: int, winograd: bool = True):
    from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

    model = ModelConfig(resolution=8, in_channels=1, ch=128, ch_mult=(1, 1), num_res_blocks=1,
                        attn_resolutions=(), dropout=0.0)
    tc = TrainConfig(total_steps=total_steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9, log_every=0,
                     sample_every=0, save_every=2, winograd=winograd)
    return Config(preset="tiny", model=model, diffusion=DiffusionConfig(num_timesteps=20),
                  data=DataConfig(source="digits", random_flip=False), train=tc)


def test_resume_is_exact_with_winograd(tmp_path):
    """4 steps straight == 2 steps + --resume auto + 2 steps, bit for bit, with the wide convs
    routed (Winograd keeps no state between steps but its scratch memory)."""
    from ddpm.api import load_weights
    from ddpm.train import train

    quiet = dict(device="cpu", progress=False, log=lambda _: None)
    train(_wide_config(4), tmp_path / "straight", **quiet)
    train(_wide_config(2), tmp_path / "resumed", **quiet)
    train(_wide_config(4), tmp_path / "resumed", resume="auto", **quiet)
    for weights in ("model", "ema"):
        a = load_weights(tmp_path / "straight", weights=weights)[1]
        b = load_weights(tmp_path / "resumed", weights=weights)[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


def test_trainer_option(tmp_path):
    """train.winograd (the default) routes the wide convs during training; the result agrees with
    the direct convolution's up to rounding."""
    from ddpm.api import load_weights
    from ddpm.config import TrainConfig
    from ddpm.train import train

    def run(winograd: bool, out):
        train(_wide_config(3, winograd), out, device="cpu", progress=False, log=lambda _: None)
        return load_weights(out, weights="model")[1]

    direct, wino = run(False, tmp_path / "d"), run(True, tmp_path / "w")
    assert direct.keys() == wino.keys()
    assert any(not torch.equal(direct[k], wino[k]) for k in direct)
    # Adam divides by sqrt(v): elements whose gradient is ~0 can move by up to lr either way, so
    # compare globally. A wrong gradient would move every element by ~lr (relative ~1e-2).
    diff = torch.cat([(wino[k] - direct[k]).flatten() for k in direct]).norm()
    size = torch.cat([direct[k].flatten() for k in direct]).norm()
    assert diff < 1e-4 * size
    assert TrainConfig().winograd


def test_cli_conv_option(tmp_path, capsys):
    """`ddpm sample --conv winograd --compile` contradict each other: one line, exit 2, before
    anything is loaded or written."""
    from ddpm.cli import main

    out = tmp_path / "s.npz"
    code = main(["sample", "--ckpt", str(tmp_path / "missing"), "--conv", "winograd", "--compile",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--conv winograd cannot be combined with --compile" in err and not out.exists()
    assert err.count("\n") == 1
