"""Choose between equivalent ways of computing the same thing by timing them on the machine at hand,
once, and remember the choice on disk (like cuDNN's benchmark mode).

Used by :mod:`ddpm.winograd` (Winograd F(4x4, 3x3) or the direct convolution, per layer shape,
batch, dtype, layout and autograd use) and :mod:`ddpm.netpath` (the network's layout and routing
together, timed as whole network calls at the work's batch: :func:`decide` with more rounds). Which one is faster depends on the CPU (AVX2 vs AVX-512/AMX,
oneDNN's kernels for it), the thread count and the torch build, so no threshold measured on one
machine holds on the next.

* A decision times every candidate: one warm-up call each, then up to :data:`REPEATS` rounds
  of one timed call per candidate, interleaved and in rotating order (so that load from other
  processes falls on all of them alike; fewer rounds once they have used :data:`BUDGET_S`, or
  from the third round on once the fastest one's slowest time beats every other's fastest). It
  compares medians and keeps the baseline (the plain path) unless another candidate is faster by
  more than :data:`MARGIN`: a choice is never slower than the baseline by more than timing noise.
  A decision whose repeats spread by more than :data:`MAX_SPREAD` (a busy machine) and whose
  winner's times do not all beat the others' holds for the process only (timed again by the next).
* Decisions are cached in memory and in ``<cache>/ddpm/autotune-<machine>.json``, where
  ``<cache>`` is ``$DDPM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME`` or ``~/.cache``, and
  ``<machine>`` hashes the CPU model name and flags and the torch version (both also stored in
  the file and checked on load: a changed CPU or torch starts afresh). The thread count is part
  of every decision's key. Files are replaced atomically (written aside, then renamed).
* ``DDPM_AUTOTUNE=0`` turns timing off: the callers fall back to their static rules (documented
  with them). A cache that cannot be read or written is ignored (decisions then last for the
  process only).

The timer is :func:`measure` (seconds of one call), a module attribute so tests replace it
(tests never depend on timings).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .atomic import atomic_write_text

__all__ = ["ENV_SWITCH", "ENV_CACHE", "enabled", "cache_dir", "cpu_signature", "machine", "cache_path",
           "measure", "Decision", "decide", "choose", "clear_memory"]

ENV_SWITCH = "DDPM_AUTOTUNE"  # "0" / "off" / "false" / "no": no timing, static rules
ENV_CACHE = "DDPM_CACHE_DIR"  # overrides $XDG_CACHE_HOME/ddpm (tests point it at a temporary folder)
REPEATS = 5        # timed rounds (after one warm-up call each): the median of 5 rejects two outliers
BUDGET_S = 0.25    # stop adding rounds once the timed calls of one decision have used this much
MARGIN = 0.08      # a candidate must beat the baseline's median by 8% (above the ~2-5% run-to-run noise)
MAX_SPREAD = 0.5   # (max - min) / median of a candidate's repeats above this: too noisy to keep on disk
_FORMAT = 1

_MEMORY: dict[tuple[str, str, str, str], tuple[str, dict]] = {}


def enabled() -> bool:
    """Whether decisions are timed (``DDPM_AUTOTUNE`` unset or anything but 0/off/false/no)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """``$DDPM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpm``, else ``~/.cache/ddpm``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddpm"


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU's model name and feature flags (Linux: /proc/cpuinfo; elsewhere what ``platform``
    knows). Two machines with the same string run the same kernels at the same relative speeds."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return f"{name} | {flags}"


def machine() -> dict[str, str]:
    """What a cache file is valid for: the CPU (model and flags) and the torch version."""
    return {"cpu": cpu_signature(), "torch": str(torch.__version__)}


def cache_path(mach: Mapping[str, str] | None = None) -> Path:
    mach = machine() if mach is None else mach
    digest = hashlib.sha256(json.dumps(dict(mach), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"autotune-{digest}.json"


def clear_memory() -> None:
    """Forget the decisions held in memory (the files stay)."""
    _MEMORY.clear()


def measure(name: str, fn: Callable[[], object]) -> float:
    """Wall time of one call ``fn()`` in seconds. ``name`` is the candidate's name (for
    replacements of this function in tests)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_all(candidates: Mapping[str, Callable[[], object]], budget_s: float | None = None,
              min_rounds: int = 1) -> dict[str, list[float]]:
    """Interleaved timings: a warm-up call of each (not kept), then rounds of one call of each,
    the order rotating by one every round, until :data:`REPEATS` rounds, or (after ``min_rounds``)
    once ``budget_s`` (default :data:`BUDGET_S`) is spent or the fastest is clearly apart."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    names = list(candidates)
    for name in names:
        measure(name, candidates[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = 0.0
    for r in range(REPEATS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dt = float(measure(name, candidates[name]))
            times[name].append(dt)
            spent += dt
        if r + 1 < min_rounds:
            continue
        if spent > budget_s or (r >= 2 and _separated(times, min(times, key=lambda n: min(times[n])))):
            break
    return times


def _separated(times: Mapping[str, list[float]], name: str) -> bool:
    """Whether every time of ``name`` is below every time of every other candidate."""
    return all(max(times[name]) < min(ts) for other, ts in times.items() if other != name)


def _load(path: Path, mach: Mapping[str, str]) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("machine") != dict(mach):
        return {}  # another CPU or torch (or a hash collision): nothing here applies
    decisions = data.get("decisions")
    return decisions if isinstance(decisions, dict) else {}


def _store(path: Path, mach: Mapping[str, str], key: str, entry: dict) -> None:
    """Add one decision: re-read the file (another process may have added some), write the merged
    content to a temporary file in the same folder and rename it over the old one (atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        decisions = _load(path, mach)
        decisions[key] = entry
        payload = json.dumps({"format": _FORMAT, "machine": dict(mach), "decisions": decisions}, indent=1,
                             sort_keys=True)
        atomic_write_text(path, payload)
    except OSError:
        pass  # read-only home, full disk: the decision still holds for this process


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` chose: ``choice`` (a candidate's name), ``seconds`` (each candidate's
    median seconds per call when it was timed; empty if the cache entry had none) and ``source``:
    "timed" (now), "memory" (earlier in this process) or "cache" (the file)."""

    choice: str
    seconds: dict
    source: str


def decide(key: str, candidates: Mapping[str, Callable[[], object]], baseline: str, margin: float = MARGIN,
           budget_s: float | None = None, min_rounds: int = 1) -> Decision:
    """Like :func:`choose`, with the timings: a :class:`Decision`. ``budget_s`` and ``min_rounds``
    size the timing of expensive candidates (whole network calls): at least ``min_rounds``
    rounds, more while under ``budget_s`` seconds (default :data:`BUDGET_S`) and unclear."""
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {sorted(candidates)}")
    mach = machine()
    full = f"{key}|threads={torch.get_num_threads()}"
    mem_key = (str(cache_dir()), mach["cpu"], mach["torch"], full)
    hit = _MEMORY.get(mem_key)
    if hit is not None and hit[0] in candidates:
        return Decision(hit[0], dict(hit[1]), "memory")
    path = cache_path(mach)
    stored = _load(path, mach).get(full)
    if isinstance(stored, dict) and stored.get("choice") in candidates:
        secs = stored.get("seconds") if isinstance(stored.get("seconds"), dict) else {}
        _MEMORY[mem_key] = (stored["choice"], secs)
        return Decision(stored["choice"], dict(secs), "cache")
    runs = _time_all(candidates, budget_s, min_rounds)
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    best = min(med, key=med.get)
    choice = best if med[best] < (1.0 - margin) * med[baseline] else baseline
    _MEMORY[mem_key] = (choice, med)
    spread = max((max(ts) - min(ts)) / max(statistics.median(ts), 1e-12) for ts in runs.values())
    if spread <= MAX_SPREAD or _separated(runs, choice):
        _store(path, mach, full, {"choice": choice, "seconds": med})
    return Decision(choice, dict(med), "timed")


def choose(key: str, candidates: Mapping[str, Callable[[], object]], baseline: str,
           margin: float = MARGIN) -> str:
    """The name of the candidate to use for ``key`` on this machine and thread count.

    ``candidates`` maps names to zero-argument callables doing the same work each way;
    ``baseline`` (one of them) is kept unless another's median time is below
    ``(1 - margin)`` times the baseline's. Looked up in memory, then in the cache file; timed
    (and stored) only when neither has it. Keys should name everything the speed depends on
    besides the machine and threads (shapes, dtype, layout, autograd use).
    """
    return decide(key, candidates, baseline, margin).choice
