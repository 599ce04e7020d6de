"""How the network runs inside a fixed-shape loop (sampling, figures): one options object.

:class:`Speed` bundles the fast paths of :mod:`ddpm.fast` (channels_last, ``torch.compile``, CUDA
graphs) and :mod:`ddpm.winograd` (Winograd F(4x4, 3x3) convolutions on the CPU), so the public
sampling functions take one ``speed=`` argument instead of four keywords, and
:func:`fast_network` is the one place that turns it into a wrapped network. None of these
changes what is computed beyond float rounding (tests/test_fastpaths.py, tests/test_winograd.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .errors import SamplingOptionError
from .netpath import decide, probe_batch
from .fast import FastModel, channels_last as _channels_last_weights, lowp_weights
from .winograd import winograd_convs

log = logging.getLogger("ddpm.netpath")


@dataclass(frozen=True)
class Speed:
    """Fast-path options for the network in a sampling loop.

    Attributes:
        channels_last: NHWC weights and inputs for the duration of the loop; None = decided
            together with the routing by :func:`ddpm.netpath.decide` (timed on the CPU).
        compile: ``torch.compile`` the network call (inductor); one compilation per architecture
            and batch shape, reused by later calls in the process.
        cuda_graph: on CUDA, replay the network from a CUDA graph (ignored elsewhere).
        winograd: the 3x3 convolutions as Winograd F(4x4, 3x3) (:mod:`ddpm.winograd`). None (the
            default) = decided for eager float32 CPU runs by :func:`ddpm.netpath.decide` (never
            with ``compile`` or an autocast dtype); where chosen, each conv shape is routed to
            whichever of Winograd and the direct convolution the autotuner (:mod:`ddpm.autotune`)
            measured faster; True = Winograd for every wide conv, untimed (``--conv winograd``);
            False = the direct convolution.
    """

    channels_last: bool | None = None
    compile: bool = False
    cuda_graph: bool = False
    winograd: bool | None = None


@contextlib.contextmanager
def fast_network(model: Callable, device, shape: Sequence[int], speed: Speed | None = None,
                 amp_dtype: torch.dtype | None = None, batch: int | None = None) -> Iterator[Callable]:
    """``model`` wrapped in :class:`ddpm.fast.FastModel` for images of ``shape`` = (C, H, W).

    For the block the module's weights are channels_last (if chosen), already in ``amp_dtype``
    under autocast (cast once, not at every step), and its wide 3x3 convolutions run as Winograd
    on the CPU (if chosen); everything is restored on exit. What ``speed`` leaves open (None) is
    decided by :func:`ddpm.netpath.decide` for batches of ``batch`` images (default: a probe
    batch of about 4096 pixels), layout and routing together; the decision is logged (INFO,
    ``ddpm sample -v``). The wrapped callable takes ``(x, t, **model_kwargs)``.
    """
    speed = speed or Speed()
    if speed.winograd and speed.compile:
        raise SamplingOptionError("winograd=True cannot be combined with compile=True (inductor compiles the "
                               "direct convolution); choose one")
    shape = tuple(int(s) for s in shape)
    b = int(batch) if batch else probe_batch(shape[-2], shape[-1])
    path = decide(model, device, (b, *shape), amp_dtype=amp_dtype, compile=speed.compile,
                  channels_last=speed.channels_last, winograd=speed.winograd)
    if isinstance(model, torch.nn.Module):
        log.info("%s", path.describe())
    fm = FastModel(model, device, channels_last=path.channels_last, compile=speed.compile,
                   cuda_graph=speed.cuda_graph, image_hw=shape[-2:])
    with (_channels_last_weights(model, enabled=fm.channels_last), lowp_weights(model, amp_dtype),
          winograd_convs(model, enabled=path.winograd, autotune=False if speed.winograd else None)):
        yield fm
