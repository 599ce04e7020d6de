"""How the network runs on the CPU: memory layout and convolution routing, decided together.

Two choices change how fast the U-Net runs on a CPU without changing what it computes (beyond
float32 rounding): the activations' memory layout (NCHW, or NHWC = ``channels_last``, the native
layout of oneDNN's convolutions) and the 3x3 convolutions' routing (oneDNN's direct convolution,
or Winograd F(4x4, 3x3), :mod:`ddpm.winograd`, itself decided per layer shape). They interact:
Winograd's transforms are cheaper on NHWC tensors, GroupNorm's NHWC kernel is slower on small
maps, and which wins depends on the CPU (AVX2 vs AVX-512/AMX), the thread count and the batch.
Timing the layout alone at a small probe batch, with the direct convolution, picked NCHW where
NHWC + Winograd was 19% faster at the batch the work ran (benchmarks/README.md).

So :func:`decide` times **whole network calls** of every combination still open (up to four:
NCHW or NHWC, direct or Winograd-where-faster), at the batch the work runs (capped at
:data:`PROBE_MAX_PIXELS` pixels, so that a decision costs seconds, not minutes), in the mode it
runs (a no-grad forward for sampling and evaluation, forward + every parameter's gradient for
training) and under its autocast dtype. The candidates run interleaved, at least
:data:`MIN_ROUNDS` rounds (:mod:`ddpm.autotune`); the plain path (NCHW, direct) is kept unless
another is faster by more than :data:`MARGIN`. The decision is cached per machine, thread count,
network, batch shape, dtype and mode (:mod:`ddpm.autotune`: a changed CPU or torch version starts
afresh), and it is shown: :meth:`NetPath.describe` is logged by the sampler (``ddpm sample -v``)
and printed in ``ddpm train``'s plan.

``DDPM_AUTOTUNE=0`` turns the timing off: the static rules (NHWC for sampling images of at least
32x32 pixels, NCHW for training; Winograd by :mod:`ddpm.winograd`'s static channel rule). On CUDA nothing is timed: NHWC
only under ``torch.compile``, never Winograd (:func:`ddpm.fast.wants_channels_last`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import autotune

__all__ = ["NetPath", "decide", "for_training", "input_channels", "probe_batch", "static_channels_last", "PROBE_MAX_PIXELS", "MIN_ROUNDS",
           "MARGIN", "BUDGET_S"]

log = logging.getLogger(__name__)

# The static CPU rule (DDPM_AUTOTUNE=0): NHWC pays where the convolutions dominate: measured
# 1.19x for the 32x32 CIFAR-10 U-Net, but 0.87x for the 8x8 digits one (GroupNorm's NHWC kernel
# is slower on small maps), on the AVX2 machine.
CPU_CHANNELS_LAST_MIN_PIXELS = 32 * 32
# Without a known batch (a bare FastModel, fast_network without one): a probe of about this
# many pixels, at most PROBE_DEFAULT_MAX_BATCH images.
PROBE_DEFAULT_PIXELS = 4096
PROBE_DEFAULT_MAX_BATCH = 32
# The probe batch: the real one up to this many pixels (64 CIFAR-10 images). Above it the
# convolutions' matrix products are long enough that time grows in proportion to the batch for
# every candidate alike, so the ranking holds (benchmarks/README.md checks it at 32 vs 128).
PROBE_MAX_PIXELS = 64 * 32 * 32
MIN_ROUNDS = 3     # whole-network calls: the median of at least 3 interleaved rounds
BUDGET_S = 20.0    # more rounds (up to autotune.REPEATS) while the timed calls used less than this
# Between whole-network candidates the run-to-run noise of a median of 3 is ~1-2% on a quiet
# machine: a 3% margin keeps the plain path on a tie, and costs at most 3% when it is wrong.
MARGIN = 0.03
BASELINE = "nchw/direct"


@dataclass(frozen=True)
class NetPath:
    """One way to run the network.

    Attributes:
        channels_last: NHWC activations and weights.
        winograd: route the eligible 3x3 convolutions through :func:`ddpm.winograd.winograd_convs`
            (each shape then still uses Winograd only where it measured faster, unless timing is off).
        how: "timed" (measured now), "cached" (measured earlier on this machine), "static" (a rule:
            timing off, CUDA, or a network that cannot be probed) or "set" (both fixed by the caller).
        batch: the batch size the decision was timed at (None when not timed).
        seconds: median seconds of one call for each candidate timed ("nhwc/winograd": 0.81, ...).
    """

    channels_last: bool
    winograd: bool
    how: str = "static"
    batch: int | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{'nhwc' if self.channels_last else 'nchw'}/{'winograd' if self.winograd else 'direct'}"

    def describe(self) -> str:
        """One line: 'network path nhwc/winograd (timed at batch 32: nchw/direct 1.93 s, ...)'."""
        text = f"network path {self.name}"
        if self.seconds:
            ranked = sorted(self.seconds.items(), key=lambda kv: kv[1])
            times = ", ".join(f"{k} {_secs(v)}" for k, v in ranked)
            where = "timed" if self.how == "timed" else "cached"
            text += f" ({where} at batch {self.batch}: {times} per call)"
        elif self.how == "static":
            text += " (static rule: timing off, or not a CPU network that can be probed)"
        elif self.how == "set":
            text += " (as set)"
        return text


def _secs(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def input_channels(model: nn.Module) -> int | None:
    """C of the [B, C, H, W] input: ``model.config["in_channels"]`` (ddpm's UNet), else the first
    Conv2d's input channels."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("in_channels"), int):
        return cfg["in_channels"]
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else int(first.in_channels)


def probe_batch(h: int, w: int) -> int:
    """The batch timed when the work's own is unknown: about :data:`PROBE_DEFAULT_PIXELS` pixels."""
    return max(1, min(PROBE_DEFAULT_MAX_BATCH, PROBE_DEFAULT_PIXELS // max(1, int(h) * int(w))))


def static_channels_last(model, device, hw=None, compile: bool = False, train: bool = False) -> bool:
    """The layout without timing: NHWC for a convolutional ``nn.Module`` on the CPU when sampling
    images of at least :data:`CPU_CHANNELS_LAST_MIN_PIXELS` pixels (``hw`` = (H, W); unknown
    counts as large), never when training there; on CUDA only under ``compile``
    (:func:`ddpm.fast.wants_channels_last` says why); elsewhere never."""
    device = torch.device(device)
    convnet = isinstance(model, nn.Module) and any(p.dim() == 4 for p in model.parameters())
    if device.type == "cpu" and train:
        return False  # the plain layout: NHWC's training gain was within noise everywhere measured
    if device.type == "cpu":
        pixels = None if hw is None else int(hw[0]) * int(hw[1])
        return convnet and (pixels is None or pixels >= CPU_CHANNELS_LAST_MIN_PIXELS)
    return convnet and device.type == "cuda" and bool(compile)


def _static(model, device: torch.device, hw, compile: bool, channels_last, winograd, amp,
            train: bool = False) -> NetPath:
    if channels_last is None:
        channels_last = static_channels_last(model, device, hw, compile, train)
    if winograd is None:
        winograd = device.type == "cpu" and not compile and amp is None
    return NetPath(bool(channels_last), bool(winograd), "static")


def _probe_key(model: nn.Module, shape: Sequence[int], train: bool, amp, names: Sequence[str]) -> str:
    sig = hashlib.sha256(";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()).encode()).hexdigest()
    dtype = "float32" if amp is None else str(amp).removeprefix("torch.")
    return (f"path|{type(model).__name__}|{sig[:12]}|{'x'.join(map(str, shape))}|{dtype}|"
            f"{'fwd+bwd' if train else 'fwd'}|{model.training}|{','.join(names)}")


def decide(model: Callable, device, shape: Sequence[int], *, train: bool = False,
           amp_dtype: torch.dtype | None = None, compile: bool = False, channels_last: bool | None = None,
           winograd: bool | None = None) -> NetPath:
    """The layout and routing to run ``model`` with for batches of ``shape`` = (B, C, H, W).

    ``channels_last`` / ``winograd``: None = decide, True/False = fixed (only the other is timed).
    ``train``: time forward + backward (the model's current train/eval mode is kept; dropout's
    draws do not move the global RNG). ``amp_dtype``: the autocast dtype the work runs under
    (Winograd is then not a candidate: it applies to float32 only); ``compile``: the network is
    compiled (the direct convolution; the layout is timed eagerly). See the module docstring.
    """
    device = torch.device(device)
    hw = tuple(shape[-2:]) if len(shape) >= 2 else None
    if compile or amp_dtype is not None or device.type != "cpu":
        winograd = False if winograd is None else winograd
    if channels_last is not None and winograd is not None:
        return NetPath(bool(channels_last), bool(winograd), "set")
    if (device.type != "cpu" or not autotune.enabled() or not isinstance(model, nn.Module)
            or not any(p.dim() == 4 for p in model.parameters()) or len(shape) != 4):
        return _static(model, device, hw, compile, channels_last, winograd, amp_dtype, train)
    c_in = input_channels(model)
    if c_in is None or int(shape[1]) != c_in:
        return _static(model, device, hw, compile, channels_last, winograd, amp_dtype, train)
    b, c, h, w = (int(v) for v in shape)
    b = max(1, min(b, PROBE_MAX_PIXELS // max(1, h * w)))
    layouts = [channels_last] if channels_last is not None else [False, True]
    routes = [winograd] if winograd is not None else [False, True]
    combos = {NetPath(cl, wg).name: (cl, wg) for cl in layouts for wg in routes}
    baseline = NetPath(layouts[0], routes[0]).name
    try:
        decision = _time(model, combos, baseline, (b, c, h, w), train, amp_dtype)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        log.info("network path: probing %s failed (%s); static rule", type(model).__name__, e)
        return _static(model, device, hw, compile, channels_last, winograd, amp_dtype, train)
    cl, wg = combos[decision.choice]
    return NetPath(cl, wg, "timed" if decision.source == "timed" else "cached", b, decision.seconds)


def _time(model: nn.Module, combos: Mapping[str, tuple[bool, bool]], baseline: str, shape, train: bool, amp):
    from .winograd import winograd_convs

    key = _probe_key(model, shape, train, amp, list(combos))
    b = shape[0]
    cfg = getattr(model, "config", None)
    with torch.inference_mode(False):
        x = torch.zeros(shape)
        t = torch.zeros(b, dtype=torch.long)
        kwargs = {}
        if isinstance(cfg, dict) and int(cfg.get("num_classes") or 0) > 0:
            kwargs["y"] = torch.zeros(b, dtype=torch.long)
    copies: dict[str, nn.Module] = {}
    stack = contextlib.ExitStack()

    def net(name: str) -> tuple[nn.Module, torch.Tensor]:
        # each other candidate its own copy, made at its warm-up call (not timed): a model cannot
        # be in two layouts, or routed two ways, at once; Winograd's routing stays open across
        # calls, as in a sampling loop or a training run (its workspace is allocated once)
        if name not in copies:
            cl, wg = combos[name]
            # the plain path runs the model itself (it is not changed: no .grad, no layout or
            # routing), the others each a copy
            m = model if not (cl or wg) else copy.deepcopy(model)
            if cl:
                m = m.to(memory_format=torch.channels_last)
            if wg:
                stack.enter_context(winograd_convs(m, autograd=train))
            copies[name] = m
        return copies[name], (x.contiguous(memory_format=torch.channels_last) if combos[name][0] else x)

    def run(name: str) -> None:
        m, xx = net(name)
        cast = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
        if not train:
            with torch.no_grad(), cast:
                m(xx, t, **kwargs)
            return
        with torch.enable_grad():
            with cast:
                out = m(xx, t, **kwargs)
            torch.autograd.grad(out.float().square().mean(), [p for p in m.parameters() if p.requires_grad])

    cands = {name: (lambda name=name: run(name)) for name in combos}
    # outside inference mode (a sampler may call from inside it): the copies must be ordinary
    # tensors, whose version counter Winograd's weight cache reads
    with torch.inference_mode(False), stack, torch.random.fork_rng(devices=[]):
        return autotune.decide(key, cands, baseline=baseline, margin=MARGIN, budget_s=BUDGET_S,
                               min_rounds=MIN_ROUNDS)


def for_training(cfg, model: nn.Module, device, world_size: int = 1) -> NetPath:
    """The path of a training run of ``cfg`` (``train.channels_last``: "auto" decides, true/false
    fix it; ``train.winograd``: true lets the timing choose, false turns Winograd off), timed as
    forward + backward at the run's per-device micro-batch under its precision."""
    from .training.precision import resolve_precision

    tc = cfg.train
    device = torch.device(device)
    micro = max(1, int(tc.batch_size) // max(1, int(world_size)) // max(1, int(tc.grad_accum)))
    r = int(cfg.model.resolution)
    amp = resolve_precision(tc.precision, device).dtype
    return decide(model, device, (micro, int(cfg.model.in_channels), r, r), train=True, amp_dtype=amp,
                  compile=bool(tc.compile), channels_last=None if tc.channels_last == "auto" else bool(tc.channels_last),
                  winograd=None if tc.winograd else False)
