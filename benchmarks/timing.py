"""Alternating timer: several implementations of the same work, timed in turns in one process.

The machine may be shared (other processes, noisy neighbours), so absolute times drift; what is
compared is the ratio of medians over repeats in which every implementation ran once, in a
rotating order (so no implementation always runs right after another, or first).

Besides wall-clock time, the process CPU time of each call is recorded: with one thread it
is the least disturbed measure on a busy machine (time spent descheduled is not counted), while
with several OpenMP threads it also counts their spin-waiting. On CUDA only wall time means much.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA), so wall-clock times cover it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float] | None:
    """1-, 5-, 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - Windows
        return None


@dataclass
class Timing:
    """Seconds per call of one implementation: ``warmup`` (first calls; compilation shows up
    here) and ``times`` (the measured repeats)."""

    name: str
    warmup: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_times) if self.cpu_times else None


def rotation(names: list[str], r: int) -> list[str]:
    """The order of repeat ``r``: ``names`` rotated left by r (each name leads in turn)."""
    k = r % len(names)
    return names[k:] + names[:k]


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu",
              log: Callable[[str], Any] | None = None) -> dict[str, Timing]:
    """Time every function ``repeats`` times, one call of each per repeat in rotating order,
    after ``warmup`` untimed-for-the-result calls of each (their times are kept in ``warmup``).

    Returns: {name: :class:`Timing`}.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    out = {n: Timing(n) for n in names}

    def once(n: str) -> tuple[float, float]:
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fns[n]()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for w in range(warmup):
        for n in rotation(names, w):
            wall, _ = once(n)
            out[n].warmup.append(wall)
            if log:
                log(f"  warm-up {w + 1}/{warmup} {n}: {wall:.3f} s")
    for r in range(repeats):
        for n in rotation(names, r):
            wall, cpu = once(n)
            out[n].times.append(wall)
            out[n].cpu_times.append(cpu)
            if log:
                log(f"  repeat {r + 1}/{repeats} {n}: {wall:.3f} s (cpu {cpu:.3f} s)")
    return out
