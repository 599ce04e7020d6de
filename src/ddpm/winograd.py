"""Winograd F(4x4, 3x3) convolution on the CPU, for sampling and training (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", CVPR 2016).

Why: on a CPU without bf16/AMX units the U-Net's 3x3 convolutions are ~80% of a sampling step
and oneDNN already runs them at ~90-105 GFLOP/s per core, the AVX2 FMA peak. The only way to go
faster in float32 is to do fewer multiplications. F(4x4, 3x3) computes each 4x4 output tile from
a 6x6 input tile with 36 multiplications per (input channel, output channel) pair instead of
16 * 9 = 144, i.e. 4x fewer; the work becomes 36 matrix products [tiles, C_in] x [C_in, C_out]
plus cheap additions (the input and output transforms).

The arithmetic stays float32 but is not the same sum as a direct convolution: the transforms
scale values by up to 8 and 1/24, so the rounding error of one convolution is 3-5x that of the
direct float32 one (~7e-6 of the output scale; bf16 autocast is ~1e-2), ~2x on the whole U-Net
output. tests/test_winograd.py checks it against ``F.conv2d`` in float64; forced onto every
convolution of a trained digits model it changes test bits/dim by -1.5e-8 +- 4.1e-8 and moves one
pixel of the 32,000 in 500 samples by one level (benchmarks/winograd_quality.py).

Use :func:`winograd_convs` as a context manager around a loop of network calls: it routes every
eligible ``nn.Conv2d`` (3x3, stride 1, padding 1, no dilation or groups, float32 on the CPU) and
falls back to the module's own forward for anything else (autograd unless ``autograd=True``,
autocast, other dtypes or devices, calls with too few tiles to pay: :data:`MIN_WORK`).

Whether Winograd is faster depends on the CPU: measured on one AVX2 core (benchmarks/README.md)
1.1-1.6x on single 128-channel convolutions, 1.6-2.2x on 256-channel ones, 2.3-3x on weight
gradients; on an AVX-512/AMX Xeon, whose oneDNN direct kernels are faster, much less. So by
default each eligible call's (shape, batch, dtype, layout, autograd) is decided by timing both
ways at its first occurrence (:mod:`ddpm.autotune`, cached on disk per CPU, torch version and
thread count; convolutions with at least :data:`TUNE_MIN_CHANNELS` channels are candidates).
With ``DDPM_AUTOTUNE=0`` or ``autotune=False`` the static rule applies instead: Winograd for
every convolution with at least :data:`MIN_CHANNELS` channels in and out (the AVX2 crossover).

Matrices (F(4, 3), interpolation points 0, +-1, +-2, inf), for a 1-D tile d (6), filter g (3),
output y (4):  y = A^T [(G g) * (B^T d)].  2-D: Y = A^T [(G g G^T) * (B^T d B)] A.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import autotune as _autotune

__all__ = ["MIN_CHANNELS", "TUNE_MIN_CHANNELS", "MIN_WORK", "GROUP_MAX", "M", "ALPHA", "transform_weight",
           "winograd_conv2d", "winograd_weight_grad", "Workspace", "winograd_convs", "is_eligible"]

M = 4  # output tile size
ALPHA = M + 2  # input tile size (M + r - 1, r = 3)
# When Winograd pays (`python benchmarks/winograd_sweep.py`: one thread, NHWC, against oneDNN's
# direct convolution): the transforms are memory-bound passes with a fixed per-call cost, so the
# products [tiles, C_in] x [C_in, C_out] must be wide and long enough. C = 64: at most 1.3x, often
# below 1, so not used. C = 128: 1.1-1.6x from 16 tiles on (0.53x at 4). C = 256: 1.6-2.2x from
# 16 tiles on (1.0x at 4).
MIN_CHANNELS = 128
# Under autotuning, narrower convolutions are timed too; below 64 channels the 36 products are too
# narrow ([tiles, C] x [C, C] with C < 64) to amortise the transforms' passes on any CPU, so they
# are not even timed (the digits preset's 32-channel convolutions are not; its 64-channel ones are).
TUNE_MIN_CHANNELS = 64
MIN_WORK = 2048  # tiles (batch * ceil(H/4) * ceil(W/4)) times min(C_in, C_out)
# Up to this many elements (tiles x channels) per transformed slice, each transform pass covers
# all tile rows/columns at once; above it, row by row (measured crossover, see winograd_conv2d).
GROUP_MAX = 1 << 17

_B_T = [[4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1]]
_G = [[Fraction(1, 4), 0, 0],
      [Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)],
      [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
      [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)],
      [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
      [0, 0, 1]]
_A_T = [[1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1]]


def matrices(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T [6, 6], G [6, 3], A^T [4, 6]) as tensors (the reference for the hand-written transforms)."""
    def t(rows):
        return torch.tensor([[float(v) for v in r] for r in rows], dtype=dtype)
    return t(_B_T), t(_G), t(_A_T)


def transform_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32,
                     compute_dtype: torch.dtype | None = None, transpose: bool = False) -> torch.Tensor:
    """Filter transform U = G g G^T for every (out, in) channel pair.

    weight: [C_out, C_in, 3, 3] (any memory format). Returns U: [36, C_in, C_out] contiguous in
    ``dtype``, computed in ``compute_dtype`` (default ``dtype``; float32 adds ~1e-7 relative error,
    negligible next to the convolution's own) as one product kron(G, G) [36, 9] x [9, C_in * C_out]
    (~5 ms for 256 x 256 channels on one core).
    ``transpose=True`` transforms the filter of the input gradient instead (the kernel flipped
    in both spatial axes, C_in and C_out swapped): [36, C_out, C_in].
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"transform_weight needs a [C_out, C_in, 3, 3] weight, got {tuple(weight.shape)}")
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    _, g, _ = matrices(compute_dtype)
    kron = torch.kron(g, g).to(weight.device)  # [36, 9]: row (a, b), column (k, l)
    w = weight.detach().to(compute_dtype)
    c_out, c_in = weight.shape[:2]
    if transpose:
        taps, shape = w.flip(2, 3).permute(2, 3, 0, 1), (ALPHA * ALPHA, c_out, c_in)
    else:
        taps, shape = w.permute(2, 3, 1, 0), (ALPHA * ALPHA, c_in, c_out)
    return (kron @ taps.reshape(9, -1)).view(shape).to(dtype).contiguous()


class Workspace:
    """Scratch buffers reused across calls, so that each convolution does not allocate (and the
    kernel does not zero-fill and page-fault) ~100 MB of fresh memory: at batch 64 that costs
    as much as the matrix products. One flat buffer per role, grown to the largest need."""

    def __init__(self):
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return flat[:n].view(shape)

    def clear(self) -> None:
        self._flat.clear()


def _bt_1d(d: list[torch.Tensor], out: list[torch.Tensor], tmp: torch.Tensor) -> None:
    """out = B^T d along one axis: 6 strided views in, 6 buffers out (14 passes instead of 22,
    by sharing the sums d1 +- d2 and d3 - d1)."""
    d0, d1, d2, d3, d4, d5 = d
    o0, o1, o2, o3, o4, o5 = out
    torch.add(d4, d0, alpha=4, out=o0).add_(d2, alpha=-5)       # 4 d0 - 5 d2 + d4
    torch.add(d5, d1, alpha=4, out=o5).add_(d3, alpha=-5)       # 4 d1 - 5 d3 + d5
    torch.add(d1, d2, out=tmp)
    torch.add(d4, d3, out=o1).add_(tmp, alpha=-4)               # (d3 + d4) - 4 (d1 + d2)
    torch.sub(d1, d2, out=tmp)
    torch.sub(d4, d3, out=o2).add_(tmp, alpha=4)                # (d4 - d3) + 4 (d1 - d2)
    torch.sub(d3, d1, out=tmp)
    torch.sub(d4, d2, out=o3)
    torch.sub(o3, tmp, alpha=2, out=o4)                         # (d4 - d2) - 2 (d3 - d1)
    o3.add_(tmp, alpha=2)                                       # (d4 - d2) + 2 (d3 - d1)


def _at_1d(m: list[torch.Tensor], out: list[torch.Tensor], tmp: list[torch.Tensor]) -> None:
    """out = A^T m along one axis: 6 views in, 4 out, with a = m1 + m2, b = m1 - m2,
    c = m3 + m4, e = m3 - m4 shared (10 passes instead of 18)."""
    m0, m1, m2, m3, m4, m5 = m
    y0, y1, y2, y3 = out
    a, b, c, e = tmp
    torch.add(m1, m2, out=a)
    torch.sub(m1, m2, out=b)
    torch.add(m3, m4, out=c)
    torch.sub(m3, m4, out=e)
    torch.add(m0, a, out=y0).add_(c)                            # m0 + a + c
    torch.add(b, e, alpha=2, out=y1)                            # b + 2 e
    torch.add(a, c, alpha=4, out=y2)                            # a + 4 c
    torch.add(b, e, alpha=8, out=y3).add_(m5)                   # b + 8 e + m5


def _transform_input(x: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """V = B^T d B for every 6x6 input tile (tiles start every 4 pixels; zero padding of 1 plus
    the remainder). x: [B, C, H, W]. Returns a workspace view [36, B * nh * nw, C]."""
    bsz, c_in, h, w = x.shape
    nh, nw = -(-h // M), -(-w // M)
    hp, wp = nh * M + 2, nw * M + 2
    xp = ws.get("xp", (bsz, hp, wp, c_in), x)  # zero-padded NHWC copy (the border rewritten each call)
    xp[:, 0].zero_()
    xp[:, h + 1:].zero_()
    xp[:, :, 0].zero_()
    xp[:, :, w + 1:].zero_()
    xp[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    rows = ws.get("rows", (ALPHA, bsz, nh, wp, c_in), x)
    _bt_1d([xp[:, k:k + M * (nh - 1) + 1:M] for k in range(ALPHA)], list(rows), ws.get("tmp", (bsz, nh, wp, c_in), x))
    v = ws.get("v", (ALPHA, ALPHA, bsz, nh, nw, c_in), x)
    # Small maps: each pass covers all six tile rows at once (few dispatches); large ones: one
    # pass per row, whose operands stay in the caches between passes.
    if bsz * nh * nw * c_in <= GROUP_MAX:
        _bt_1d([rows[:, :, :, k:k + M * (nw - 1) + 1:M] for k in range(ALPHA)], [v[:, j] for j in range(ALPHA)],
               ws.get("tmp", (ALPHA, bsz, nh, nw, c_in), x))
    else:
        tmp = ws.get("tmp", (bsz, nh, nw, c_in), x)
        for i in range(ALPHA):
            _bt_1d([rows[i][:, :, k:k + M * (nw - 1) + 1:M] for k in range(ALPHA)], list(v[i]), tmp)
    return v.view(ALPHA * ALPHA, bsz * nh * nw, c_in)


def _transform_output(prod: torch.Tensor, bsz: int, nh: int, nw: int, ws: Workspace) -> torch.Tensor:
    """Y = A^T m A for every tile. prod: [36, B * nh * nw, C]. Returns a new NHWC tensor
    [B, nh * 4, nw * 4, C]."""
    n_tiles, c_out = prod.shape[1:]
    prod = prod.view(ALPHA, ALPHA, n_tiles, c_out)
    half = ws.get("half", (M, ALPHA, n_tiles, c_out), prod)
    y = torch.empty((bsz, nh, M, nw, M, c_out), dtype=prod.dtype, device=prod.device)
    y_pq = y.permute(2, 4, 0, 1, 3, 5)  # [p, q, B, nh, nw, C]
    if n_tiles * c_out <= GROUP_MAX:
        _at_1d([prod[i] for i in range(ALPHA)], [half[p] for p in range(M)],
               [ws.get(f"tmp{k}", (ALPHA, n_tiles, c_out), prod) for k in range(4)])
        _at_1d([half[:, j].view(M, bsz, nh, nw, c_out) for j in range(ALPHA)], [y_pq[:, q] for q in range(M)],
               [ws.get(f"tmp{k}", (M, bsz, nh, nw, c_out), prod) for k in range(4)])
    else:
        tmps = [ws.get(f"tmp{k}", (n_tiles, c_out), prod) for k in range(4)]
        for j in range(ALPHA):
            _at_1d([prod[i, j] for i in range(ALPHA)], [half[p, j] for p in range(M)], tmps)
        tmps = [t.view(bsz, nh, nw, c_out) for t in tmps]
        for p in range(M):
            _at_1d([half[p, j].view(bsz, nh, nw, c_out) for j in range(ALPHA)], [y_pq[p, q] for q in range(M)], tmps)
    return y.view(bsz, nh * M, nw * M, c_out)


def winograd_conv2d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                    workspace: Workspace | None = None) -> torch.Tensor:
    """Same as ``F.conv2d(x, weight, bias, stride=1, padding=1)`` up to float rounding.

    x: [B, C_in, H, W] float (NHWC strides save two copies); u: :func:`transform_weight` of the
    weight, [36, C_in, C_out]; bias: [C_out] or None. Returns [B, C_out, H, W], channels_last if
    x is, else contiguous. H and W need not be multiples of 4 (the last tiles are zero-padded).
    Not differentiable (writes into the workspace); :class:`_WinogradFn` is the autograd form.
    """
    ws = workspace if workspace is not None else Workspace()
    bsz, c_in, h, w = x.shape
    if u.shape[:2] != (ALPHA * ALPHA, c_in):
        raise ValueError(f"transformed weight {tuple(u.shape)} does not fit an input with {c_in} channels")
    nh, nw = -(-h // M), -(-w // M)
    v = _transform_input(x, ws)
    # 36 independent products over channels: the only O(C_in * C_out) work.
    prod = ws.get("prod", (ALPHA * ALPHA, v.shape[1], u.shape[2]), x)
    torch.bmm(v, u, out=prod)
    y = _transform_output(prod, bsz, nh, nw, ws)
    if bias is not None:
        y.add_(bias)
    if nh * M != h or nw * M != w:
        y = y[:, :h, :w].contiguous()
    y = y.permute(0, 3, 1, 2)
    # Same memory format as the input, like F.conv2d: layout-dependent ops downstream (dropout
    # draws its mask in memory order) then see exactly what the direct convolution gives them.
    if not x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous()
    return y


def _a_1d(d: list[torch.Tensor], out: list[torch.Tensor], tmp: list[torch.Tensor]) -> None:
    """out = A d along one axis (the adjoint of A^T): 4 views in, 6 out, with e = d0 + d2,
    f = d1 + d3, g = d0 + 4 d2, h = 2 d1 + 8 d3 shared."""
    d0, d1, d2, d3 = d
    o0, o1, o2, o3, o4, o5 = out
    e, f = tmp
    o0.copy_(d0)
    o5.copy_(d3)
    torch.add(d0, d2, out=e)
    torch.add(d1, d3, out=f)
    torch.add(e, f, out=o1)                                     # d0 + d1 + d2 + d3
    torch.sub(e, f, out=o2)                                     # d0 - d1 + d2 - d3
    torch.add(d0, d2, alpha=4, out=e)
    torch.mul(d1, 2, out=f).add_(d3, alpha=8)
    torch.add(e, f, out=o3)                                     # d0 + 2 d1 + 4 d2 + 8 d3
    torch.sub(e, f, out=o4)                                     # d0 - 2 d1 + 4 d2 - 8 d3


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor,
                         workspace: Workspace | None = None) -> torch.Tensor:
    """Gradient of a 3x3, stride-1, padding-1 convolution with respect to its weight:
    ``torch.nn.grad.conv2d_weight(x, w.shape, grad_out, padding=1)`` up to float rounding.

    The adjoint of the Winograd forward pass: dU = sum over tiles of (B^T d B) * (A dY A^T)
    (36 products [C_in, tiles] x [tiles, C_out]), then dW = G^T dU G. x: [B, C_in, H, W];
    grad_out: [B, C_out, H, W]. Returns [C_out, C_in, 3, 3] (contiguous).
    """
    ws = workspace if workspace is not None else Workspace()
    bsz, c_in, h, w = x.shape
    c_out = grad_out.shape[1]
    nh, nw = -(-h // M), -(-w // M)
    v = _transform_input(x, ws)
    # Output-gradient tiles (4x4, not overlapping), zero-padded to whole tiles, NHWC.
    gp = ws.get("gp", (bsz, nh * M, nw * M, c_out), grad_out)
    if nh * M != h or nw * M != w:
        gp.zero_()
    gp[:, :h, :w].copy_(grad_out.permute(0, 2, 3, 1))
    rows = ws.get("grows", (ALPHA, bsz, nh, nw * M, c_out), grad_out)
    _a_1d([gp[:, p::M] for p in range(M)], list(rows),
          [ws.get(f"tmp{k}", (bsz, nh, nw * M, c_out), grad_out) for k in range(2)])
    gt = ws.get("gt", (ALPHA, ALPHA, bsz, nh, nw, c_out), grad_out)
    tmps = [ws.get(f"tmp{k}", (bsz, nh, nw, c_out), grad_out) for k in range(2)]
    for i in range(ALPHA):
        _a_1d([rows[i][:, :, q::M] for q in range(M)], list(gt[i]), tmps)
    n_tiles = bsz * nh * nw
    du = torch.bmm(v.transpose(1, 2), gt.view(ALPHA * ALPHA, n_tiles, c_out))  # [36, C_in, C_out]
    _, g, _ = matrices(du.dtype)
    kron = torch.kron(g, g).to(du.device)  # [36, 9]
    dw = kron.t() @ du.view(ALPHA * ALPHA, c_in * c_out)  # [9, C_in * C_out]
    return dw.view(3, 3, c_in, c_out).permute(3, 2, 0, 1).contiguous()


def is_eligible(conv: nn.Module, min_channels: int | None = None) -> bool:
    """Whether :func:`winograd_convs` may route this module: an ``nn.Conv2d`` computing a 3x3,
    stride-1, padding-1, undilated, ungrouped, zero-padded convolution with at least
    ``min_channels`` (default :data:`MIN_CHANNELS`) input and output channels."""
    floor = MIN_CHANNELS if min_channels is None else int(min_channels)
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding in ((1, 1), "same") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels >= floor
            and conv.out_channels >= floor)


def _weight_format(weight: torch.Tensor) -> torch.memory_format:
    """The memory format of a conv weight (gradients keep it, as autograd's own do)."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _WinogradFn(torch.autograd.Function):
    """Winograd convolution with a backward pass, for training. The input gradient is itself a
    3x3 stride-1 convolution (of the output gradient with the flipped, transposed kernel), so it
    runs through :func:`winograd_conv2d`; the weight gradient is the adjoint of the Winograd
    forward pass (:func:`winograd_weight_grad`, 2.3-3x faster than oneDNN's on this CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, workspace):
        ctx.save_for_backward(x, weight)
        ctx.workspace, ctx.has_bias = workspace, bias is not None
        return winograd_conv2d(x, u, bias, workspace)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            u_t = transform_weight(weight, grad_out.dtype, transpose=True)
            grad_x = winograd_conv2d(grad_out, u_t, None, ctx.workspace)
        if need_w:
            grad_w = winograd_weight_grad(x, grad_out, ctx.workspace).to(memory_format=_weight_format(weight))
        if need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class _WinogradForward:
    """Replacement ``forward`` for one conv: Winograd when it applies, the module's own otherwise.
    Without autograd the transformed weight is cached and recomputed if the weight tensor changes
    (new storage, as with :func:`ddpm.fast.channels_last`, or an in-place update); with autograd
    (``autograd=True``: training) it is recomputed at every call, since the optimiser changes the
    weights at every step. With ``tuned``, each call that could use Winograd asks
    :func:`ddpm.autotune.choose` (timed once per shape, batch, layout and mode) which way is faster."""

    def __init__(self, conv: nn.Conv2d, workspace: Workspace, autograd: bool = False, tuned: bool = False):
        self.conv, self.workspace, self.autograd, self.tuned = conv, workspace, autograd, tuned
        self._key = None
        self._u = None
        self._choices: dict[str, str] = {}  # this block's decisions (no candidates built once known)

    def _transformed(self) -> torch.Tensor:
        wt = self.conv.weight
        key = (wt.data_ptr(), wt._version, wt.dtype, wt.device)
        if key != self._key:
            with torch.no_grad():
                self._u = transform_weight(wt, wt.dtype)
            self._key = key
        return self._u

    def mode(self, x: torch.Tensor) -> str:
        """"direct" (the module's forward), "infer" (no autograd) or "grad" (:class:`_WinogradFn`)."""
        wt = self.conv.weight
        if not (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and wt.dtype == torch.float32
                and wt.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and x.shape[0] * -(-x.shape[-2] // M) * -(-x.shape[-1] // M) * min(wt.shape[0], wt.shape[1])
                >= MIN_WORK):
            return "direct"
        bias = self.conv.bias
        if torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return "grad" if self.autograd else "direct"
        return "infer"

    def _tune_key(self, x: torch.Tensor, mode: str) -> str:
        c_out, c_in = self.conv.weight.shape[:2]
        layout = "nhwc" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "nchw"
        bsz, _, h, w = x.shape
        return (f"conv3x3|{c_in}->{c_out}|{bsz}x{h}x{w}|{str(x.dtype).removeprefix('torch.')}|{layout}|{mode}"
                f"|bias={self.conv.bias is not None}")

    def _candidates(self, x: torch.Tensor, mode: str) -> dict:
        """Zero-argument callables doing this call's work each way (for the timing). In "grad"
        mode each runs the forward pass and the backward pass for the tensors that need gradients
        (into ``torch.autograd.grad``: the parameters' ``.grad`` are not touched)."""
        conv = self.conv
        if mode == "infer":
            return {"direct": lambda: nn.Conv2d.forward(conv, x),
                    "winograd": lambda: winograd_conv2d(x, self._transformed(), conv.bias, self.workspace)}
        xg = x.detach().requires_grad_(x.requires_grad)
        wrt = [t for t in (xg, conv.weight, conv.bias) if t is not None and t.requires_grad]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        gy = torch.full((x.shape[0], conv.out_channels, *x.shape[2:]), 1e-3, dtype=x.dtype,
                        device=x.device).contiguous(memory_format=fmt)

        def direct():
            with torch.enable_grad():
                torch.autograd.grad(nn.Conv2d.forward(conv, xg), wrt, gy)

        def winograd():
            with torch.enable_grad():
                u = transform_weight(conv.weight, torch.float32)
                torch.autograd.grad(_WinogradFn.apply(xg, conv.weight, conv.bias, u, self.workspace), wrt, gy)

        return {"direct": direct, "winograd": winograd}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode(x)
        if mode != "direct" and self.tuned:
            # (the timed calls draw no random numbers: a seeded run's noise is unchanged)
            key = self._tune_key(x, mode)
            choice = self._choices.get(key)
            if choice is None:
                choice = self._choices[key] = _autotune.choose(key, self._candidates(x, mode), baseline="direct")
            if choice == "direct":
                mode = "direct"
        if mode == "infer":
            return winograd_conv2d(x, self._transformed(), self.conv.bias, self.workspace)
        if mode == "grad":
            u = transform_weight(self.conv.weight, torch.float32)
            return _WinogradFn.apply(x, self.conv.weight, self.conv.bias, u, self.workspace)
        return nn.Conv2d.forward(self.conv, x)


@contextlib.contextmanager
def winograd_convs(model: nn.Module, enabled: bool = True, autograd: bool = False,
                   autotune: bool | None = None) -> Iterator[int]:
    """Within the block, every eligible conv of ``model`` (:func:`is_eligible`) may run through
    :func:`winograd_conv2d` whenever the call allows it (CPU, float32, no autocast, enough work);
    calls that need gradients do so only with ``autograd=True`` (training: the forward pass, the
    input gradient and the weight gradient all by Winograd). Other calls use the module's own
    forward.

    ``autotune`` (None: on unless ``DDPM_AUTOTUNE=0``, see :mod:`ddpm.autotune`): convs with at
    least :data:`TUNE_MIN_CHANNELS` channels are candidates, and each call shape uses Winograd
    only where timing it on this machine found it faster than the direct convolution. False:
    every conv with at least :data:`MIN_CHANNELS` channels uses Winograd (``--conv winograd``).

    Yields the number of convs routed (candidates). On exit the module is exactly as before (the
    per-instance ``forward`` is removed, or an enclosing block's restored) and the scratch memory
    is freed. Not for concurrent calls of the same model from several threads (one workspace).
    """
    tuned = _autotune.enabled() if autotune is None else bool(autotune)
    floor = TUNE_MIN_CHANNELS if tuned else MIN_CHANNELS
    convs = ([m for m in model.modules() if is_eligible(m, floor)]
             if enabled and isinstance(model, nn.Module) else [])
    workspace = Workspace()
    previous = [conv.__dict__.get("forward") for conv in convs]  # an enclosing block's routing
    for conv in convs:
        conv.forward = _WinogradForward(conv, workspace, autograd, tuned)
    try:
        yield len(convs)
    finally:
        for conv, prev in zip(convs, previous):
            if prev is None:
                conv.__dict__.pop("forward", None)
            else:
                conv.forward = prev
        workspace.clear()

