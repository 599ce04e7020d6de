"""A distillation run's students beside the solvers in ``ddpm eval steps``: per student (NFE = its
kept steps) a row of its deterministic DDIM walk (sampler ``distilled``, at the command's
``--eta``) and, with 4 or more steps, one of the stochastic walk of Meng et al. 2023 (sampler
``distilled-stochastic``; with fewer steps it is the deterministic walk), scored on the same seeds
as the solver rows, which ``ddpm eval steps --ckpt RUN`` runs on the run's teacher
(``RUN/teacher.safetensors``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .files import TEACHER, is_distilled_run, kept_of, list_students


def teacher_path(ckpt: str | Path) -> str | Path:
    """The checkpoint the solvers sample: a distillation run's teacher copy, else ``ckpt`` itself."""
    return Path(ckpt) / TEACHER if is_distilled_run(ckpt) else ckpt


def student_rows(run: str | Path, quality: Callable[[np.ndarray], tuple], *, n: int, seed: int = 0,
                 batch_size: int = 250, device="cpu", max_nfe: int | None = None, amp_dtype=None,
                 clip: bool = True, eta: float = 0.0) -> list[dict[str, Any]]:
    """Rows (the columns of :data:`ddpm.evaluate.steps.COLUMNS`) for every student of ``run`` with
    at most ``max_nfe`` steps; image k uses seed ``seed + k``, as in the solver rows."""
    from ..api import load
    from ..checkpoint import read_meta
    from ..images import to_uint8
    from .sample import sample_student

    if not is_distilled_run(run):
        return []
    rows = []
    for k, path in sorted(list_students(run).items()):
        if max_nfe is not None and k > max_nfe:
            continue
        model, diffusion, cfg, _ = load(path, device=device)
        kept = kept_of(read_meta(path), path)
        shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        walks = [("distilled", {"eta": float(eta)})]
        if k >= 4:  # with fewer steps the stochastic walk is the DDIM walk (ddpm.distill.sample)
            walks.append(("distilled-stochastic", {"stochastic": True}))
        for name, how in walks:
            t0 = time.perf_counter()
            x = sample_student(model, diffusion, kept, shape, range(seed, seed + n), batch_size=batch_size,
                               device=device, amp_dtype=amp_dtype, clip=clip, **how)
            secs = time.perf_counter() - t0
            score, metric, *extra = quality(to_uint8(x))
            rows.append({"sampler": name, "full": False, "spacing": "kept", "spacing_used": "kept",
                         "clip": clip, "var": "model", "eta": float(how.get("eta", 0.0)),
                         "nfe": k, "steps": k, "quality": float(score), "metric": metric,
                         "seconds_per_image": secs / n, "n": int(n), **(extra[0] if extra else {})})
    return rows
