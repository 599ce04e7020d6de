"""Which DDPM indices each student of a progressive distillation keeps.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022,
Algorithm 2, in discrete time: a teacher walks a deterministic DDIM chain of 2N kept 0-based
indices k_0 < ... < k_{2N-1} and then to x0. Writing the chain's points as s_0 = "x0",
s_1 = k_0, ..., s_{2N} = k_{2N-1}, the student takes one step where the teacher takes two,
from s_{2i} to s_{2i-2} (i = 1..N): it keeps s_2, s_4, ..., s_{2N} = k_1, k_3, ..., k_{2N-1},
i.e. every other kept index starting from the second, and always the top one. Halving the kept
list this way stays on integer DDPM indices whatever T is, so the first grid only has to have a
power-of-two length; it is the ``trailing`` spacing (round(T - j T/n) - 1, keeping T - 1).

Default start: 16 kept steps (or the largest power of two <= T when T < 16). Every phase costs
the same number of optimiser steps whatever its step count, and on the digits models (T = 200)
the teacher's deterministic DDIM chain is no better at 32 or 64 steps than at 16 (digits Frechet
distance, 500 samples: ``make demo``'s model 3.00 / 3.15 / 3.44 at 16 / 32 / 64 steps, the same
model trained to 3,000 steps 2.09 / 2.23 at 16 / 32), so each extra doubling of the start only
adds a phase; the time it costs is better spent on longer phases (``ddpm.distill.settings``).
A teacher with a longer schedule (T = 1000) and a well-converged ODE may want ``--start 32`` or
more: this default was measured on the digits models only.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..respacing import space_timesteps

DEFAULT_START = 16


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


def default_start(num_timesteps: int) -> int:
    """The default first DDIM step count: min(16, the largest power of two <= T)."""
    p = 1
    while 2 * p <= min(int(num_timesteps), DEFAULT_START):
        p *= 2
    return p


def check_steps(steps: int, start: int, num_timesteps: int) -> None:
    """Raise :class:`ConfigError` (one line, naming the option) unless 1 <= steps <= start <= T,
    both powers of two, steps < start."""
    T = int(num_timesteps)
    for name, n in (("--start", start), ("--steps", steps)):
        if not is_power_of_two(n):
            raise ConfigError(f"{name} {n}: expected a power of two (1, 2, 4, 8, ...)")
    if start > T:
        raise ConfigError(f"--start {start}: the teacher has T={T} steps; expected a power of two <= {T}")
    if steps >= start:
        raise ConfigError(f"--steps {steps}: expected fewer steps than the starting chain (--start {start}), "
                          f"e.g. {max(1, start // 16)}")


def start_grid(num_timesteps: int, start: int) -> tuple[int, ...]:
    """The teacher's first chain: ``start`` kept 0-based indices, trailing spacing (keeps T - 1)."""
    return tuple(int(k) for k in space_timesteps(int(num_timesteps), int(start), "trailing"))


def halve(kept: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The student's kept indices: k_1, k_3, ..., k_{2N-1} of the teacher's 2N (see module doc)."""
    kept = tuple(int(k) for k in kept)
    if len(kept) < 2 or len(kept) % 2:
        raise ValueError(f"halve: expected an even number >= 2 of kept steps, got {len(kept)}")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"halve: kept steps must be strictly increasing, got {kept}")
    return kept[1::2]


def grids(num_timesteps: int, start: int, steps: int) -> list[tuple[int, ...]]:
    """[start grid, its halving, ..., the ``steps``-step grid]: len = log2(start/steps) + 1."""
    check_steps(steps, start, num_timesteps)
    out = [start_grid(num_timesteps, start)]
    while len(out[-1]) > steps:
        out.append(halve(out[-1]))
    return out
