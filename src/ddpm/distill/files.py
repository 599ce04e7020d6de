"""The distillation run folder and its files.

    RUN/distill.json                     the teacher (path, digest, T) and the settings
    RUN/teacher.safetensors              the teacher's weights and config (the run needs nothing else)
    RUN/config.json                      the student's config (v-prediction)
    RUN/metrics.jsonl                    loss, LR, gradient norm every log_every steps
    RUN/checkpoints/ckpt_XXXXXXXXX.safetensors, latest   full state (training.layout + "distill")
    RUN/students/steps_NNNN.safetensors  each finished phase's student (EMA weights, its kept
                                         indices in meta["distill"]["kept"]); kept for good
    RUN/train.lock                       the writer lock (training.lock)

Checkpoint names count optimiser steps over all phases; meta["distill"] says which phase and
where in it. Every file is written atomically (ddpm.atomic, via ddpm.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import add_prefix, load_checkpoint, read_meta, save_checkpoint
from ..config import Config
from ..errors import CheckpointError

STUDENTS = "students"
TEACHER = "teacher.safetensors"
INFO = "distill.json"


def student_path(run: Path, steps: int) -> Path:
    return Path(run) / STUDENTS / f"steps_{int(steps):04d}.safetensors"


def is_distilled_run(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / INFO).is_file()


def read_info(run: str | Path) -> dict:
    """A run's distill.json (``settings``, ``teacher``, ...); one clear error if it cannot be read."""
    import json

    path = Path(run) / INFO
    try:
        info = json.loads(path.read_text())
        if not isinstance(info.get("settings"), dict) or "teacher" not in info:
            raise ValueError("no 'settings' or 'teacher'")
        return info
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable distillation record ({e})") from None


def stored_settings(run: str | Path):
    """The :class:`ddpm.distill.settings.DistillSettings` a run was started with (its distill.json)."""
    from .settings import DistillSettings

    return DistillSettings.from_dict(read_info(run)["settings"])


def save_student(path: Path, model: torch.nn.Module, cfg: Config, kept: tuple[int, ...], phase: int,
                 global_step: int, teacher: str) -> None:
    """A finished phase's student: ``ema/`` weights (given as ``model``), config, kept indices."""
    meta = {"config": cfg.to_dict(), "step": int(global_step), "version": __version__, "kind": "weights",
            "distill": {"steps": len(kept), "kept": [int(k) for k in kept], "phase": int(phase), "teacher": teacher}}
    save_checkpoint(path, add_prefix(model.state_dict(), "ema/"), meta)


def save_teacher(path: Path, state: dict, cfg: Config, source: str, meta_in: dict) -> None:
    meta = {"config": cfg.to_dict(), "step": meta_in.get("step"), "version": __version__, "kind": "weights",
            "source": source}
    save_checkpoint(path, add_prefix(state, "ema/"), meta)


def list_students(run: str | Path) -> dict[int, Path]:
    """{kept step count: file} of the finished phases of a distillation run folder."""
    folder = Path(run) / STUDENTS
    out = {}
    for f in sorted(folder.glob("steps_*.safetensors")) if folder.is_dir() else []:
        stem = f.stem[len("steps_"):]
        if stem.isdigit():
            out[int(stem)] = f
    return out


def kept_of(meta: dict, path: str | Path) -> tuple[int, ...] | None:
    """The kept 0-based indices stored in a checkpoint's meta, or None for an undistilled one."""
    d = meta.get("distill")
    if not isinstance(d, dict) or "kept" not in d:
        return None
    kept = d["kept"]
    if not (isinstance(kept, list) and kept and all(isinstance(k, int) for k in kept)
            and all(b > a for a, b in zip(kept, kept[1:]))):
        raise CheckpointError(f"{path}: meta 'distill.kept' is not an increasing list of indices: {kept!r}")
    return tuple(kept)


def choose_student(ckpt: str | Path, steps: int | None) -> tuple[Path, tuple[int, ...]] | None:
    """(file, kept indices) to sample for ``ddpm sample --ckpt CKPT [--steps K]`` when CKPT is a
    distillation run folder (the K-step student; default the one with fewest steps) or a student
    file; None for anything else (an ordinary model).

    Raises:
        CheckpointError: a run with no finished phase yet, or no K-step student (lists the ones there are).
    """
    p = Path(ckpt)
    if is_distilled_run(p):
        found = list_students(p)
        if not found:
            raise CheckpointError(f"{p}: no finished distillation phase yet (no {STUDENTS}/steps_*.safetensors); "
                                  f"continue it with ddpm distill --out {p}")
        k = min(found) if steps is None else int(steps)
        if k not in found:
            raise CheckpointError(f"--steps {k}: {p} has students for {', '.join(map(str, sorted(found)))} "
                                  f"steps; expected one of these")
        return found[k], kept_of(read_meta(found[k]), found[k])
    if p.is_file():
        kept = kept_of(read_meta(p), p)
        if kept is None:
            return None
        if steps is not None and int(steps) != len(kept):
            raise CheckpointError(f"--steps {steps}: {p} is a {len(kept)}-step student; pass its run folder to "
                                  f"choose another step count")
        return p, kept
    return None


def load_weights_file(path: Path) -> tuple[dict, dict]:
    tensors, meta = load_checkpoint(path, prefixes=["ema/"])
    from ..checkpoint import split_prefix

    return split_prefix(tensors, "ema/"), meta
