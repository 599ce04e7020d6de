"""The whole training step captured once in a CUDA graph and replayed (``train.cuda_graph``).

At 32x32 a training step launches hundreds of small kernels (GroupNorm, SiLU, adds, the
optimiser's and the EMA's multi-tensor kernels); launching them costs the host more time than
the GPU needs to run them. A CUDA graph records the launches of one step (forward, backward,
clipping, the guarded Adam update and the EMA: :func:`.step.step_body`) once and replays them
with one launch. What changes from step to step enters through fixed device buffers:

* the batch (copied into a static buffer), the LR (a device scalar the fused Adam kernel reads:
  Adam runs ``capturable``),
* t, ε and label dropout: the run's generators are registered with the graph and re-seeded
  with (train.seed, step) before every replay, so a replay draws what an eager step at that
  index draws (a CUDA graph reads a registered generator's seed and offset at replay),
* dropout: the global CUDA generator, whose offset advances by the graph's total at every replay.

Before capture, a few steps run eagerly on a side stream (cuDNN autotuning, ``torch.compile``,
Adam's lazy state); they are *undone* afterwards (weights, EMA, Adam state, RNG states restored),
so every real step is a replay and resuming on the same device stays bit-exact.

Needs CUDA, one process, uniform t, a fused optimiser, no fp16 loss scaler (checked by
:func:`check_graph_supported`). With ``capture=False`` the same bookkeeping runs the body
eagerly each call (tests on the CPU use it: static buffers, seeding, warm-up undo).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .guard import is_fused
from .hostsync import host_reads
from .step import Batch, StepResult, TrainParts, begin_step, step_body, train_step


def check_graph_supported(parts: TrainParts, capture: bool = True) -> None:
    """ConfigError naming ``train.cuda_graph`` when this run cannot be captured."""
    tc = parts.cfg.train
    problems = []
    if capture and parts.device.type != "cuda":
        problems.append(f"a CUDA device (this run is on {parts.device})")
    if parts.world_size != 1:
        problems.append("one process (not yet under torchrun)")
    if tc.t_sampler != "uniform":
        problems.append("train.t_sampler=uniform (the importance sampler reads losses on the host)")
    if parts.precision.scaler is not None:
        problems.append("train.precision bf16 or fp32 (fp16's loss scaler is not captured)")
    if tc.ema_warmup != "none":
        problems.append("train.ema_warmup=none (the captured EMA update keeps the decay of its capture)")
    if capture and not is_fused(parts.optimizer):
        problems.append("the fused Adam (the CUDA default)")
    if problems:
        raise ConfigError("invalid value for train.cuda_graph: true; it needs " + ", ".join(problems))


class StepGraph:
    """``StepGraph(parts)(batch, step)`` does what ``train_step(parts, batch, step)`` does, by
    replaying one captured graph. The batch shape must stay the same (the trainer's does).

    Args:
        parts: the run's parts (after a checkpoint was restored into them).
        warmup: eager steps run, then undone, before capture.
        capture: False runs the body eagerly through the same buffers (for CPU tests).
    """

    def __init__(self, parts: TrainParts, warmup: int = 3, capture: bool = True):
        check_graph_supported(parts, capture)
        self.parts, self.warmup, self.capture = parts, int(warmup), bool(capture)
        self.graph = None
        self.static: Batch | None = None
        self.out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, batch: Batch, step: int) -> StepResult:
        if self.static is None:
            with host_reads("capture"):  # once: warm-up, undo, capture
                self._prepare(batch, step)
        parts = self.parts
        lr = begin_step(parts, step)  # host: LR and the generators' seeds for this index
        self.lr.fill_(lr)
        self.static.x0.copy_(batch.x0)
        for k, v in batch.model_kwargs.items():
            self.static.model_kwargs[k].copy_(v)
        if self.capture:
            self.graph.replay()
        else:
            self.out = step_body(parts, self.static)[:3]
        finite, stats, norm = self.out
        # the graph overwrites its outputs at the next replay: the result keeps copies
        return StepResult(finite.clone(), stats.clone(), norm.clone(), lr)

    # ---------------------------------------------------------------------------------------- setup

    def _prepare(self, batch: Batch, step: int) -> None:
        parts = self.parts
        self.static = Batch(batch.x0.clone(), {k: v.clone() for k, v in batch.model_kwargs.items()})
        self.lr = torch.zeros((), dtype=torch.float32, device=parts.device)
        # autocast's weight-cast cache cannot live across a capture; warm-up runs the same way, so
        # torch.compile's guards (which see the autocast state) do not recompile during capture
        parts.precision = dataclasses.replace(parts.precision, cache_enabled=False)
        saved = _snapshot(parts)
        side = torch.cuda.Stream() if self.capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else _null():
            for k in range(self.warmup):
                train_step(parts, self.static, step + k)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        _restore(parts, saved)
        if self.capture:
            self._capture(step)

    def _capture(self, step: int) -> None:
        parts = self.parts
        groups = parts.optimizer.param_groups
        lr = begin_step(parts, step)  # seeds are set outside the capture; the graph only reads them
        for g in groups:  # the kernel reads the LR from device memory at every replay
            g["capturable"] = True
            g["lr"] = self.lr
        graph = torch.cuda.CUDAGraph()
        for gen in (parts.rng.t, parts.rng.noise, parts.rng.label):
            graph.register_generator_state(gen)
        parts.optimizer.zero_grad(set_to_none=True)
        try:
            # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = step_body(parts, self.static)[:3]
        finally:
            for g in groups:
                g["lr"] = lr  # a float again for checkpoints (the graph keeps the tensor)
        self.graph = graph


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _snapshot(parts: TrainParts) -> dict:
    """Copies of everything a warm-up step changes: weights, EMA, Adam state, RNG states."""
    opt = parts.optimizer
    return {
        "params": [p.detach().clone() for p in parts.params],
        "ema": [t.detach().clone() for t in parts.ema.module.state_dict().values()],
        "optim": {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in parts.params
                  if p in opt.state},
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(parts.device) if parts.device.type == "cuda" else None,
    }


@torch.no_grad()
def _restore(parts: TrainParts, saved: dict) -> None:
    """Undo the warm-up steps (state created by them becomes zeros: "no state" for Adam)."""
    for p, old in zip(parts.params, saved["params"]):
        p.copy_(old)
        p.grad = None
    for t, old in zip(parts.ema.module.state_dict().values(), saved["ema"]):
        t.copy_(old)
    opt = parts.optimizer
    for p in parts.params:
        before = saved["optim"].get(p, {})
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                v.copy_(before[k]) if k in before else v.zero_()
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], parts.device)
