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
from .distributed import choose_device
from .errors import CheckpointError, ConfigError, UserError
from .weights import load_state_strict  # noqa: F401 (re-exported for callers of ddpm.api)


class Loaded(NamedTuple):
    """What :func:`load` returns: the network (eval mode), its diffusion and the run's config."""

    model: torch.nn.Module
    diffusion: Any  # ddpm.diffusion.GaussianDiffusion
    config: Config
    meta: dict


def build(cfg: Config, device: str | torch.device | None = None):
    """A freshly initialised (model, diffusion) pair for ``cfg``."""
    from .diffusion import GaussianDiffusion
    from .nets.unet import UNet

    model = UNet.from_config(cfg.model, cfg.out_channels)
    if device is not None:
        model = model.to(device)
    return model, GaussianDiffusion.from_config(cfg.diffusion)


def load_weights(path: str | os.PathLike, weights: str = "ema") -> tuple[Path, dict, Config, dict]:
    """Read one set of weights and the config from a checkpoint file or run folder.

    Returns:
        (checkpoint file, state dict without prefix, validated Config, header meta).
    Raises:
        CheckpointError: unreadable/corrupt file, no config, an invalid config, or no such weights.
    """
    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
    file, tensors, meta = _read_newest(path, weights)
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


# A trainer may rotate the checkpoint a reader just resolved out of existence (keep_last) before
# the reader opens it; the reader then takes the newer one. Files are renamed into place
# complete, so whatever is read is never torn.
_READ_TRIES = 20


def _read_newest(path: str | os.PathLike, weights: str) -> tuple[Path, dict, dict]:
    """(file, tensors, meta) of the checkpoint ``path`` names, re-resolving a run folder when a
    training process deleted the resolved file in the meantime."""
    for attempt in range(_READ_TRIES):
        file = resolve_checkpoint(path)
        try:
            return (file, *load_checkpoint(file, prefixes=[f"{weights}/"]))
        except CheckpointError:
            if Path(path).is_dir() and not file.exists() and attempt < _READ_TRIES - 1:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def load(path: str | os.PathLike, device: str | torch.device | None = None, weights: str = "ema") -> Loaded:
    """Load a checkpoint file or a run folder (its latest checkpoint).

    Args:
        path: ``ckpt_*.safetensors`` (training or converted weights) or a run folder.
        device: defaults to CUDA when available, else CPU.
        weights: ``"ema"`` (default, used for all sampling and evaluation, paper Appendix B) or ``"model"``.
    Returns:
        :class:`Loaded` (model in eval mode, GaussianDiffusion, Config, header meta).
    """
    from .diffusion import GaussianDiffusion
    from .nets.unet import UNet

    file, state, cfg, meta = load_weights(path, weights)
    model = UNet.from_config(cfg.model, cfg.out_channels)
    load_state_strict(model, state, file)
    dev = choose_device(device)
    model = model.to(dev).eval()
    return Loaded(model, GaussianDiffusion.from_config(cfg.diffusion), cfg, meta)


def train(cfg: Config, out_dir: str | os.PathLike, resume: str | None = None, **kwargs) -> dict:
    """Train ``cfg`` into ``out_dir`` (see :func:`ddpm.training.loop.train`)."""
    from .training.loop import train as _train

    return _train(cfg, out_dir, resume=resume, **kwargs)
