"""Small helpers shared by the command handlers (the modules of :mod:`ddpm.commands`, ``ddpm eval analytic``,
``ddpm eval steps``, the training plan). They sit below every command module, so no handler has
to import another's module (and the import graph stays acyclic)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def device(name: str | None):
    """The ``--device`` option as a ``torch.device`` (:func:`ddpm.distributed.choose_device`)."""
    from .distributed import choose_device

    return choose_device(name)


def amp_dtype(precision: str):
    """The autocast dtype of a ``--precision`` value: bf16 -> torch.bfloat16, fp32 -> None."""
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def check_suffix(path: str, suffix: str, option: str) -> Path:
    """``path`` as a Path if it names a ``suffix`` file (not a folder); a one-line UserError otherwise."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise UserError(f"{option} {path}: expected a {suffix} file name")
    if p.is_dir():
        raise UserError(f"{option} {path}: is a folder, expected a {suffix} file")
    return p


def count_parameters(cfg) -> int:
    """Parameter count of the configured U-Net (a :class:`ddpm.config.Config`), built on the meta
    device (no memory)."""
    import torch

    from .nets.unet import UNet

    with torch.device("meta"):
        model = UNet.from_config(cfg.model, cfg.out_channels)
    return sum(p.numel() for p in model.parameters())
