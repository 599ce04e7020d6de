"""Winograd F(4x4, 3x3) convolution (ddpm.winograd, issue 6): exact in exact arithmetic, float32
error within bounds derived from the arithmetic (unit roundoff, reduction length and the transform
matrices' norms; the same on every CPU), routed only where it applies, and the model left exactly
as it was. Speed is measured by benchmarks/run.py, never asserted here; these tests run with the
static routing (DDPM_AUTOTUNE=0, tests/conftest.py), the autotuned one is tests/test_autotune.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm import winograd as wg
from ddpm.diffusion import GaussianDiffusion
from ddpm.nets.unet import UNet
from ddpm.sampling import SamplingOptionError, sample
from ddpm.speed import Speed
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


# float32 unit roundoff: every IEEE float32 operation (any CPU, any kernel, FMA or not) returns
# the exact result times (1 + d), |d| <= U.
U = 2.0 ** -24


def _row_norms_sq(m: torch.Tensor) -> torch.Tensor:
    return m.square().sum(1)


def _kappa_forward() -> torch.Tensor:
    """Per output position p of a 4x4 tile, s_p = sum_i A^T[p, i]^2 |B^T row i|^2 |G row i|^2.

    Why: a Winograd output is y_pq = sum_ij A^T_pi A^T_qj M_ij with M_ij = sum over C_in channels
    of U_ij V_ij; for data of unit variance rms(V_ij) = |B^T_i| |B^T_j|, rms(U_ij) ~ |G_i| |G_j|, so
    a relative rounding error e in M (a sum of C_in terms: rms(e) <= U sqrt(C_in), a random walk of
    roundings each at most U times the partial sum) reaches y_pq with rms
    U sqrt(C_in) sqrt(s_p s_q) / 3 relative to rms(y) = 3 sqrt(C_in) sigma_x sigma_w. The direct
    convolution has the same with sqrt(s_p s_q) / 3 replaced by 1; for F(4x4, 3x3) these norms give
    mean(s) / 3 = 10.8 and max(s) / 3 = 31.4: "a few to ~30 times the direct rounding"."""
    bt, g, at = wg.matrices()
    return at.square() @ (_row_norms_sq(bt) * _row_norms_sq(g))


KAPPA = float(_kappa_forward().mean() / 3)  # rms amplification of the rounding, ~10.8


def _wino_rel_rms(c_in: int) -> float:
    """Bound on rms(error) / rms(output) of one float32 Winograd convolution with C_in inputs."""
    return U * c_in ** 0.5 * KAPPA


# The 8x8 U-Net's output through Winograd-routed 128-channel convs against the direct path:
# 4 times one conv's rms bound, relative to the output's largest value (2.9e-5).
NET_REL_TOL = 4 * _wino_rel_rms(128)


def _abs_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The Winograd forward pass on |x|, |weight|, |bias| with |B^T|, |G|, |A^T| in float64: the sum of
    the absolute values of every term of every output, i.e. the Y_abs of the worst-case bound
    |y_float32 - y| <= gamma_k Y_abs (Higham, Accuracy and Stability, section 3.1), which holds for
    any order of summation and any FMA use, k being the longest chain of roundings."""
    bt, g, at = (m.abs() for m in wg.matrices())
    bsz, _, h, w = x.shape
    nh, nw = -(-h // wg.M), -(-w // wg.M)
    xp = F.pad(x.double().abs(), (1, nw * wg.M + 1 - w, 1, nh * wg.M + 1 - h))
    tiles = xp.unfold(2, wg.ALPHA, wg.M).unfold(3, wg.ALPHA, wg.M)  # [B, C_in, nh, nw, 6, 6]
    v = torch.einsum("ik,bcxykl,jl->bcxyij", bt, tiles, bt)
    u = torch.einsum("ik,ockl,jl->ocij", g, weight.double().abs(), g)
    m = torch.einsum("bcxyij,ocij->boxyij", v, u)
    y = torch.einsum("pi,boxyij,qj->boxpyq", at, m, at).reshape(bsz, -1, nh * wg.M, nw * wg.M)[:, :, :h, :w]
    return y + bias.double().abs().view(1, -1, 1, 1)


def _gamma(k: int) -> float:
    return k * U / (1 - k * U)


@pytest.mark.parametrize("seed", [3, 4])
def test_float32_error_is_within_the_arithmetic_bounds(seed):
    """In float32 the transforms add rounding; bounded from the arithmetic, not from any other
    kernel's error on this machine (oneDNN's direct convolution sums in blocks, MKL's batched
    products sequentially: their errors differ by ~20x between CPUs, the bounds do not).

    Worst case: |err| <= gamma_k Y_abs elementwise, k = C_in (the channel sum) + 40 (at most 12
    roundings in the input transform: 3 chained ops per axis, 2 roundings each for a*alpha + b;
    13 in the filter transform: 2 for the inexact constants 1/6, 1/24 and their products, 9 for the
    9-tap sum, 1 cast, 1 spare; 1 product; 12 in the output transform; 1 for the bias; 1 spare).
    Typical: rms(err) <= U sqrt(C_in) KAPPA rms(y) (see _kappa_forward; the random-walk model
    predicts about half of that for round-to-nearest, sequential sums included)."""
    x, weight, b = _conv_args(4, 128, 128, 16, 16, dtype=torch.float32, seed=seed)
    ref = F.conv2d(x.double(), weight.double(), b.double(), padding=1)
    err = (wg.winograd_conv2d(x, wg.transform_weight(weight), b).double() - ref).abs()
    bound = _gamma(128 + 40) * _abs_winograd(x, weight, b)
    assert (err <= bound).all(), (err / bound).max().item()
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(err) < _wino_rel_rms(128) * rms(ref), (rms(err) / rms(ref), _wino_rel_rms(128))


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
    # ... and agrees: each routed conv errs by <= _wino_rel_rms(128) rms relative to its output (see
    # _kappa_forward); GroupNorm rescales after every conv, so the output's largest deviation stays
    # within a few (4: the tail of ~500 outputs) times that, relative to its largest value
    torch.testing.assert_close(routed, before, rtol=0, atol=NET_REL_TOL * before.abs().max().item())
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
    torch.testing.assert_close(second, direct, rtol=0, atol=NET_REL_TOL * direct.abs().max().item())


def test_sampling_uses_it_by_default_on_cpu():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 8, 1e-4 * 125, 0.02 * 40))
    m = _unet(128)
    seeds = list(range(8))
    kw = dict(batch_size=8, clip_denoised=True)
    auto = sample(diffusion, m, (1, 8, 8), seeds, **kw)
    on = sample(diffusion, m, (1, 8, 8), seeds, speed=Speed(winograd=True), **kw)
    off = sample(diffusion, m, (1, 8, 8), seeds, speed=Speed(winograd=False), **kw)
    assert torch.equal(auto, on)
    assert not torch.equal(on, off)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-4)
    with pytest.raises(SamplingOptionError, match="compile"):
        sample(diffusion, m, (1, 8, 8), seeds, speed=Speed(winograd=True, compile=True), **kw)


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


def test_weight_gradient_float32_error_is_within_the_arithmetic_bounds():
    """dW = G^T [sum over T tiles of (B^T d B) * (A dY A^T)] G. As for the forward pass (see
    _kappa_forward), a relative rounding error of rms U sqrt(T) in the tile sum dU_ij reaches
    dW_kl with rms U sqrt(T) sqrt(r_k r_l) / 4 relative to rms(dW) = sqrt(16 T) sigma_x sigma_g,
    where r_k = sum_i G[i, k]^2 |B^T row i|^2 |A^T column i|^2 (the adjoint's transform norms);
    worst case gamma_k times the absolute-value computation, k = T + 64 (12 input-transform and 12
    output-gradient-transform roundings, 1 product, 2 constants and 36 terms in G^T dU G, 1 spare)."""
    x, _, _ = _conv_args(8, 128, 128, 16, 16, dtype=torch.float32, seed=4)
    gy = torch.randn(8, 128, 16, 16, generator=torch.Generator().manual_seed(12))
    ref = torch.nn.grad.conv2d_weight(x.double(), (128, 128, 3, 3), gy.double(), padding=1)
    err = (wg.winograd_weight_grad(x, gy).double() - ref).abs()
    n_tiles = 8 * 4 * 4
    bt, g, at = (m.abs() for m in wg.matrices())
    # absolute-value computation, float64: the same transforms on |x|, |dY| with |B^T|, |A^T|, |G|
    tiles = F.pad(x.double().abs(), (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # [B, C_in, 4, 4, 6, 6]
    v = torch.einsum("ik,bcxykl,jl->bcxyij", bt, tiles, bt)
    gt = torch.einsum("pi,boxpyq,qj->boxyij", at, gy.double().abs().view(8, 128, 4, 4, 4, 4), at)
    du = torch.einsum("bcxyij,boxyij->ocij", v, gt)
    dw_abs = torch.einsum("ik,ocij,jl->ockl", g, du, g)
    assert (err <= _gamma(n_tiles + 64) * dw_abs).all()
    r = g.square().t() @ (_row_norms_sq(bt) * at.square().sum(0))
    kappa_w = float(r.mean() / 4)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(err) < U * n_tiles ** 0.5 * kappa_w * rms(ref), (rms(err) / rms(ref), kappa_w)


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
    torch.testing.assert_close(out, ref, rtol=0, atol=NET_REL_TOL * ref.abs().max().item())
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
    from ddpm.training import train

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
    from ddpm.training import train

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
