"""Mixed precision: which autocast dtype, and whether a loss scaler is needed.

``train.precision``:
  * ``auto``  bf16 autocast on a CUDA device that supports bf16, fp32 otherwise;
  * ``fp32``  no autocast;
  * ``bf16``  autocast to bfloat16 (also on CPU); weights, optimiser and EMA stay fp32;
  * ``fp16``  autocast to float16 plus a dynamic loss scaler (``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str                     # resolved: "fp32", "bf16" or "fp16"
    dtype: torch.dtype | None     # autocast dtype; None for fp32
    device_type: str              # "cuda" or "cpu"
    scaler: torch.amp.GradScaler | None

    cache_enabled: bool = True    # autocast's weight-cast cache; off while capturing a CUDA graph

    def autocast(self):
        """Context manager for the forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp32":
        return Precision("fp32", None, device.type, None)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, device.type, None)
    if name == "fp16":
        return Precision("fp16", torch.float16, device.type, torch.amp.GradScaler(device.type))
    raise ValueError(f"unknown precision {name!r}")
