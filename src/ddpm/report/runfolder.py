"""What a report knows about one run folder: config, status, metrics, sample grids, results.

    RUN/config.json              the resolved config (flattened to "section.key" for display)
    RUN/metrics.jsonl            :class:`~ddpm.report.metrics.MetricsLog`
    RUN/samples/step_*.png       the EMA sample grids, in step order
    RUN/checkpoints/latest       the last complete checkpoint
    RUN/train.lock               names the live trainer (host, PID); see ddpm.training.lock
    RUN/**/*.json                evaluation results (:mod:`ddpm.report.results`)

Whether a run is live is read without taking its lock (taking it, even for a moment, could make
a trainer starting at that moment refuse the folder): the lock file names a PID and a host; on
this host the PID is checked, elsewhere the age of the last metrics record decides.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .fmt import duration
from .metrics import MetricsLog
from .results import Result, find_results

__all__ = ["RunData", "Status", "read_run", "flatten_config", "differing_keys", "RunReader"]

LOCK_NAME = "train.lock"  # ddpm.training.lock.LOCK_NAME (not imported: the report must not pull in torch)
STALE_AFTER_S = 900.0     # lock on another host: live while the last record is younger than this (or 3 gaps)


@dataclass
class Status:
    """Where a run stands. ``state`` is one of "running", "finished", "stopped", "not started"."""

    state: str
    step: int | None = None
    total_steps: int | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    updated: float | None = None     # Unix time of the last metrics record
    how: str = ""                    # how liveness was decided

    @property
    def live(self) -> bool:
        return self.state == "running"

    def headline(self) -> str:
        """One line: "running: step 1,200 of 800,000 (0.15%), 7.5 steps/s, 1 d 5 h left"."""
        if self.state == "not started":
            return "not started: no step logged and no checkpoint yet"
        at = f"step {self.step:,}" if self.step is not None else "no step logged"
        if self.total_steps:
            at += f" of {self.total_steps:,}"
            if self.step is not None:
                at += f" ({100.0 * self.step / self.total_steps:.3g}%)"
        if self.state == "finished":
            return f"finished at {at}"
        if self.state == "stopped":
            return f"stopped at {at}"
        bits = [f"running: {at}"]
        if self.steps_per_s:
            bits.append(f"{self.steps_per_s:.3g} steps/s")
        if self.eta_s is not None:
            bits.append(f"about {duration(self.eta_s)} left")
        return ", ".join(bits)


@dataclass
class RunData:
    """Everything the HTML writer needs about one run."""

    root: Path
    name: str
    config: dict[str, Any]                      # config.json as written ({} when missing)
    metrics: MetricsLog
    status: Status
    samples: list[tuple[int, Path]]             # (step, path), step order
    results: list[Result]
    notes: list[str] = field(default_factory=list)  # things the reader says plainly (torn line, unreadable files)


def flatten_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"ch": 32}, "preset": "digits"} -> {"model.ch": 32, "preset": "digits"} (lists as tuples)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            for kk, vv in flatten_config(v).items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The flattened config keys whose values are not the same in every config (a key missing
    from some counts as differing), in first-seen order."""
    flat = [flatten_config(c) for c in configs]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    missing = object()
    return [k for k in keys if len({repr(f.get(k, missing)) for f in flat}) > 1]


def _lock_live(root: Path) -> tuple[bool | None, str]:
    """(live, how): True/False when the lock file decides it, None when it cannot (other host)."""
    path = root / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False, "no trainer holds the folder (no train.lock)"
    except OSError:
        return None, "train.lock unreadable"
    try:
        info = json.loads(text)
        pid, host = int(info["pid"]), str(info["host"])
    except (ValueError, KeyError, TypeError):
        return True, "train.lock is being written by a trainer starting now"
    if host != socket.gethostname():
        return None, f"train.lock names PID {pid} on host {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"train.lock names PID {pid}, which has exited (a killed run)"
    except PermissionError:
        pass  # alive, owned by another user
    return True, f"trainer PID {pid} on this host holds train.lock"


def _rate(m: MetricsLog, window: int = 20) -> float | None:
    """Steps per wall second over the last ``window`` records of the current session."""
    if m.count < 2:
        return m.last("steps_per_s")
    step, t, el = m.array("step"), m.array("time"), m.array("elapsed_s")
    lo = max(0, m.count - 1 - window)
    if np.isfinite(el).all():  # stay inside the last session (elapsed_s restarts at a resume)
        back = np.flatnonzero(np.diff(el[lo:]) < 0)
        if back.size:
            lo += int(back[-1]) + 1
    if m.count - 1 - lo >= 1 and np.isfinite(t[[lo, -1]]).all() and t[-1] > t[lo]:
        return float((step[-1] - step[lo]) / (t[-1] - t[lo]))
    return m.last("steps_per_s")


def _checkpoint(root: Path) -> tuple[str | None, int | None, float | None]:
    d = root / "checkpoints"
    name = None
    try:
        name = (d / "latest").read_text().strip() or None
    except OSError:
        pass
    if name is None or not (d / name).is_file():
        files = sorted(d.glob("ckpt_*.safetensors")) if d.is_dir() else []
        name = files[-1].name if files else None
    if name is None:
        return None, None, None
    try:
        step = int(name[len("ckpt_"):].split(".")[0])
    except ValueError:
        step = None
    try:
        mtime = (d / name).stat().st_mtime
    except OSError:
        mtime = None
    return name, step, mtime


def param_count(ckpt: Path) -> int | None:
    """Parameters of the network in a checkpoint, from the safetensors header alone (the shapes of
    its ``model/`` tensors; no tensor is read), or None."""
    try:
        with open(ckpt, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    total = 0
    for k, v in header.items():
        if k.startswith("model/") and isinstance(v, dict):
            total += int(np.prod(v.get("shape", [])))
    return total or None


def read_status(root: Path, config: dict, m: MetricsLog, live: bool | None = None, now: float | None = None) -> Status:
    """The run's :class:`Status`. ``live`` forces running (True) or not (False); None detects it."""
    now = time.time() if now is None else now
    total = (config.get("train") or {}).get("total_steps")
    total = int(total) if isinstance(total, (int, float)) else None
    ckpt, ckpt_step, ckpt_time = _checkpoint(root)
    step = int(m.last("step")) if m.count else None
    if ckpt_step is not None and (step is None or ckpt_step > step):
        step = ckpt_step  # e.g. train.log_every=0: the checkpoints still tell how far it got
    updated = m.last("time")
    how = "given by the trainer"
    if live is None:
        live, how = _lock_live(root)
        if live is None:  # another host: judge by the age of the last record
            t = m.array("time")[-20:]
            gaps = np.diff(t[np.isfinite(t)])
            patience = max(STALE_AFTER_S, 3.0 * float(np.median(gaps))) if gaps.size else STALE_AFTER_S
            live = updated is not None and now - updated < patience
            how += f"; last record {duration(now - updated)} ago" if updated is not None else "; no record yet"
    rate = _rate(m) if m.count else None
    if step is None and not live:
        state = "not started"
    elif live:
        state = "running"
    elif total is not None and step is not None and step >= total:
        state = "finished"
    else:
        state = "stopped"
    eta = None
    if live and rate and total is not None and step is not None:
        eta = max(0.0, (total - step) / rate)
    return Status(state=state, step=step, total_steps=total, checkpoint=ckpt, checkpoint_step=ckpt_step,
                  checkpoint_time=ckpt_time, steps_per_s=rate, eta_s=eta, updated=updated, how=how)


def _samples(root: Path) -> list[tuple[int, Path]]:
    d = root / "samples"
    out = []
    for p in d.glob("step_*.png") if d.is_dir() else []:
        try:
            out.append((int(p.stem[len("step_"):]), p))
        except ValueError:
            continue
    return sorted(out)


def _config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable config ({e}); expected the JSON ddpm train writes") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a JSON object (the resolved config ddpm train writes)")
    return cfg


def check_run_folder(root: Path) -> None:
    """DataError unless ``root`` looks like a run folder (config.json, metrics.jsonl or checkpoints/)."""
    if not root.exists():
        raise DataError(f"{root}: no such folder; expected a run folder (the --out of ddpm train)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a run folder (the --out of ddpm train)")
    if not any((root / n).exists() for n in ("config.json", "metrics.jsonl", "checkpoints")):
        raise DataError(f"{root}: not a run folder (no config.json, metrics.jsonl or checkpoints/); expected the "
                        f"--out folder of ddpm train")


class RunReader:
    """Reads one run folder again and again, parsing only the new metrics lines each time."""

    def __init__(self, root: str | os.PathLike, results: list[str | os.PathLike] | None = None):
        self.root = Path(root)
        self.extra = [Path(p) for p in results or []]
        self.metrics = MetricsLog(self.root / "metrics.jsonl")

    def read(self, live: bool | None = None) -> RunData:
        """The run as it is now. Raises DataError for a folder that is not a run, an unreadable
        config, garbage in metrics.jsonl, or an empty metrics.jsonl of a run that is not live."""
        root = self.root
        check_run_folder(root)
        cfg = _config(root)
        m = self.metrics.refresh()
        status = read_status(root, cfg, m, live)
        notes = []
        if m.exists and m.count == 0 and not m.torn and not status.live:
            raise DataError(f"{m.path}: empty; expected one JSON object per line (ddpm train writes one every "
                            f"train.log_every steps)")
        if m.torn:
            notes.append(f"metrics.jsonl ends with an incomplete line ({m.torn} bytes): "
                         + ("a record being written now" if status.live else "the trace of a killed writer")
                         + "; it is left out")
        results, unreadable = find_results(root, self.extra)
        notes += [f"{p}: not readable as JSON ({why}); skipped" for p, why in unreadable]
        name = root.resolve().name or str(root)
        return RunData(root=root, name=name, config=cfg, metrics=m, status=status, samples=_samples(root),
                       results=results, notes=notes)


def read_run(root: str | os.PathLike, results: list[str | os.PathLike] | None = None,
             live: bool | None = None) -> RunData:
    """One run folder read once (see :class:`RunReader`)."""
    return RunReader(root, results).read(live)
