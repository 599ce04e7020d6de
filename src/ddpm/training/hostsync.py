"""Where the trainer reads device values on the host, and a checker that enforces it.

On a GPU, reading a device value on the host (``.item()``, ``.cpu()``, ``.tolist()``,
``bool(t)``, ``float(t)``, ``.numpy()``) waits until every queued kernel has finished: the CPU
stops queueing work and the GPU runs dry at each such read. The training loop therefore reads
the device only inside :func:`host_reads` blocks, named for their reason (``"setup"``,
``"window"`` once per ``train.log_every`` steps, ``"checkpoint"``, ``"samples"``, ``"stop"``,
``"finish"``); everything between them only queues device work.

:func:`forbid_host_sync` (for tests; it runs on a CPU, where no read really waits) makes those
reads raise :class:`HostSyncError` outside :func:`host_reads` blocks, so a test can run the
trainer or a bare step and fail on any read that would stall a GPU. On a GPU the same check is
``torch.cuda.set_sync_debug_mode("error")`` (benchmarks/gpu.py uses it).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterator

import torch

_allowed_depth = 0
#: how many times each :func:`host_reads` reason was entered (diagnostics and tests)
reads: Counter = Counter()

# The tensor methods that hand a device value to the host.
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostSyncError(RuntimeError):
    """A device value was read on the host outside a :func:`host_reads` block."""


@contextlib.contextmanager
def host_reads(reason: str) -> Iterator[None]:
    """Declare a block in which the trainer reads device values on purpose (cheap: a counter)."""
    global _allowed_depth
    reads[reason] += 1
    _allowed_depth += 1
    try:
        yield
    finally:
        _allowed_depth -= 1


@contextlib.contextmanager
def forbid_host_sync(allow: Callable[[torch.Tensor], bool] | None = None) -> Iterator[list[str]]:
    """Make host reads of tensors raise :class:`HostSyncError` outside :func:`host_reads`.

    ``allow(tensor)``: exceptions for values that live on the host by design (e.g. foreach
    Adam's step counts, CPU scalars it reads with ``.item()``). Yields the list of the reads
    that were refused (each "method: shape").
    """
    refused: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS}
    own = {name for name in _METHODS if name in vars(torch.Tensor)}  # the others come from TensorBase

    def guard(name, real):
        def method(self, *args, **kwargs):
            if _allowed_depth == 0 and not (allow is not None and allow(self)):
                refused.append(f"{name}: {tuple(self.shape)}")
                raise HostSyncError(f"Tensor.{name} on a {tuple(self.shape)} tensor inside the training step "
                                    f"(a host sync on a GPU)")
            return real(self, *args, **kwargs)

        method.__name__ = name
        return method

    try:
        for name, real in saved.items():
            setattr(torch.Tensor, name, guard(name, real))
        yield refused
    finally:
        for name, real in saved.items():
            if name in own:
                setattr(torch.Tensor, name, real)
            else:
                delattr(torch.Tensor, name)
