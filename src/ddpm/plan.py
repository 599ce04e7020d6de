"""The plan ``ddpm train`` prints before its first step (and ``--dry-run`` prints instead of training).

Lines: the data (count, native sizes and modes, what is done to the images), a one-line notice
when the data's native size or colour differs from the model's, the model (resolution,
channels, widths, parameters), batch and steps, and per-step time and memory on this device
from a measured warm-up step; for an image folder also the loader's decoding rate against what
the step consumes, with ``ddpm data prepare`` / ``train.num_workers`` suggested when the loader
is the bottleneck.

Warm-up (:func:`measure_step`): a throwaway model, optimiser and EMA copy, built inside
``torch.random.fork_rng``, train a few steps on a random batch (one per batch size pays that
size's one-off costs, such as first-call kernel setup and the convolution routing's timing; two
per batch size are timed, the faster kept; the last measures memory), so the run's own
initialisation, dropout
stream, data order and resume are exactly as without it. On a CPU the warm-up uses a
micro-batch of at most ``WARMUP_BATCH`` images (one for networks of ``BIG_PARAMS`` or more),
times forward + backward at that batch and at 8x it (2x for the big networks), and extrapolates the fitted line
(per-call overhead + per-image cost) to the real micro-batch; the optimiser update is timed
once, since it does not depend on the batch. Activation memory is scaled linearly (it is per
image for these convolutional networks). On CUDA it runs the real micro-batch.

Memory estimate (bytes): the fp32 state, 20 per parameter (weights, gradients, Adam's two
moments, the EMA copy), plus the larger of (a) the forward + backward working memory beyond the
gradients (activations kept for backward, backward temporaries) and (b) the temporaries of
clipping, Adam and the EMA update. On a CPU with glibc, (a) and (b) are measured: the bytes
malloc holds (``mallinfo2``) are read after every aten op of the warm-up step (a
``TorchDispatchMode``) and the peak above the phase's start is kept. Elsewhere (a) is the
tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once,
parameters excluded) and on CUDA the measured ``torch.cuda.max_memory_allocated`` is printed
beside it. ``tests/test_plan.py`` checks the per-image part against the peak resident memory
(``VmHWM`` in ``/proc/self/status``) of fresh subprocesses. The runtime's own memory (kernels,
caches; ~100-200 MiB on a CPU) is not included.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import Config
from .options import MODEL_SIZES

WARMUP_BATCH = 4
BIG_PARAMS = 10_000_000
STATE_BYTES_PER_PARAM = 20   # fp32 weights + gradients + Adam m, v + EMA copy
LOADER_SHARE_WARN = 0.2      # suggest prepare/workers when decoding takes > 20% of a step


@dataclass
class StepMeasure:
    """A measured warm-up step, scaled to the run's micro-batch."""

    seconds: float               # one optimiser step (all micro-batches), seconds
    params: int
    state_bytes: int             # parameters, gradients, Adam moments, EMA
    activation_bytes: int        # saved for backward, one micro-batch
    measured_batch: int
    micro_batch: int
    cuda_peak_bytes: Optional[int] = None
    method: str = ""
    update_bytes: int = 0        # temporaries of clipping/Adam/EMA (after the activations are freed)
    path: str = ""               # the network path chosen for the run (ddpm.netpath.NetPath.describe)

    @property
    def estimate_bytes(self) -> int:
        """Peak bytes of a step: the state plus the larger of the two phases' extra memory."""
        return self.state_bytes + max(self.activation_bytes, self.update_bytes)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _mallinfo():
    """glibc's ``mallinfo2`` (bytes in use = uordblks + hblkhd), or None off glibc >= 2.33."""
    try:
        import ctypes

        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None

    class _MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = _MI2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


def _peak_mode(in_use):
    """A TorchDispatchMode that records the largest malloc'd total seen after any aten op
    (forward and backward: CPU autograd runs the backward ops on this thread, under the mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.start = self.peak = in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    return Peak()


def measure_step(cfg: Config, device, world_size: int = 1, batch: Optional[int] = None) -> StepMeasure:
    """Time one optimiser step of ``cfg`` on ``device`` and measure its memory (module docstring).

    ``batch`` overrides the warm-up micro-batch (default: the real one on CUDA, at most
    ``WARMUP_BATCH`` on a CPU). The global RNG state (CPU and CUDA) is restored afterwards.
    """
    import torch

    from .diffusion import GaussianDiffusion
    from .nets.unet import UNet
    from .netpath import for_training
    from .training.precision import resolve_precision
    from .winograd import winograd_convs

    device = torch.device(device)
    tc = cfg.train
    micro = max(1, tc.batch_size // max(1, world_size) // tc.grad_accum)
    n_params = sum(int(np.prod(shape)) for shape in _param_shapes(cfg))
    b = batch or (micro if device.type == "cuda" else min(micro, WARMUP_BATCH if n_params < BIG_PARAMS else 1))
    c, r = cfg.model.in_channels, cfg.model.resolution
    cuda = device.type == "cuda"
    in_use = None if cuda else _mallinfo()
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        model = UNet.from_config(cfg.model, cfg.out_channels).to(device).train()
        # the run's layout and routing, decided at its micro-batch (cached: the trainer reuses it)
        path = for_training(cfg, model, device, world_size)
        if path.channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters()]
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=0.0, foreach=not cuda, fused=cuda or None)
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        prec = resolve_precision(tc.precision, device)
        # A second timed batch size separates the per-call overhead from the per-image cost; for
        # small networks 8x the first (cheap), so that the slope stands above the timing noise.
        b2 = min((2 if n_params >= BIG_PARAMS else 8) * b, micro)
        x0_all = torch.rand(b2, c, r, r, device=device) * 2 - 1
        t_all = torch.randint(0, diffusion.num_timesteps, (b2,), device=device)
        noise_all = torch.randn(b2, c, r, r, device=device)
        param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        saved: dict[int, int] = {}

        def pack(x):
            s = x.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                saved[s.data_ptr()] = s.nbytes()
            return x

        fb_times, upd_times, working = {}, [], None
        with winograd_convs(model, enabled=path.winograd and not tc.compile, autograd=True):
            # Steps 0 and 1 pay the one-off costs of each batch size (first-call kernel setup, the
            # convolution routing's timing, Adam's moments); steps 2-5 are timed, twice at each of
            # batches b and b2 (the faster kept); step 6 measures memory (the per-op hook of the
            # dispatch mode would slow a timed step down ~2x).
            for k, bk in enumerate([b, b2] * 3 + ([b] if in_use is not None else [])):
                x0, t, noise = x0_all[:bk], t_all[:bk], noise_all[:bk]
                kwargs = {"y": torch.zeros(bk, dtype=torch.long, device=device)} if cfg.model.num_classes > 0 else None
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                none = contextlib.nullcontext()
                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x) if k == 0 else none
                measure = k == 6
                fb = _peak_mode(in_use) if measure else none
                upd = _peak_mode(in_use) if measure else contextlib.nullcontext()
                t0 = time.perf_counter()
                with fb:  # forward + backward: activations, then gradients
                    with hooks, prec.autocast():
                        loss = diffusion.training_losses(model, x0, t, noise=noise, model_kwargs=kwargs)
                        loss = loss.float().mean()
                    loss.backward()
                if cuda:
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                with upd:  # clipping, Adam and EMA: their temporaries (the activations are gone by now)
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    opt.step()
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - tc.ema_decay)
                if cuda:
                    torch.cuda.synchronize(device)
                if 2 <= k <= 5:
                    fb_times[bk] = min(fb_times.get(bk, float("inf")), t1 - t0)
                    upd_times.append(time.perf_counter() - t1)
                if measure:
                    working = (fb.peak - fb.start, upd.peak - upd.start)
        cuda_peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
        del model, params, ema, opt
    scale = micro / b
    # Forward + backward time is a + s * batch (a: per-call overhead, s: per image), fitted on the
    # two timed batches and extrapolated to the micro-batch; clipping, Adam and the EMA update run
    # once per step whatever the batch. (Scaling a whole small-batch step linearly overestimated
    # the digits preset's step ~10x: its update and per-call overhead dominate at batch 4.)
    if len(fb_times) == 2:
        (ba, ta), (bb, tb) = sorted(fb_times.items())
        slope = max((tb - ta) / (bb - ba), 0.0)
        fb_seconds = max(ta + slope * (micro - ba), ta)
    else:
        fb_seconds = fb_times[b] * scale
    step_seconds = fb_seconds * tc.grad_accum + min(upd_times)
    grads = 4 * n_params
    if working is not None:
        # Forward + backward peak minus the gradients (which the state already counts): the part
        # that grows with the batch. The update's temporaries are batch-independent.
        activations, update = max(working[0] - grads, 0) * scale, max(working[1], 0)
        method = "malloc peak (glibc mallinfo2) after every op of a warm-up step"
    else:
        activations, update = sum(saved.values()) * scale, 0
        method = "tensors saved for backward in a warm-up step"
    return StepMeasure(seconds=step_seconds, params=n_params,
                       state_bytes=STATE_BYTES_PER_PARAM * n_params, activation_bytes=int(activations),
                       measured_batch=b, micro_batch=micro, cuda_peak_bytes=cuda_peak, method=method,
                       update_bytes=int(update), path=path.describe())


def measure_grid_call(cfg: Config, device) -> float:
    """Seconds of one network call on a progress grid's ``train.sample_n`` images (no gradients,
    eval mode, the run's precision; the faster of two timed calls after an untimed one). The
    global RNG state is restored afterwards."""
    import torch

    from .diffusion import call_model
    from .nets.unet import UNet
    from .training.precision import resolve_precision

    device = torch.device(device)
    cuda = device.type == "cuda"
    b = min(cfg.train.sample_n, 256)
    c, r = cfg.model.in_channels, cfg.model.resolution
    with torch.random.fork_rng(devices=[device] if cuda else []), torch.no_grad():
        torch.manual_seed(0)
        model = UNet.from_config(cfg.model, cfg.out_channels).to(device).eval()
        x = torch.randn(b, c, r, r, device=device)
        t = torch.full((b,), cfg.diffusion.num_timesteps // 2, dtype=torch.long, device=device)
        kwargs = {"y": torch.zeros(b, dtype=torch.long, device=device)} if cfg.model.num_classes > 0 else None
        dtype = resolve_precision(cfg.train.precision, device).dtype
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            call_model(model, x, t, dtype, kwargs)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        del model
    return min(times[1:]) * max(1, -(-cfg.train.sample_n // b))


def _param_shapes(cfg: Config) -> list:
    """Parameter shapes of ``cfg``'s U-Net, built on the meta device (no memory, no RNG draws)."""
    import torch

    from .nets.unet import UNet

    with torch.device("meta"):
        model = UNet.from_config(cfg.model, cfg.out_channels)
    return [tuple(p.shape) for p in model.parameters()]


def loader_rate(cfg: Config, n: int = 32) -> tuple[float, int]:
    """(images/s, images timed): decoding rate of the training data in this process."""
    from .data import open_dataset

    ds = open_dataset(cfg.data.source, "train", cfg.model.resolution, cfg.model.in_channels,
                      skip_bad=cfg.data.skip_bad_images, log=lambda m: None)
    k = min(n, len(ds))
    idx = np.arange(k)
    ds.take(idx[:1])  # open/import costs once
    t0 = time.perf_counter()
    ds.take(idx)
    return k / max(time.perf_counter() - t0, 1e-9), k


# ---------------------------------------------------------------------------------------------- text

def data_lines(cfg: Config, sv) -> list[str]:
    """What the data holds and what is done to it (``sv`` a :class:`ddpm.datasets.survey.Survey`)."""
    r, c = cfg.model.resolution, cfg.model.in_channels
    head = f"data: {cfg.data.source} ({sv.kind}): {sv.count:,} images"
    if sv.unreadable:
        head += f" ({sv.unreadable} more unreadable: data.skip_bad_images=true skips them)"
    lines = [head + f"; native {sv.describe_sizes()}; modes {sv.describe_modes()}"]
    done = []
    if not sv.square:
        done.append("centre-crop to a square")
    sizes = {min(w, h) for w, h in sv.sizes}
    if sizes != {r}:
        smaller = [s for s in sizes if s < r]
        verb = "area-resize" if not smaller else "resize (images under the resolution are refused)"
        done.append(f"{verb} to {r}x{r}")
    from .datasets.survey import GREY_MODES

    grey = sum(n for m, n in sv.modes.items() if m in GREY_MODES)
    if sv.count - grey and c == 1:
        done.append(f"convert {'all' if not grey else sv.count - grey} colour images to grey (luma)")
    if grey and c == 3:
        done.append(f"repeat {'all' if grey == sv.count else grey} grey images into RGB")
    if sv.kind == "folder" and len(sv.modes) > 1 and c == 3 and cfg.preset.rstrip("0123456789") in MODEL_SIZES:
        done.append("3 channels because some images are in colour (--set model.in_channels=1 for grey)")
    done.append("random left-right flips" if cfg.data.random_flip else "no flips")
    lines.append("  done to each image: " + ", ".join(done))
    return lines


def notice(cfg: Config, sv, preset: Optional[str]) -> Optional[str]:
    """One line when an explicit preset's model differs from the data's native size or colour."""
    if preset is None or sv is None or not sv.sizes:
        return None
    from .sizes import auto_resolution

    r, c = cfg.model.resolution, cfg.model.in_channels
    (w, h), _ = sv.sizes.most_common(1)[0]
    differs = []
    if (w, h) != (r, r):
        differs.append(f"{w}x{h}" + (" (the most common size)" if len(sv.sizes) > 1 else ""))
    if sv.channels != c:
        differs.append("RGB" if sv.channels == 3 else "grey")
    if not differs:
        return None
    keep = auto_resolution(sv.min_side)
    return (f"note: the data is {' '.join(differs)} but preset {preset} trains {r}x{r} "
            f"{'RGB' if c == 3 else 'grey'}; drop --preset to train a model that fits the data "
            f"({keep}x{keep} {'RGB' if sv.channels == 3 else 'grey'}, choose with --resolution/--size)")


def model_lines(cfg: Config, n_params: int, size_note: str = "") -> list[str]:
    m = cfg.model
    return [f"model: {cfg.preset}: {m.resolution}x{m.resolution}, {m.in_channels} channel(s) "
            f"(output {cfg.out_channels}); ch {m.ch} x ({','.join(map(str, m.ch_mult))}), {m.num_res_blocks} "
            f"ResBlock(s) per level, attention at {','.join(map(str, m.attn_resolutions)) or 'none'}, "
            f"dropout {m.dropout:g}{', activation checkpointing' if m.checkpointing else ''}; "
            f"{n_params:,} parameters{size_note}"]


def run_lines(cfg: Config, world_size: int = 1) -> list[str]:
    tc, d = cfg.train, cfg.diffusion
    per = tc.batch_size // max(1, world_size)
    return [f"training: batch {tc.batch_size} ({world_size} process(es) x {per}"
            + (f", {tc.grad_accum} micro-batches" if tc.grad_accum > 1 else "") + f"), {tc.total_steps:,} steps, "
            f"lr {tc.lr:g} (warm-up {tc.warmup_steps}{'' if tc.lr_schedule == 'constant' else ', then ' + tc.lr_schedule + ' to 0'}), "
            f"EMA {tc.ema_decay:g}{' (ramp)' if tc.ema_warmup == 'ramp' else ''}"
            f"{'' if tc.loss_weighting == 'none' else ', loss weighting ' + tc.loss_weighting}; T = {d.num_timesteps}, "
            f"{d.beta_schedule} betas {d.beta_start:g}..{d.beta_end:g}, {d.mean_type}/{d.var_type}/{d.loss_type}"]


def grid_line(cfg: Config, call_seconds: float) -> tuple[str, float]:
    """(the progress grids' line, their seconds in all) for a grid network call of ``call_seconds``."""
    from .training.grids import grid_calls, grid_steps

    n, calls = grid_calls(cfg)
    k = grid_steps(cfg) or cfg.diffusion.num_timesteps
    seconds = calls * call_seconds
    if n == 0:
        return "progress grids: none (train.sample_every=0)", 0.0
    return (f"progress grids: {n} x {cfg.train.sample_n} samples ({cfg.train.grid_sampler}, {k} network calls, "
            f"{call_seconds:.2g} s each; the raw weights beside the EMA while it holds >10% of its initial "
            f"weights) ~ {_duration(seconds)}", seconds)


def step_lines(cfg: Config, m: StepMeasure, device, grid_call_seconds: Optional[float] = None) -> list[str]:
    total = m.seconds * cfg.train.total_steps
    how = (f"warm-up step at batch {m.measured_batch}, scaled to {m.micro_batch}" if m.measured_batch != m.micro_batch
           else f"warm-up step at batch {m.micro_batch}")
    per = f"{m.seconds:.3g} s" if m.seconds < 100 else _duration(m.seconds)
    grids = None
    if grid_call_seconds is not None:
        grids = grid_line(cfg, grid_call_seconds)
    line = (f"per step on {device}: {per} ({how}); all {cfg.train.total_steps:,} steps ~ "
            f"{_duration(total)}" + (f", with the progress grids ~ {_duration(total + grids[1])}" if grids else ""))
    mem = (f"memory per step ~ {_mib(m.estimate_bytes)} (state {_mib(m.state_bytes)}: weights, gradients, Adam, "
           f"EMA; activations {_mib(m.activation_bytes)})")
    if m.cuda_peak_bytes is not None:
        mem += f"; measured CUDA peak {_mib(m.cuda_peak_bytes)}"
    if not cfg.model.checkpointing and m.activation_bytes > 2 * m.state_bytes and cfg.model.resolution >= 64:
        mem += "; model.checkpointing=true trades ~1 more forward pass for most of the activations"
    return [line, "  " + mem] + (["  " + grids[0]] if grids else []) + (["  " + m.path] if m.path else [])


def fit_line(cfg: Config, m: StepMeasure, device, free_total: Optional[tuple[int, int]] = None) -> Optional[str]:
    """A warning when the step's estimated memory exceeds the device's free memory (CUDA:
    ``torch.cuda.mem_get_info``, or ``free_total`` = (free, total) bytes given); None when it fits.
    The trainer then splits each batch into micro-batches (ddpm.training.oom); the line says
    how many would fit by the estimate (activations scale with the micro-batch)."""
    import torch

    device = torch.device(device)
    if free_total is None:
        if device.type != "cuda":
            return None
        torch.cuda.empty_cache()  # the warm-up step's cached blocks are not the run's
        free_total = torch.cuda.mem_get_info(device)
    free, total = (int(v) for v in free_total)
    if m.estimate_bytes <= free:
        return None
    room = free - m.state_bytes - m.update_bytes
    per_image = m.activation_bytes / max(1, m.micro_batch)
    fits = int(room // per_image) if room > 0 and per_image > 0 else 0
    hint = (f"at most ~{fits} images per forward pass fit: the trainer will split each batch into micro-batches "
            f"when it runs out of memory (or set train.grad_accum so that batch/grad_accum <= {fits})"
            if fits >= 1 else "not even the weights and optimiser state fit: choose a smaller model")
    return (f"warning: memory: a step at micro-batch {m.micro_batch} needs ~{_mib(m.estimate_bytes)} but {device} "
            f"has {_mib(free)} free of {_mib(total)}; {hint}")


def loader_line(cfg: Config, rate: float, m: StepMeasure, source_kind: str) -> str:
    consumed = cfg.train.batch_size / max(m.seconds, 1e-9)
    workers = cfg.train.num_workers
    share = consumed / rate if workers == 0 else consumed / (rate * workers)
    text = (f"loader: {_rate(rate)} images/s decoded per process vs {_rate(consumed)} images/s consumed by the step "
            f"(train.num_workers={workers})")
    if share > LOADER_SHARE_WARN and source_kind == "folder":
        text += (f"; the loader is the bottleneck (~{min(share, 9.99):.0%} of the step's time): decode once with "
                 f"`ddpm data prepare {cfg.data.source} OUT.npy --resolution {cfg.model.resolution}"
                 f" --channels {cfg.model.in_channels}` and train with --data OUT.npy, or "
                 f"--set train.num_workers=N")
    return text


def build_plan(cfg: Config, device, preset: Optional[str] = None, size_note: str = "", world_size: int = 1,
               measure: bool | None = None, measured: Optional[tuple[StepMeasure, float]] = None,
               extra: Optional[list[str]] = None) -> list[str]:
    """All plan lines for ``cfg`` on ``device``. Never raises for unreadable data (the trainer will).

    ``measure``: run the warm-up step (and time a progress grid's network call) for the time and
    memory lines; None (default) = yes unless the environment sets ``DDPM_PLAN_WARMUP=0`` (scripts
    that start many short runs). ``measured``: (step measure, grid call seconds) already taken
    (``--minutes`` measures before it plans); ``extra``: lines printed after the run's line.
    """
    import os

    if measure is None:
        measure = os.environ.get("DDPM_PLAN_WARMUP", "1") != "0"
    from .cliutil import count_parameters
    from .datasets.survey import survey
    from .errors import UserError

    lines: list[str] = []
    try:
        sv = survey(cfg.data.source)
    except UserError as e:
        sv = None
        lines.append(f"data: {cfg.data.source}: not readable here ({e})")
    if sv is not None:
        lines += data_lines(cfg, sv)
        note = notice(cfg, sv, preset)
        if note:
            lines.append(note)
    lines += model_lines(cfg, count_parameters(cfg), size_note)
    lines += run_lines(cfg, world_size)
    lines += list(extra or [])
    if measure or measured is not None:
        from .training.oom import oom_errors

        try:
            m, call_s = measured if measured is not None else (measure_step(cfg, device, world_size),
                                                               measure_grid_call(cfg, device))
        except oom_errors():
            lines.append(f"warning: memory: the warm-up step at the run's micro-batch ran out of memory on {device}; "
                         f"the trainer will split each batch into micro-batches (or set train.grad_accum)")
            return lines
        lines += step_lines(cfg, m, device, call_s)
        fit = fit_line(cfg, m, device)
        if fit:
            lines.append(fit)
        if sv is not None and sv.kind in ("folder", "prepared", "array"):
            try:
                rate, _ = loader_rate(cfg)
                lines.append(loader_line(cfg, rate, m, sv.kind))
            except UserError as e:
                lines.append(f"loader: cannot read the data ({e})")
    return lines
