"""The small Python API: build, train, load.

    import ddpm
    cfg = ddpm.get_preset("digits")
    ddpm.train(cfg, "runs/digits")
    model, diffusion, cfg = ddpm.load("runs/digits")
    x = ddpm.sample(diffusion, model, (1, 8, 8), seeds=range(16))   # float [16, 1, 8, 8] in [-1, 1]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import load_checkpoint, resolve_checkpoint, split_prefix
from .config import Config
from .errors import CheckpointError, ConfigError, UserError


class Loaded(NamedTuple):
    """What :func:`load` returns: the network (eval mode), its diffusion and the run's config."""

    model: torch.nn.Module
    diffusion: Any  # ddpm.diffusion.GaussianDiffusion
    config: Config
    meta: dict


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(cfg: Config, device: str | torch.device | None = None):
    """A freshly initialised (model, diffusion) pair for ``cfg``."""
    from .diffusion import GaussianDiffusion
    from .nets.unet import UNet

    model = UNet.from_config(cfg.model, cfg.out_channels)
    if device is not None:
        model = model.to(device)
    return model, GaussianDiffusion.from_config(cfg.diffusion)


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


def load_weights(path: str | os.PathLike, weights: str = "ema") -> tuple[Path, dict, Config, dict]:
    """Read one set of weights and the config from a checkpoint file or run folder.

    Returns:
        (checkpoint file, state dict without prefix, validated Config, header meta).
    Raises:
        CheckpointError: unreadable/corrupt file, no config, an invalid config, or no such weights.
    """
    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
    file = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(file, prefixes=[f"{weights}/"])
    if "config" not in meta:
        raise CheckpointError(f"{file}: checkpoint carries no config")
    try:
        cfg = Config.from_dict(meta["config"]).validate()
    except ConfigError as e:
        raise CheckpointError(f"{file}: stored config is invalid: {e}") from None
    state = split_prefix(tensors, f"{weights}/")
    if not state:
        raise CheckpointError(f"{file}: no '{weights}' weights in this checkpoint"
                              + ("; try weights='model'" if weights == "ema" else ""))
    return file, state, cfg, meta


def load(path: str | os.PathLike, device: str | torch.device | None = None, weights: str = "ema") -> Loaded:
    """Load a checkpoint file or a run folder (its latest checkpoint).

    Args:
        path: ``ckpt_*.safetensors`` (training or converted weights) or a run folder.
        device: defaults to CUDA when available, else CPU.
        weights: ``"ema"`` (default, used for all sampling and evaluation, spec 8.2) or ``"model"``.
    Returns:
        :class:`Loaded` (model in eval mode, GaussianDiffusion, Config, header meta).
    """
    from .diffusion import GaussianDiffusion
    from .nets.unet import UNet

    file, state, cfg, meta = load_weights(path, weights)
    model = UNet.from_config(cfg.model, cfg.out_channels)
    load_state_strict(model, state, file)
    dev = torch.device(device) if device is not None else default_device()
    model = model.to(dev).eval()
    return Loaded(model, GaussianDiffusion.from_config(cfg.diffusion), cfg, meta)


def train(cfg: Config, out_dir: str | os.PathLike, resume: str | None = None, **kwargs) -> dict:
    """Train ``cfg`` into ``out_dir`` (see :func:`ddpm.train.loop.train`)."""
    from .train.loop import train as _train

    return _train(cfg, out_dir, resume=resume, **kwargs)
