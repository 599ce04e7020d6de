"""``ddpm distill``: progressive distillation of a checkpoint (Salimans & Ho, ICLR 2022,
Algorithm 2) into students of fewer and fewer DDIM steps; and the hook through which
``ddpm sample --ckpt RUN [--steps K]`` samples a distilled run with its K-step student.

"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .args import Formatter

HELP = "progressive distillation: a student that samples in a few network calls (Salimans & Ho 2022)"


def add_parser(sub) -> argparse.ArgumentParser:
    from ..distill.settings import DEFAULT_PHASE_STEPS, DEFAULT_STEPS

    d = sub.add_parser("distill", help=HELP, formatter_class=Formatter,
                       description="Distil a model (a run folder or checkpoint file, also one converted from "
                                   "diffusers) into a v-prediction student that takes one deterministic DDIM step "
                                   "where its teacher took two, halving from --start steps down to --steps. Each "
                                   "phase's student is kept (RUN/students/steps_NNNN.safetensors): ddpm sample "
                                   "--ckpt RUN samples the last one, --steps K picks another. Interruptible "
                                   "(Ctrl-C: exit 130, checkpoint of the step in flight); running the same command "
                                   "again continues exactly where it stopped (options not given keep the run's own settings, "
                                   "whatever the defaults are now), and a smaller --steps appends phases.")
    d.add_argument("--ckpt", required=True, metavar="TEACHER", help="teacher: checkpoint file or run folder")
    d.add_argument("--out", required=True, metavar="RUN", help="distillation run folder (created, or continued)")
    d.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"the last student's DDIM steps, a power of two (default: {DEFAULT_STEPS})")
    d.add_argument("--start", type=int, default=None,
                   help="the first teacher chain's DDIM steps, a power of two <= T (default: min(16, largest "
                        "power of two <= T))")
    d.add_argument("--phase-steps", type=int, default=None,
                   help=f"optimiser steps per halving phase (default: {DEFAULT_PHASE_STEPS})")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate of each phase, linear decay to 0 "
                   "(default: half the teacher's train.lr)")
    d.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: half the teacher's train.batch_size)")
    d.add_argument("--ema-decay", type=float, default=None,
                   help="student EMA decay (default: min(teacher's, 1 - 10/phase-steps))")
    d.add_argument("--v-warmup", type=int, default=None,
                   help="optimiser steps of a 1:1 phase distilling the teacher into the v parameterisation before "
                        "the first halving (default: 4/9 of --phase-steps, 1,600 at the default; 0: none, the first halving then starts "
                        "from the teacher's weights read as v)")
    d.add_argument("--snr-floor", type=float, default=None,
                   help="loss weight max(SNR_t, floor) on the x0 error (default: 0.01; Salimans & Ho's truncated "
                        "SNR is 1, which measured worse on the digits model, see README)")
    d.add_argument("--seed", type=int, default=None, help="seed of the data order, noise and positions (default: 0)")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return d


def run(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from ..api import load_weights
    from ..distill import distill, is_distilled_run
    from ..distill.files import TEACHER, stored_settings
    from ..distill.settings import default_settings

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; expected a distillation run folder")
    src = Path(args.ckpt)
    if not src.exists():
        raise UserError(f"--ckpt {args.ckpt}: no such checkpoint file or run folder")
    given = dict(steps=args.steps, start=args.start, phase_steps=args.phase_steps, lr=args.lr,
                 batch_size=args.batch_size, ema_decay=args.ema_decay, v_warmup=args.v_warmup, seed=args.seed,
                 snr_floor=args.snr_floor)
    if is_distilled_run(out):
        # a continued run: what was not given is the run's own (distill.json), so a run started
        # under other defaults continues with the same command
        teacher_cfg = load_weights(out / TEACHER)[2]
        settings = replace(stored_settings(out), **{k: v for k, v in given.items() if v is not None})
        settings = settings.check(teacher_cfg.diffusion.num_timesteps)
    else:  # the teacher's config gives the defaults
        settings = default_settings(load_weights(src)[2], **given)
    result = distill(src, out, settings, device=args.device, progress=not args.no_progress)
    if result.get("stopped_by"):
        raise SystemExit(128 + int(result["stopped_by"]))
    print(f"done: {result['steps']}-step student {result['student']}; sample it with "
          f"ddpm sample --ckpt {out}" + ("" if result["steps"] is None else " (--steps K for another phase's)"))


def sample_distilled(args: argparse.Namespace) -> bool:
    """``ddpm sample`` on a distillation run folder or student file, on the student's kept indices
    (its step count: the last student, or ``--steps``): ``--sampler ancestral`` (the default) is the
    stochastic walk of Meng et al. 2023, ``--sampler ddim`` Salimans & Ho's deterministic DDIM (with
    ``--eta``; what a diffusers export samples). False for any other checkpoint."""
    from ..distill import choose_student

    choice = choose_student(args.ckpt, args.steps)
    if choice is None:
        return False
    path, kept = choice
    for flag in ("progressive", "chains", "interpolate"):
        if getattr(args, flag, False):
            raise UserError(f"--{flag} is not available for a distilled student ({path}); sample its teacher")
    sampler = getattr(args, "sampler", "ancestral")
    if sampler not in ("ddim", "ancestral") or getattr(args, "var", "model") != "model":
        raise UserError(f"--sampler/--var: a distilled student samples on its {len(kept)} kept steps with "
                        f"--sampler ancestral (stochastic, the default) or ddim (deterministic) only ({path})")
    eta = float(getattr(args, "eta", 0.0) or 0.0)
    if sampler == "ancestral" and eta != 0:
        raise UserError(f"--eta {eta:g}: applies to --sampler ddim; a student's default walk (ancestral) is "
                        f"stochastic already ({path})")
    from ..api import load
    from ..atomic import atomic_write_npz
    from ..cliutil import amp_dtype, check_suffix, device
    from ..conditioning import class_grid, guided_call, sampling_labels
    from ..distill import sample_student
    from ..images import grid_scale, save_grid, to_uint8

    out = check_suffix(args.out, ".npz", "--out")
    grid = check_suffix(args.grid, ".png", "--grid") if args.grid else out.with_suffix(".png")
    dev = device(args.device)
    model, diffusion, cfg, _ = load(path, device=dev)
    seeds = list(range(args.seed, args.seed + args.n))
    labels, weight = sampling_labels(cfg.model.num_classes, args.class_spec, args.guidance, len(seeds), what=str(path))
    model_kwargs, guidance = guided_call(labels, weight, cfg.model.num_classes)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    x = sample_student(model, diffusion, kept, shape, seeds, batch_size=args.batch_size, device=dev,
                       model_kwargs=model_kwargs, guidance=guidance, clip=getattr(args, "clip", "on") == "on",
                       amp_dtype=amp_dtype(args.precision), eta=eta, stochastic=sampler == "ancestral",
                       progress=not args.no_progress)
    images = to_uint8(x)
    walk = "stochastic" if sampler == "ancestral" else ("DDIM" + (f" eta {eta:g}" if eta else ""))
    what = f"{len(kept)}-step student {path} (kept steps {list(kept)}, {walk})"
    if labels is None:
        atomic_write_npz(out, arr_0=images)
        save_grid(images[:64], grid, scale=grid_scale(cfg.model.resolution))
    else:
        atomic_write_npz(out, arr_0=images, arr_1=labels)
        cells, cols = class_grid(images, labels)
        save_grid(cells, grid, nrow=cols, scale=grid_scale(cfg.model.resolution))
    print(f"wrote {len(images)} samples of the {what} to {out} and a grid to {grid}")
    return True
