"""Loading a state dict into a network with a message a user can act on.

Used by :func:`ddpm.api.load` (sampling, evaluation) and by the trainer's resume; kept below
both so that neither imports the other.
"""

from __future__ import annotations

import os

import torch

from .errors import CheckpointError


def load_state_strict(model: torch.nn.Module, state: dict, path: os.PathLike | str) -> None:
    """``load_state_dict(strict=True)`` with a message that names the file and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3]))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:3]))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:3]))
        raise CheckpointError(f"{path}: weights do not fit this model config ({' | '.join(parts)})")
    model.load_state_dict(state, strict=True)
