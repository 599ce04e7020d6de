"""The paper's U-Net (paper Appendix B; official ``diffusion_tf/models/unet.py``), in PyTorch.

Structure, exactly as the official code (paper Appendix B):

* timestep embedding: ``ch``-dim sinusoid of the 0-based step ``t`` (sin first, frequencies
  ``exp(-ln(1e4) k / (half - 1))``), then dense ``ch -> 4ch`` -> swish -> dense ``4ch -> 4ch``;
* ``conv_in`` 3x3 -> ``ch``;
* down path: per level ``l``, ``num_res_blocks`` ResBlocks to ``ch * ch_mult[l]`` channels, each
  followed by single-head self-attention when the level's spatial size is in
  ``attn_resolutions``; then (not on the last level) a stride-2 3x3 conv with TF "SAME"
  padding (right/bottom by one for even sizes);
* middle: ResBlock -> attention -> ResBlock;
* up path: per level, last to first, ``num_res_blocks + 1`` ResBlocks, each consuming one skip
  (concatenated on channels), attention as on the way down, then (not on level 0) nearest x2
  upsampling + 3x3 conv;
* output: GroupNorm -> swish -> 3x3 conv to ``out_channels``.

GroupNorm is 32 groups, eps 1e-6. Every conv/linear is Xavier-uniform (TF ``fan_avg`` uniform)
with zero bias; ``conv2`` of every ResBlock, attention ``proj_out`` and ``conv_out`` use scale
1e-10 (near zero, paper Appendix B). Residual adds are unscaled.

State dict names (the official TF scopes, as in the pesser transplant; ``l`` is the level,
0 = full resolution, in both ``down`` and ``up``)::

    temb.dense0, temb.dense1                     Linear ch->4ch, 4ch->4ch
    conv_in                                      Conv2d 3x3
    down.{l}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2[,nin_shortcut]}
    down.{l}.attn.{j}.{norm,q,k,v,proj_out}      (only at attention resolutions; q/k/v/proj_out Linear C->C)
    down.{l}.downsample.conv                     (l < L-1)
    mid.block_1, mid.attn_1, mid.block_2
    up.{l}.block.{j} (j = 0..num_res_blocks), up.{l}.attn.{j}, up.{l}.upsample.conv (l > 0)
    norm_out, conv_out

    class_emb                                    Embedding (num_classes + 1) x 4ch (conditional models only)

``ddpm.interop.diffusers`` maps these to and from diffusers' ``UNet2DModel`` names.

Class conditioning (``num_classes > 0``; not in the paper, which is unconditional): a learned
embedding of the label is added to the timestep embedding after the time MLP and before the
swish every ResBlock applies, exactly where diffusers' ``UNet2DModel(num_class_embeds=...)``
adds its ``class_embedding``. The table has ``num_classes + 1`` rows; the last row (index
``num_classes``) is the "null" label of classifier-free guidance (Ho & Salimans 2022), which
training feeds with probability ``train.p_uncond`` and sampling uses for the unconditional branch.

Attention placement is decided from the configured ``resolution`` (the official code decides at
run time from the actual size); other input sizes still run, with the same modules.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "PRESETS", "timestep_embedding", "attention_levels", "level_resolutions"]

_GN_GROUPS = 32
_GN_EPS = 1e-6
_ZERO_SCALE = 1e-10  # the official "init_scale=0." layers: variance scale 1e-10, not exactly 0


def _init_(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """TF ``variance_scaling(scale, 'fan_avg', 'uniform')``: U(+-sqrt(6 scale / (fan_in + fan_out))).

    torch's xavier_uniform_ uses the same fans (kh*kw*in, kh*kw*out), so gain = sqrt(scale).
    """
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)
    return module


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None, scale: float = 1.0) -> nn.Conv2d:
    return _init_(nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) if padding is None else padding), scale)


def _linear(cin: int, cout: int, scale: float = 1.0) -> nn.Linear:
    return _init_(nn.Linear(cin, cout), scale)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GN_GROUPS, c, eps=_GN_EPS)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the 0-based step (paper Appendix B; official ``get_timestep_embedding``).

    Args:
        t: [B] int64 or float timesteps (0-based, as the network sees them).
        dim: embedding size (``ch``).
    Returns:
        float32 [B, dim]: ``[sin(t f_k), cos(t f_k)]`` with ``f_k = exp(-ln(10000) k / (half-1))``,
        k = 0..half-1, zero-padded by one column if ``dim`` is odd. Always fp32 (also under
        autocast or a bf16 model): the phase ``t f_k`` needs the precision.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    # Official order: exp(k * -(ln(1e4)/(half-1))), with the constant rounded once.
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))
    arg = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """dense(ch -> 4ch) -> swish -> dense(4ch -> 4ch); no nonlinearity after the second dense."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.ch = ch
        self.dense0 = _linear(ch, temb_ch)
        self.dense1 = _linear(temb_ch, temb_ch)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> temb [B, 4ch] (in the weights' dtype)."""
        emb = timestep_embedding(t, self.ch).to(self.dense0.weight.dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class ResBlock(nn.Module):
    """Official ResnetBlock (paper Appendix B), ``conv_shortcut=False``.

    h = conv1(swish(GN(x))); h += temb_proj(swish(temb)); h = conv2(dropout(swish(GN(h))));
    return nin_shortcut(x) (1x1, only when channels change) + h.
    """

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv(cin, cout)
        self.temb_proj = _linear(temb_ch, cout)
        self.norm2 = _norm(cout)
        self.dropout = float(dropout)
        self.conv2 = _conv(cout, cout, scale=_ZERO_SCALE)
        self.nin_shortcut = _conv(cin, cout, k=1) if cin != cout else None

    # Activation checkpointing (``model.checkpointing``; set by ``UNet.set_checkpointing``).
    checkpointing = False

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x [B, cin, H, W], temb_act = swish(temb) [B, 4ch] -> [B, cout, H, W]."""
        if self.checkpointing and torch.is_grad_enabled():
            # Keep only the inputs; the backward pass reruns _forward. preserve_rng_state (the
            # default) replays dropout's CPU/CUDA RNG state, so the recomputed mask, hence every
            # gradient, is bit-identical, and the global RNG ends where it would without it.
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, temb_act, use_reentrant=False)
        return self._forward(x, temb_act)

    def _forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # Without autograd (sampling, evaluation) SiLU and the additions write into the fresh
        # tensors they read (the same values bit for bit, one memory pass fewer each; these
        # memory-bound ops are ~15% of a CPU forward pass). With autograd SiLU must keep its
        # input for the backward pass.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        temb = self.temb_proj(temb_act)[:, :, None, None]
        h = h.add_(temb) if inplace else h + temb
        h = F.silu(self.norm2(h), inplace=inplace)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, p=self.dropout, training=True)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Official AttnBlock (paper Appendix B): single-head self-attention over all H*W positions.

    q, k, v = separate C -> C projections of GN(x); w = softmax(q k^T C^-1/2); return
    x + proj_out(w v). Runs through ``F.scaled_dot_product_attention`` (fused kernels).
    """

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = _linear(c, c)
        self.k = _linear(c, c)
        self.v = _linear(c, c)
        self.proj_out = _linear(c, c, scale=_ZERO_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        b, c, hh, ww = x.shape
        # [B, C, H, W] -> [B, HW, C]: a view; already contiguous for channels_last input.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q = self.q(tokens).unsqueeze(1)  # [B, 1, HW, C]: one head
        k = self.k(tokens).unsqueeze(1)
        v = self.v(tokens).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)
        h = self.proj_out(h.squeeze(1))  # [B, HW, C]
        # Back to [B, C, H, W] as a view (channels_last strides), no copy.
        return x + h.transpose(1, 2).unflatten(2, (hh, ww))


class Downsample(nn.Module):
    """3x3 conv, stride 2, TF "SAME" padding (paper Appendix B).

    TF pads ``total = max((ceil(n/2) - 1) * 2 + 3 - n, 0)`` rows, ``total // 2`` before: for even
    n that is 0 top/left and 1 bottom/right (the asymmetric padding the released weights need);
    for odd n it is 1 on both sides, giving ceil(n/2).
    """

    def __init__(self, c: int):
        super().__init__()
        self.conv = _conv(c, c, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""
        h, w = x.shape[-2:]
        x = F.pad(x, (w % 2, 1, h % 2, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (TF align_corners nearest = plain repeat for these sizes) + 3x3 conv.

    ``size`` (the matching skip's H, W) makes odd sizes work: 4 -> 7 instead of 8.
    """

    def __init__(self, c: int):
        super().__init__()
        self.conv = _conv(c, c)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W] (or ``size``)."""
        b, c, h, w = x.shape
        if size is not None and (int(size[0]), int(size[1])) != (2 * h, 2 * w):
            x = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="nearest")
        elif x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            # Plain 2x repeat as one broadcast copy: torch's NCHW nearest kernel on CPU makes
            # extra copies (about 3x slower here); identical values.
            x = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # fast and format-preserving for NHWC
        return self.conv(x)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks), ``attn`` (empty or one per block), resampler."""

    def __init__(self, blocks: list[ResBlock], attn: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class _Mid(nn.Module):
    def __init__(self, c: int, temb_ch: int, dropout: float):
        super().__init__()
        self.block_1 = ResBlock(c, c, temb_ch, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResBlock(c, c, temb_ch, dropout)

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb_act)), temb_act)


def _model_config_kwargs(mc: Any) -> dict[str, Any]:
    return dict(in_channels=mc.in_channels, ch=mc.ch, ch_mult=tuple(mc.ch_mult), num_res_blocks=mc.num_res_blocks,
                attn_resolutions=tuple(mc.attn_resolutions), dropout=mc.dropout, resolution=mc.resolution,
                num_classes=int(getattr(mc, "num_classes", 0)))


def _presets() -> dict[str, dict[str, Any]]:
    """The named architectures: the paper's come from the run presets of :mod:`ddpm.config` (their one
    declaration); ``28`` and ``64`` are extra test architectures (odd level sizes, 64x64)."""
    from ..config import PRESETS as RUN_PRESETS

    def run(name: str) -> dict[str, Any]:
        return _model_config_kwargs(RUN_PRESETS[name].model)

    return {
        "cifar10": run("cifar10"),                          # 35,746,307 parameters
        "256": run("celebahq256"),                          # 113,673,219 (CelebA-HQ, LSUN)
        "256-large": run("lsun_bedroom256_large"),          # 255,677,955 (large LSUN Bedroom, ch inferred)
        "digits": run("digits"),
        "28": dict(in_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,),
                   dropout=0.0, resolution=28),
        "64": dict(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                   dropout=0.0, resolution=64),
    }


PRESETS: tuple[str, ...] = ("cifar10", "256", "256-large", "digits", "28", "64")


def level_resolutions(resolution: int, levels: int) -> list[int]:
    """The feature-map size of each U-Net level: ``resolution``, then halved (rounding up, as the
    stride-2 "SAME" conv does) at every level below it."""
    out, res = [], int(resolution)
    for _ in range(int(levels)):
        out.append(res)
        res = (res + 1) // 2
    return out


def attention_levels(resolution: int, levels: int, attn_resolutions: Sequence[int]) -> list[bool]:
    """Which levels get self-attention: those whose size is in ``attn_resolutions`` (the down and up
    path of a level alike). The one rule the network and the diffusers converter both use."""
    wanted = {int(r) for r in attn_resolutions}
    return [r in wanted for r in level_resolutions(resolution, levels)]


class UNet(nn.Module):
    """The DDPM U-Net. ``model(x, t) -> out``; ``model(x, t, y)`` for a class-conditional one.

    Args:
        in_channels: image channels C.
        out_channels: output channels (C for a fixed variance, 2C for a learned one).
        ch: base width; also the sinusoid size, the time MLP is 4*ch wide.
        ch_mult: width multiplier per level; len(ch_mult) levels, len - 1 downsamplings.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_resolutions: spatial sizes (of the configured ``resolution``) that get attention.
        dropout: dropout rate inside ResBlocks (train mode only).
        resolution: the input size the model is built for (decides attention placement).
        num_classes: C > 0 adds a class embedding of C + 1 rows (the last is the null label);
            0 (default) is the paper's unconditional network.

    ``self.num_classes`` is that C. ``self.config`` holds these arguments (a dict, JSON-able after tuple -> list).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, resolution: int = 32,
                 num_classes: int = 0):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.config: dict[str, Any] = dict(in_channels=int(in_channels), out_channels=int(out_channels), ch=int(ch),
                                           ch_mult=ch_mult, num_res_blocks=int(num_res_blocks),
                                           attn_resolutions=attn_resolutions, dropout=float(dropout),
                                           resolution=int(resolution), num_classes=int(num_classes))
        from ..errors import ConfigError

        if ch <= 0 or ch % _GN_GROUPS or not ch_mult or any(m < 1 or (ch * m) % _GN_GROUPS for m in ch_mult):
            raise ConfigError(f"UNet: ch={ch}, ch_mult={ch_mult}: every width ch*ch_mult must be a positive "
                              f"multiple of {_GN_GROUPS} (GroupNorm groups)")
        if num_res_blocks < 1:
            raise ConfigError(f"UNet: num_res_blocks={num_res_blocks}; expected an integer >= 1")
        if int(num_classes) < 0:
            raise ConfigError(f"UNet: num_classes={num_classes}; expected an integer >= 0 (0 = unconditional)")
        temb_ch = 4 * ch
        self.temb = TimestepMLP(ch, temb_ch)
        self.conv_in = _conv(in_channels, ch)

        # Down path; track skip channels exactly as the official hs list grows.
        attn_at = attention_levels(resolution, len(ch_mult), attn_resolutions)
        skip_ch = [ch]
        cur_ch = ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            out_ch = ch * mult
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cur_ch, out_ch, temb_ch, dropout))
                cur_ch = out_ch
                if attn_at[level]:
                    attn.append(AttnBlock(cur_ch))
                skip_ch.append(cur_ch)
            lvl = _Level(blocks, attn)
            if level != len(ch_mult) - 1:
                lvl.downsample = Downsample(cur_ch)
                skip_ch.append(cur_ch)
            self.down.append(lvl)

        self.mid = _Mid(cur_ch, temb_ch, dropout)

        # Up path, built last level first; stored at index = level so names read up.{level}.
        up: list[_Level | None] = [None] * len(ch_mult)
        for level in reversed(range(len(ch_mult))):
            out_ch = ch * ch_mult[level]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cur_ch + skip_ch.pop(), out_ch, temb_ch, dropout))
                cur_ch = out_ch
                if attn_at[level]:
                    attn.append(AttnBlock(cur_ch))
            lvl = _Level(blocks, attn)
            if level != 0:
                lvl.upsample = Upsample(cur_ch)
            up[level] = lvl
        assert not skip_ch
        self.up = nn.ModuleList(up)

        self.norm_out = _norm(cur_ch)
        self.conv_out = _conv(cur_ch, out_channels, scale=_ZERO_SCALE)

        # Built last, so every other weight is drawn exactly as for the unconditional network.
        # N(0, 1) init as nn.Embedding's default (and diffusers' / ADM's label embedding).
        self.num_classes = int(num_classes)
        if self.num_classes > 0:
            self.class_emb = nn.Embedding(self.num_classes + 1, temb_ch)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: Any, out_channels: int) -> "UNet":
        """Build from a :class:`ddpm.config.ModelConfig` and the derived output channel count."""
        model = cls(out_channels=out_channels, **_model_config_kwargs(model_cfg))
        return model.set_checkpointing(bool(getattr(model_cfg, "checkpointing", False)))

    def set_checkpointing(self, enabled: bool = True) -> "UNet":
        """Activation checkpointing of every ResBlock on (``model.checkpointing``) or off; returns self."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.checkpointing = bool(enabled)
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "UNet":
        """A named architecture (``cifar10``, ``256``, ``256-large``, ``digits``, ``28``, ``64``).

        ``overrides`` replace constructor arguments (e.g. ``out_channels=6``, ``dropout=0``,
        ``num_classes=10``);
        ``out_channels`` defaults to ``in_channels``.
        """
        from ..errors import ConfigError, suggest

        presets = _presets()
        if name not in presets:
            raise ConfigError(f"unknown U-Net preset '{name}'{suggest(name, presets)}; available: {', '.join(presets)}")
        kwargs = dict(presets[name])
        allowed = set(kwargs) | {"out_channels", "num_classes"}
        for key in overrides:
            if key not in allowed:
                raise ConfigError(f"unknown U-Net argument '{key}'{suggest(key, allowed)}; "
                                  f"expected one of {', '.join(sorted(allowed))}")
        kwargs.update(overrides)
        kwargs.setdefault("out_channels", kwargs["in_channels"])
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network output for a noisy batch.

        Args:
            x: [B, in_channels, H, W] float (any float dtype; channels_last welcome).
            t: [B] int64 or float 0-based timesteps (a scalar / 1-element tensor is broadcast).
            y: [B] int64 class labels in 0..num_classes (num_classes = the null label), or a
                scalar (broadcast); None means the null label. Only for ``num_classes > 0``.
        Returns:
            [B, out_channels, H, W].
        """
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        temb = self.temb(t)
        if self.num_classes > 0:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            elif not torch.is_tensor(y):
                y = torch.tensor(y, device=x.device)
            if y.dim() == 0 or y.numel() == 1:
                y = y.reshape(1).expand(x.shape[0])
            temb = temb + self.class_emb(y.to(device=x.device, dtype=torch.long)).to(temb.dtype)
        elif y is not None:
            raise ValueError("UNet: class labels y were given to an unconditional model (num_classes=0)")
        temb_act = F.silu(temb)  # every ResBlock applies swish to temb first: do it once

        hs = [self.conv_in(x)]
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(hs[-1], temb_act)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
                hs.append(h)
            if hasattr(lvl, "downsample"):
                hs.append(lvl.downsample(hs[-1]))

        h = self.mid(hs[-1], temb_act)

        for level in reversed(range(len(self.up))):
            lvl = self.up[level]
            for j, block in enumerate(lvl.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h, hs[-1].shape[-2:])

        return self.conv_out(F.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
