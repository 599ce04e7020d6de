"""Training: ``train(cfg, out_dir, resume=None)`` and its parts (the top-level API function
``ddpm.train`` forwards here).

    loop.py         the trainer: setup, the step loop, periodic and graceful-stop checkpoints
    step.py         one optimiser step (``train_step``), callable on its own; no host round trip
    guard.py        the non-finite guard decided on the device (skip as a scaler's found_inf)
    graphstep.py    the whole step captured once in a CUDA graph and replayed (train.cuda_graph)
    hostsync.py     where the loop reads device values; a checker that makes other reads raise
    state.py        the run folder, the checkpoint layout of the training state, resume checks
    lock.py         one writer per run folder (flock)
    stop.py         SIGINT/SIGTERM -> stop after the step in flight
    optim.py        Adam, LR warm-up, gradient clipping, flat optimiser state
    ema.py          exponential moving average of the weights
    tsampler.py     uniform / importance sampling of t
    precision.py    fp32 / bf16 / fp16 autocast and loss scaling
    batches.py      resumable global-batch data order, sliced per rank
    observe.py      metrics.jsonl, TensorBoard, progress bar, sample grids
"""

from __future__ import annotations

from .loop import NonFiniteLossError, train

__all__ = ["train", "NonFiniteLossError"]
