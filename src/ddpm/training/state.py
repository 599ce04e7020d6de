"""The run folder, and which checkpoint a run starts from.

    RUN/config.json                      resolved config (written atomically at start)
    RUN/metrics.jsonl                    one JSON object per log step
    RUN/samples/step_XXXXXXXXX.png       EMA sample grids
    RUN/checkpoints/ckpt_XXXXXXXXX.safetensors
    RUN/checkpoints/latest               name of the newest complete checkpoint
    RUN/train.lock                       held (flock) by the one trainer writing here (lock.py)

A checkpoint is written atomically by :mod:`ddpm.checkpoint` first; only then is ``latest``
rewritten (atomically) and older files beyond ``keep_last`` deleted, so a crash at any moment
leaves at least one complete checkpoint and a pointer to a complete file.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write_bytes
from ..checkpoint import checkpoint_name, list_checkpoints, load_checkpoint
from ..config import Config
from ..errors import CheckpointError, UserError

# train/data fields that may change when resuming: they do not change the optimisation.
RESUMABLE_FIELDS = frozenset({
    "train.total_steps", "train.log_every", "train.sample_every", "train.sample_n", "train.sample_seed",
    "train.save_every", "train.save_every_minutes", "train.keep_last", "train.num_workers",
    "train.report_every",
    # activation checkpointing recomputes bit-identically: on or off, the run continues exactly
    "model.checkpointing",
    # the memory layout changes only the rounding of the same arithmetic (runs written before
    # "auto" became the default stored false)
    "train.channels_last",
})


class RunFolder:
    """Paths and file operations of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.samples_dir = self.root / "samples"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config_path = self.root / "config.json"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest step first."""
        return list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []

    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / checkpoint_name(step)

    def sample_path(self, step: int) -> Path:
        return self.samples_dir / f"step_{step:09d}.png"

    def write_config(self, cfg: Config) -> None:
        atomic_write_bytes(self.config_path, (cfg.to_json() + "\n").encode())

    def set_latest(self, path: Path) -> None:
        atomic_write_bytes(self.ckpt_dir / "latest", (path.name + "\n").encode())

    def rotate(self, keep_last: int) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints; return the deleted paths."""
        files = self.checkpoints()
        gone = files[:-keep_last] if keep_last > 0 else []
        for f in gone:
            try:
                f.unlink()
            except FileNotFoundError:
                pass
        return gone

    def truncate_metrics(self, step: int) -> None:
        """Keep only metrics records with ``step <= step`` (a resumed run rewrites what follows)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue  # a torn last line from a crash
        atomic_write_bytes(self.metrics_path, "".join(s + "\n" for s in keep).encode())


def step_of(path: Path) -> int:
    return int(Path(path).stem[len("ckpt_"):])


def find_resume_checkpoint(run: RunFolder, log: Callable[[str], Any]) -> tuple[Path, dict, dict] | None:
    """``--resume auto``: the newest checkpoint that loads and verifies, falling back to older ones.

    Returns (path, tensors, meta), or ``None`` when the folder has no checkpoint at all.
    Raises :class:`CheckpointError` when checkpoints exist but none of them is readable.
    """
    files = run.checkpoints()
    if not files:
        return None
    errors = []
    for path in reversed(files):
        try:
            tensors, meta = load_checkpoint(path)
            check_train_meta(path, meta)
            return path, tensors, meta
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: cannot resume from {path.name} ({e}); trying the previous checkpoint")
    raise CheckpointError(f"no readable checkpoint in {run.ckpt_dir}: " + " | ".join(errors))


def check_train_meta(path: Path, meta: dict) -> None:
    """A training checkpoint (not converted weights) that carries a config and a step."""
    if meta.get("kind") != "train" or "config" not in meta or "step" not in meta:
        raise CheckpointError(f"{path}: not a training checkpoint (kind {meta.get('kind')!r}); "
                              f"to fine-tune from weights only, start a fresh run")


def config_differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every differing leaf of model/diffusion/data/train."""
    out = []
    for sec in ("model", "diffusion", "data", "train"):
        a, b = getattr(old, sec), getattr(new, sec)
        for f in fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append((f"{sec}.{f.name}", va, vb))
    return out


def check_resume_compatible(old: Config, new: Config, path: Path) -> list[tuple[str, Any, Any]]:
    """Refuse a resume that would change the model, the diffusion or the optimisation.

    Returns the allowed differences (cadence, total_steps, ...) so the caller can log them.
    Raises :class:`CheckpointError` listing every disallowed difference.
    """
    diffs = config_differences(old, new)
    bad = [d for d in diffs if d[0] not in RESUMABLE_FIELDS]
    if bad:
        listing = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in bad)
        raise CheckpointError(f"cannot resume from {path}: the config differs in {listing}. "
                              f"Resume with the run's own config (only total_steps, the log/sample/save/report "
                              f"cadence, num_workers and model.checkpointing may change) or start a new run "
                              f"with another --out")
    return diffs


def refuse_overwrite(run: RunFolder) -> None:
    """A fresh run must not write into a folder that already holds checkpoints."""
    files = run.checkpoints()
    if files:
        raise UserError(f"{run.root} already holds checkpoints (newest {files[-1].name}); pass --resume auto "
                        f"to continue that run, or choose another --out")
