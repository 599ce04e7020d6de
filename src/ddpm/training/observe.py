"""What a training run shows and records: metrics.jsonl, optional TensorBoard, a progress bar,
PNG grids of EMA samples and the report page (RUN/report.html). Only rank 0 creates these.

``metrics.jsonl`` gets one JSON object every ``train.log_every`` steps with

    step, loss, loss_q0..loss_q3, grad_norm, lr, images_per_s, steps_per_s, skipped_nonfinite,
    time, elapsed_s, max_rss_mb, cuda_max_mb (CUDA runs only)

``loss`` is the unweighted per-example training loss averaged over the global batches of the
window (skipped non-finite steps excluded); ``loss_qk`` averages the examples whose timestep
falls in the k-th quarter of 0..T-1 (``4·t // T == k``; null when none did); ``grad_norm`` is
the mean pre-clipping global norm; ``images_per_s`` counts global-batch images per wall second
over the window; ``time`` is the Unix time and ``elapsed_s`` seconds since this process started
training; ``max_rss_mb`` is this process's peak resident memory and ``cuda_max_mb`` the peak
of ``torch.cuda.max_memory_allocated`` (MiB).

TensorBoard (the optional ``tensorboard`` package) gets every scalar above (``train/loss_q0``
... are the per-quartile losses) and each sample grid as an image (``samples``).
:class:`LiveReport` rewrites the report page every ``train.report_every`` minutes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

N_QUARTILES = 4


class Window:
    """Sums since the last log line. All per-step inputs are already global (summed over ranks)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.q_sum = [0.0] * N_QUARTILES
        self.q_count = [0] * N_QUARTILES
        self.norm_sum = 0.0
        self.steps = 0          # optimiser steps taken (finite)
        self.iterations = 0     # batches consumed (including skipped steps)
        self.images = 0
        self.t0 = time.perf_counter()

    def tick(self, images: int) -> None:
        """One batch consumed (whether or not its step was applied)."""
        self.iterations += 1
        self.images += images

    def add(self, stats: list[float], grad_norm: float) -> None:
        """``stats`` = [loss_sum, count, q0_sum..q3_sum, q0_count..q3_count] for one global batch."""
        self.loss_sum += stats[0]
        self.count += int(stats[1])
        for k in range(N_QUARTILES):
            self.q_sum[k] += stats[2 + k]
            self.q_count[k] += int(stats[2 + N_QUARTILES + k])
        self.norm_sum += grad_norm
        self.steps += 1

    def record(self, step: int, lr: float, skipped_total: int, elapsed_s: float) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec: dict[str, Any] = {
            "step": step,
            "loss": self.loss_sum / self.count if self.count else None,
        }
        for k in range(N_QUARTILES):
            rec[f"loss_q{k}"] = self.q_sum[k] / self.q_count[k] if self.q_count[k] else None
        rec.update({
            "grad_norm": self.norm_sum / self.steps if self.steps else None,
            "lr": lr,
            "images_per_s": self.images / dt,
            "steps_per_s": self.iterations / dt,
            "skipped_nonfinite": skipped_total,
            "time": time.time(),
            "elapsed_s": elapsed_s,
        })
        rec.update(memory_mb())
        return rec


def memory_mb() -> dict[str, float]:
    """{"max_rss_mb": peak resident memory of this process, "cuda_max_mb": peak CUDA allocation
    (only once CUDA is in use)}, in MiB."""
    out: dict[str, float] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["max_rss_mb"] = rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    except (ImportError, OSError):  # not on this platform
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def batch_stats(losses: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """float64 [2 + 2·4]: loss sum, count, per-quarter loss sums, per-quarter counts (one device op)."""
    losses = losses.detach().double()
    q = torch.div(t * N_QUARTILES, num_timesteps, rounding_mode="floor").clamp_(0, N_QUARTILES - 1)
    q_sum = torch.zeros(N_QUARTILES, dtype=torch.float64, device=losses.device).index_add_(0, q, losses)
    q_cnt = torch.zeros(N_QUARTILES, dtype=torch.float64, device=losses.device).index_add_(
        0, q, torch.ones_like(losses))
    head = torch.stack([losses.sum(), torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)])
    return torch.cat([head, q_sum, q_cnt])


class MetricsWriter:
    """Appends records to metrics.jsonl; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, path: Path, tb_dir: Path | None = None):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard`
                self._tb = SummaryWriter(str(tb_dir))
            except Exception:  # not installed (or broken): TensorBoard is optional
                self._tb = None

    def write(self, rec: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, rec["step"])
            self._tb.flush()

    def add_grid(self, png_path: Path, step: int) -> None:
        """A sample grid (PNG) to TensorBoard's images, when TensorBoard is on."""
        if self._tb is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as im:
            img = np.asarray(im.convert("RGB"))
        self._tb.add_image("samples", img, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class LiveReport:
    """Rewrites ``RUN/report.html`` (:mod:`ddpm.report`) every ``minutes`` and at the end (rank 0).

    The page is written atomically; reading the folder or writing the page can never stop
    training: a failure is logged as one warning line and the next attempt comes at the next
    interval. The metrics reader is kept, so each rewrite parses only the new lines.
    """

    NAME = "report.html"

    def __init__(self, run_dir: Path, minutes: float, log):
        self.root, self.minutes, self.log = Path(run_dir), float(minutes), log
        self.path = self.root / self.NAME
        self._reader = None
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self._last >= 60.0 * self.minutes

    def write(self, live: bool) -> None:
        """Write the page now (``live``: the run is still training)."""
        if self.minutes <= 0:
            return
        self._last = time.monotonic()
        try:
            # The report layer sits above training; imported here, when a page is due.
            from ..report import RunReader, write_report

            if self._reader is None:
                self._reader = RunReader(self.root)
            write_report([self._reader.read(live=live)], self.path, refresh_s=60.0 * self.minutes)
        except Exception as e:  # noqa: BLE001 - never let the page kill the run
            self.log(f"warning: could not write {self.path} ({type(e).__name__}: {e}); training continues")


class Progress:
    """A tqdm bar over steps (rate and ETA from tqdm, loss in the postfix), or nothing."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_loss(self, loss: float | None, skipped: int) -> None:
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}" if loss is not None else "nan"}
            if skipped:
                post["skipped"] = skipped
            self.bar.set_postfix(post, refresh=False)

    def write(self, msg: str) -> bool:
        """Print above the bar; False when there is no bar."""
        if self.bar is None:
            return False
        self.bar.write(msg)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_sample_grid(path: Path, diffusion, ema_model: torch.nn.Module, cfg, device: torch.device,
                      amp_dtype: torch.dtype | None) -> None:
    """EMA samples for the fixed seeds sample_seed .. sample_seed+sample_n-1 -> one PNG grid
    (class-conditional runs: image k of class k mod C, plain conditional, one row per class)."""
    from ..images import grid_scale, save_grid, to_uint8
    from ..sampling import sample

    tc = cfg.train
    seeds = list(range(tc.sample_seed, tc.sample_seed + tc.sample_n))
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    C = int(getattr(cfg.model, "num_classes", 0))
    labels = torch.arange(len(seeds)) % C if C > 0 else None
    x = sample(diffusion, ema_model, shape, seeds, batch_size=min(tc.sample_n, 256), device=device,
               amp_dtype=amp_dtype, progress=False, model_kwargs=None if labels is None else {"y": labels})
    if labels is None:
        save_grid(to_uint8(x), path, scale=grid_scale(cfg.model.resolution))
    else:
        from ..conditioning import class_grid

        cells, cols = class_grid(to_uint8(x), labels.numpy())
        save_grid(cells, path, nrow=cols, scale=grid_scale(cfg.model.resolution))
