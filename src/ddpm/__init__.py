"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, NeurIPS 2020).

Top-level names are imported lazily so that ``ddpm --help`` stays fast::

    from ddpm import GaussianDiffusion, get_beta_schedule, UNet, load, Config
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "get_beta_schedule": "ddpm.schedule",
    "GaussianDiffusion": "ddpm.diffusion",
    "UNet": "ddpm.nets.unet",
    "Config": "ddpm.config",
    "get_preset": "ddpm.config",
    "apply_overrides": "ddpm.config",
    "PRESETS": "ddpm.config",
    "load": "ddpm.api",
    "build": "ddpm.api",
    "train": "ddpm.api",
    "sample": "ddpm.sampling",
    "UserError": "ddpm.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
