"""Speed helpers for running the network in fixed-shape loops (sampling, bits/dim): channels_last
weights, ``torch.compile`` and CUDA graphs. None of them changes what is computed, only how: the
results agree with the plain eager call up to float rounding (tests/test_fastpaths.py).

* :func:`channels_last` stores a module's 4-D weights in NHWC strides for the duration of a
  ``with`` block (the Parameter objects are kept, only their storage is swapped and restored), so
  the oneDNN / cuDNN convolutions run in their native layout without reordering the activations.
* :func:`lowp_weights` stores the conv/linear weights in the autocast dtype for the duration of
  a loop, so autocast finds them already cast instead of casting all of them at every step (its
  own cast cache lives only for one ``autocast`` block, i.e. one network call, and skips weights
  that do not require grad, such as the EMA copy). Bit-identical to plain autocast.
* :class:`FastModel` wraps ``model(x, t)``: channels_last input, optionally compiled with
  inductor (one module-level compiled function shared by every model, so a model is compiled
  once per input shape, not once per call of the sampler) and, on CUDA, replayed from a CUDA
  graph (``torch.compile(mode="reduce-overhead")`` when compiling, else a captured
  :class:`torch.cuda.CUDAGraph`).

What pays depends on the CPU. On a 2-core AMD EPYC (AVX2, no AVX-512/AMX): channels_last
~1.17x on CIFAR-10 sampling (but slower on 8x8 images), inductor 1.03-1.09x on top (the 3x3
convolutions are ~82% of the time and already run near the FMA peak), and bf16 autocast 7-8x
*slower* than fp32 because that CPU has no bf16 instructions; doing fewer multiplications
(:mod:`ddpm.winograd`) is the lever there. On an Intel Xeon with AVX512-BF16 and AMX, bf16
autocast is the lever (~2x over fp32; :func:`cpu_has_fast_bf16`, ``--precision bf16``). So on the
CPU the layout is decided by timing where it runs, together with the convolution routing, at the
batch the work runs (:mod:`ddpm.netpath`; a bare :class:`FastModel` times the layout alone,
:func:`wants_channels_last`). `make bench` measures them; benchmarks/README.md has the numbers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from . import netpath

__all__ = ["channels_last", "lowp_weights", "FastModel", "wants_channels_last", "to_channels_last",
           "cpu_has_fast_bf16"]


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 / AMX: Intel Xeon from Cooper
    Lake / Sapphire Rapids on, AMD Zen 4 and later), where ``--precision bf16`` is the fast path
    (~2x fp32 sampling on a Sapphire-Rapids-class Xeon, benchmarks/README.md). Without them, bf16
    autocast runs the convolutions through a slow generic fallback (~8x slower than fp32 on an
    AVX2 EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for ``device_type`` ("cpu" / "cuda"), None when autocast is off."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


_WARNED_SLOW_BF16 = False


def _warn_if_slow_cpu_bf16(x: torch.Tensor) -> None:
    global _WARNED_SLOW_BF16
    if _WARNED_SLOW_BF16 or x.device.type != "cpu" or autocast_dtype("cpu") != torch.bfloat16:
        return
    _WARNED_SLOW_BF16 = True
    if not cpu_has_fast_bf16():
        warnings.warn("bf16 autocast on a CPU without bf16 instructions (AVX512-BF16/AMX): the network runs "
                      "several times slower than in fp32 here; use fp32 (--precision fp32) on this machine",
                      RuntimeWarning, stacklevel=3)


def wants_channels_last(model: Callable, device: torch.device | str, image_hw: tuple[int, int] | None = None,
                        compile: bool = False) -> bool:
    """Whether to run ``model`` in NHWC: an ``nn.Module`` with convolution weights, on CUDA only
    when ``compile`` (inductor fuses the layout changes away; eager GroupNorm on NHWC tensors adds
    copies: measured on an H200, torch 2.11, the cifar10 U-Net in eager NCHW was 1.03-1.09x faster
    than NHWC for sampling with CUDA graphs and 1.05x for training, benchmarks/README.md), or on
    the CPU where timing a probe batch of ``image_hw`` = (H, W) images (about 4096 pixels) with the
    direct convolution found NHWC faster (:func:`ddpm.netpath.decide`, once per machine, thread
    count and network; the samplers and the trainer decide layout and Winograd routing together at
    their real batch instead, through :mod:`ddpm.netpath`). With ``DDPM_AUTOTUNE=0``, or a model that cannot be probed, the static rule: on the
    CPU for images of at least 32x32 pixels (unknown counts as large). Plain callables are left
    alone."""
    device = torch.device(device)
    if device.type == "cpu" and image_hw is not None and isinstance(model, nn.Module):
        c_in = netpath.input_channels(model)
        if c_in is not None:  # (decide falls back to the static rule itself when it does not time)
            h, w = int(image_hw[0]), int(image_hw[1])
            # the layout alone (a bare FastModel routes no convolution through Winograd)
            return netpath.decide(model, device, (netpath.probe_batch(h, w), c_in, h, w), compile=compile,
                                  winograd=False).channels_last
    return netpath.static_channels_last(model, device, image_hw, compile)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in NHWC strides (same values; a no-op when already so or not 4-D)."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def channels_last(model: Callable, enabled: bool = True) -> Iterator[Callable]:
    """Within the block, the 4-D parameters and buffers of ``model`` are channels_last.

    The Parameter objects stay the same (optimisers and EMA keep their references); only
    ``.data`` is swapped, and the original storage is put back on exit, so the module is exactly
    as before afterwards (values, strides, state_dict). The NHWC copies are made outside
    inference mode, so they are ordinary tensors (a compiled graph's guards see the same kind of
    tensor on every call). No-op for non-modules, when ``enabled`` is false, or when nothing
    needs converting.
    """
    if not enabled or not isinstance(model, nn.Module):
        yield model
        return
    tensors = [p for p in model.parameters() if p.dim() == 4] + [b for b in model.buffers() if b.dim() == 4]
    todo = [p for p in tensors if not p.is_contiguous(memory_format=torch.channels_last)]
    saved = []
    with torch.inference_mode(False), torch.no_grad():
        for p in todo:
            saved.append(p.data)
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, old in zip(todo, saved):
                p.data = old


# Modules whose forward is one autocast "lower precision" op (F.conv2d / F.linear): under
# autocast their weight and bias are cast to the autocast dtype anyway.
_LOWP_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextlib.contextmanager
def lowp_weights(model: Callable, dtype: torch.dtype | None) -> Iterator[Callable]:
    """Within the block, conv and linear weights/biases of ``model`` are stored in ``dtype``
    (bf16/fp16), cast once; restored exactly on exit (same Parameter objects, original storage).

    Only for running the model under ``torch.autocast(dtype)``: autocast casts these very tensors
    to ``dtype`` before every conv/linear, so the results are bit-identical, minus one cast of
    every weight per network call. Assumes the weights are used only through their modules'
    own forward (true of ``ddpm.nets.unet.UNet``), and only without autograd (sampling, evaluation):
    the cast parameters do not require grad inside the block. No-op for ``dtype=None`` or a
    non-module.
    """
    if dtype is None or dtype == torch.float32 or not isinstance(model, nn.Module):
        yield model
        return
    todo = [p for m in model.modules() if isinstance(m, _LOWP_MODULES) for p in m.parameters(recurse=False)
            if p.dtype == torch.float32]
    saved = []
    with torch.inference_mode(False), torch.no_grad():
        for p in todo:
            saved.append((p.data, p.requires_grad))
            p.data = p.data.to(dtype)  # keeps the memory format (channels_last stays channels_last)
            # autocast's casts do not require grad, and matmul picks its kernel path by that flag
            # (folding or not): match it, or the results differ in the last bits
            p.requires_grad_(False)
    try:
        yield model
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, (old, grad) in zip(todo, saved):
                p.data = old
                p.requires_grad_(grad)


def _call(model: Callable, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(x, t, **kwargs)


_COMPILED: dict[str, Callable] = {}


def _compiled_call(mode: str | None) -> Callable:
    """One ``torch.compile``-d ``_call`` per mode. Dynamo caches the compiled code on ``_call``
    with guards on the model's structure and the input shapes, so any model of an already seen
    architecture and shape reuses it (no recompilation per sampler call or per model object)."""
    key = mode or "default"
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(_call, dynamic=False, mode=mode)
    return fn


class _CUDAGraphCall:
    """``model(x, t)`` captured once per (shape, dtype, autocast state) into a CUDA graph and replayed.

    The inputs are copied into static buffers, the graph is replayed, and a copy of the static
    output is returned (so a result stays valid after the next replay). The model must be in
    eval mode and its weights must not change while the graph is in use (sampling).
    """

    def __init__(self, model: Callable, warmup: int = 3):
        self.model, self.warmup = model, int(warmup)
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        amp_dtype = autocast_dtype("cuda")
        kw_key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items()))
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, tuple(t.shape), t.dtype, amp_dtype, kw_key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, t, kwargs, amp_dtype)
        graph, sx, st, skw, out = entry
        sx.copy_(x)
        st.copy_(t)
        for k, v in kwargs.items():  # conditioning tensors (e.g. class labels) are graph inputs too
            skw[k].copy_(v)
        graph.replay()
        return out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, amp_dtype: torch.dtype | None) -> tuple:
        sx, st = x.clone(), t.clone()
        skw = {k: v.clone() for k, v in kwargs.items()}

        def run() -> torch.Tensor:
            if amp_dtype is None:
                return self.model(sx, st, **skw)
            # The autocast weight-cast cache must be off while capturing: cached casts would be
            # freed after capture while the graph still reads them.
            with torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False):
                return self.model(sx, st, **skw)

        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lets cuDNN/cuBLAS pick and allocate their kernels
                run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, sx, st, skw, out


class FastModel:
    """``model(x, t) -> out`` through the fast paths; a drop-in for the plain callable.

    Args:
        model: the network (any callable; the options below only apply to an ``nn.Module``).
        device: where it runs.
        channels_last: feed NHWC-strided inputs (use together with :func:`channels_last` on the
            weights). ``None``: :func:`wants_channels_last` for ``image_hw``.
        compile: run through ``torch.compile`` (inductor). Costs a compilation per new input
            shape (tens of seconds to minutes on a CPU); pays off over long loops of one shape.
        cuda_graph: on CUDA, replay a CUDA graph per input shape (with ``compile``: inductor's
            ``reduce-overhead`` mode). Ignored (plain call) on other devices.
    """

    def __init__(self, model: Callable, device: torch.device | str = "cpu", *, channels_last: bool | None = None,
                 compile: bool = False, cuda_graph: bool = False, image_hw: tuple[int, int] | None = None):
        device = torch.device(device)
        self.model = model
        self.channels_last = (wants_channels_last(model, device, image_hw, compile=compile) if channels_last is None
                              else bool(channels_last))
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph) and device.type == "cuda"
        self._graphed = None
        if self.compile:
            compiled = _compiled_call("reduce-overhead" if self.cuda_graph else None)
            self._fn: Callable = lambda x, t, **kw: compiled(model, x, t, **kw)
        elif self.cuda_graph:
            self._graphed = _CUDAGraphCall(model)
            self._fn = self._graphed
        else:
            self._fn = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """``model(x, t, **kwargs)``; ``kwargs`` are conditioning tensors with a leading batch dim."""
        _warn_if_slow_cpu_bf16(x)
        if self.channels_last:
            x = to_channels_last(x)
        out = self._fn(x, t, **kwargs)
        if self.compile and self.cuda_graph:
            out = out.clone()  # cudagraph trees reuse the output memory on the next replay
        # The caller's arithmetic (the sampler's step) stays in the usual NCHW layout; for the
        # C = 1..6 output channels this copy is negligible next to the network.
        return out.contiguous() if self.channels_last else out
