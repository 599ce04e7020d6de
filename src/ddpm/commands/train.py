"""``ddpm train``: a preset, or one's own images (``--data`` with the size family), the plan printed
first, then the trainer (:func:`ddpm.training.loop.train`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from ..cliutil import count_parameters, device as _device
from ..config import Config, apply_overrides, get_preset
from ..errors import UserError
from ..options import MODEL_SIZES
from .args import POS, Formatter

HELP = "train a model from a preset"


def add_parser(sub) -> argparse.ArgumentParser:
    from ..sizes import RESOLUTIONS

    t = sub.add_parser("train", help=HELP, formatter_class=Formatter,
                       description="Train a DDPM. Runs on one process, or under torchrun on many GPUs/nodes. "
                                   "Ctrl-C or SIGTERM stops after the step in flight with a checkpoint of it "
                                   "(exit 130/143; continue with --resume auto). One trainer per run folder.")
    t.add_argument("--preset", default=None,
                   help="named config, see `ddpm config show` (default: digits, or the run's own config.json "
                        "when resuming)")
    t.add_argument("--data", default=None, metavar="SRC",
                   help="digits, a cifar-10-python.tar.gz archive or folder, an image folder, or .npz/.npy "
                        "(default: the preset's)")
    t.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder (default: runs/<preset>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set train.lr=1e-4 --set model.dropout=0; repeatable")
    t.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest good checkpoint in RUN_DIR (auto) or from a checkpoint file")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan (data, model, time and memory per step from a "
                        "warm-up step), then exit")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--size", default=None, choices=MODEL_SIZES,
                   help="with --data and no --preset: the network's size family (tiny: minutes on a CPU; small: "
                        "one GPU; base: the paper's width) (default: tiny on a CPU, small on a GPU)")
    t.add_argument("--resolution", type=POS, default=None, metavar="N",
                   help=f"with --data and no --preset: train at NxN ({', '.join(map(str, RESOLUTIONS))}) "
                        "(default: the largest of these not above the smallest image's shorter side, at most 256)")
    return t


def resolve_train_config(args: argparse.Namespace) -> Config:
    """Preset (or the run's own config.json when resuming without --preset) + --data + --set.

    ``--data X`` without ``--preset`` fits the model to X (:mod:`ddpm.sizes`: channels and
    resolution from the data, ``--size``/``--resolution``); ``--data digits`` alone keeps the
    digits preset, that data's own configuration.
    """
    run_cfg = Path(args.out) / "config.json" if args.out else None
    size, resolution = getattr(args, "size", None), getattr(args, "resolution", None)
    if args.preset is not None and (size is not None or resolution is not None):
        raise UserError("--size/--resolution choose the model for --data without --preset; with --preset "
                        "use --set model.resolution=... --set model.ch_mult=...")
    if args.preset is None and args.resume is not None and run_cfg is not None and run_cfg.is_file():
        cfg = Config.from_json(run_cfg.read_text())
    elif args.preset is None and args.data is not None and (args.data != "digits" or size or resolution):
        cfg = _config_from_data(args.data, size, resolution, getattr(args, "device", None))
    else:
        if size is not None or resolution is not None:
            raise UserError("--size/--resolution need --data (a folder or file of your images)")
        cfg = get_preset("digits" if args.preset is None else args.preset)
    if args.data is not None:
        cfg = replace(cfg, data=replace(cfg.data, source=args.data))
    return apply_overrides(cfg, list(args.overrides))


def _default_size(device: str | None) -> str:
    """tiny on a CPU (minutes), small on a GPU (hours): a first run that finishes."""
    import torch

    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    return "small" if cuda else "tiny"


def _config_from_data(source: str, size: str | None, resolution: int | None, device: str | None) -> Config:
    """The run for one's own images (ddpm.sizes): channels and resolution from the data."""
    from ..datasets.survey import survey
    from ..sizes import auto_resolution, check_resolution, config_for

    sv = survey(source)
    res = check_resolution(resolution) if resolution is not None else (
        sv.prepared_resolution or auto_resolution(sv.min_side))
    if sv.prepared_resolution is not None and res != sv.prepared_resolution:
        from ..datasets.prepared import read_prepared

        read_prepared(source, res, verify=False)  # raises its one-line "prepared at NxN" DataError
    return config_for(res, sv.channels, size or _default_size(device), source)


def run(args: argparse.Namespace) -> None:
    cfg = resolve_train_config(args)
    out = Path(args.out or f"runs/{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; expected a run folder")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: no such checkpoint file (use 'auto' or a ckpt_*.safetensors path)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        print(cfg.to_json())
        print(f"model: {count_parameters(cfg):,} parameters; output channels {cfg.out_channels}")
        print(f"run folder: {out}; world size {world}; per-rank batch {cfg.train.batch_size // max(world, 1)}")
    dev = _device(args.device)
    if int(os.environ.get("RANK", "0")) == 0:  # the plan: once, before the first step (ddpm.plan)
        from ..options import MODEL_SIZES
        from ..plan import build_plan

        note, family = "", cfg.preset.rstrip("0123456789")
        if args.preset is None and args.data is not None and args.resume is None and family in MODEL_SIZES:
            note = f" (size {family}; --size {'|'.join(MODEL_SIZES)}, --resolution N)"
        for line in build_plan(cfg, dev, preset=args.preset, size_note=note, world_size=world):
            print(line, flush=True)
    if args.dry_run:
        return
    from ..training.loop import train

    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if result.get("stopped_by"):  # a graceful stop (SIGINT/SIGTERM): the trainer printed where to resume
        raise SystemExit(128 + int(result["stopped_by"]))
    if result.get("rank", 0) == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
