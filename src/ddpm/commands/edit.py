"""``ddpm edit inpaint | sdedit``: edit real images with a trained checkpoint (no retraining).

``inpaint`` fills the white part of ``--mask`` (1/white = generate, 0/black = keep, as diffusers'
inpainting pipelines) with RePaint (Lugmayr et al. 2022; ``--resample 1`` is the replacement
method of Song et al. 2021), keeping every other pixel exactly; ``sdedit`` noises the images to
``--strength`` S and runs the reverse chain from there (Meng et al. 2022). The math lives in
:mod:`ddpm.editing`; this module reads, checks (everything before any file is written), runs and
writes ``--out`` (.npz: ``arr_0`` results uint8 NHWC, ``inputs``, ``mask`` for inpainting,
``arr_1`` class labels for a conditional model) and a PNG grid (input, masked input, result).
"""

from __future__ import annotations

import argparse

from ..cliutil import amp_dtype, check_suffix, device as choose_device
from ..errors import UserError
from ..options import MASK_REGIONS, TIMESTEP_SPACINGS
from .args import POS, Formatter, add_model_args, float_at_least, subcommands

HELP = "edit real images: inpaint (RePaint) or sdedit"


def _strength(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (1 = from pure noise), got {s!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--images", required=True, metavar="SRC",
                   help="test | train (the run's own data), an image folder, an image file, or .npz/.npy of uint8 "
                        "images [N, H, W, C] at the model's size")
    p.add_argument("--out", required=True, metavar="OUT.npz", help="results (uint8 NHWC under arr_0)")
    p.add_argument("--grid", default=None, metavar="PNG", help="comparison grid (default: OUT.png)")
    p.add_argument("--n", type=POS, default=None, help="edit only the first N images (default: all)")
    p.add_argument("--resize", action="store_true",
                   help="convert, centre-crop and area-resize images of another size or channel count to the "
                        "model's (default: refuse them)")
    p.add_argument("--steps", type=POS, default=None,
                   help="kept steps of a respaced chain (default: all T, the training chain)")
    p.add_argument("--spacing", default="trailing", choices=TIMESTEP_SPACINGS, help="which steps --steps keeps")
    p.add_argument("--class", dest="class_spec", default=None, metavar="K|K,K,...|all",
                   help="class labels for a class-conditional model (default: the images' own labels)")
    p.add_argument("--guidance", type=float_at_least(0.0), default=None, metavar="W",
                   help="classifier-free guidance weight W (1 = conditional, 0 = unconditional) (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub) -> argparse.ArgumentParser:
    """``ddpm edit`` with its methods ``inpaint`` and ``sdedit``."""
    from ..samplers import describe, names

    e = sub.add_parser("edit", help=HELP, formatter_class=Formatter,
                       description="Edit real images with a trained checkpoint, no retraining. Ctrl-C stops "
                                   "(exit 130) without writing anything.")
    esub = subcommands(e, "method", "METHOD")
    ip = esub.add_parser("inpaint", help="fill the white part of a mask (RePaint; --resample 1: replacement)",
                         formatter_class=Formatter,
                         description="Fill the white (1) part of --mask and keep the black (0) part exactly "
                                     "(RePaint, Lugmayr et al. 2022). --resample R --jump J: after every J steps go "
                                     "back up J steps and redo them, R times; R = 1 is the replacement method "
                                     "(Song et al. 2021), R = J = 10 the paper's default (about R times the "
                                     "network calls of sampling).")
    _common(ip)
    ip.add_argument("--mask", required=True, metavar="MASK",
                    help=f"what to generate (white/1) and keep (black/0): a mask image for all, a folder (one per "
                         f"image, sorted), a .npz/.npy ([H, W] or [N, H, W]), a region ({'|'.join(MASK_REGIONS)}) "
                         f"or random:P (each pixel generated with probability P, seeded per image)")
    ip.add_argument("--resample", type=POS, default=10, help="R, walks of each resampled block (1 = replacement)")
    ip.add_argument("--jump", type=POS, default=10, help="J, chain steps per jump back up")
    ip.add_argument("--sampler", default="ancestral", choices=("ancestral", "ddim"),
                    help="the reverse step (ancestral: Algorithm 2, as RePaint)")
    ip.add_argument("--eta", type=float_at_least(0.0), default=0.0, help="DDIM's eta (with --sampler ddim)")
    sd = esub.add_parser("sdedit", help="image to image: noise to --strength, then denoise (SDEdit)",
                         formatter_class=Formatter,
                         description="SDEdit (Meng et al. 2022): noise every image to t0 = round(S T) - 1 and run "
                                     "the reverse chain from there. Small S keeps layout and colours, S = 1 is "
                                     "plain sampling from that noise.")
    _common(sd)
    sd.add_argument("--strength", type=_strength, required=True, metavar="S", help="in (0, 1]; 0.4-0.6 is typical")
    sd.add_argument("--sampler", default="ancestral", choices=names(), metavar="NAME",
                    help="reverse process, one of: " + describe())
    sd.add_argument("--eta", type=float_at_least(0.0), default=0.0, help="DDIM's eta")
    sd.add_argument("--clip", default="on", choices=("on", "off"), help="clamp x0 predictions to [-1, 1]")
    return e


def _load(args):
    """Everything an edit needs, checked before anything is written."""
    from ..api import load
    from ..editio import labels_for, read_images

    out = check_suffix(args.out, ".npz", "--out")
    grid = check_suffix(args.grid, ".png", "--grid") if args.grid else out.with_suffix(".png")
    dev = choose_device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    T = diffusion.num_timesteps
    if args.steps is not None and not 2 <= args.steps <= T:
        raise UserError(f"--steps {args.steps}: the model was trained with T={T} steps; expected 2..{T}")
    res, ch = cfg.model.resolution, cfg.model.in_channels
    u8, data_labels = read_images(args.images, cfg.data.source, res, ch, resize=args.resize, n=args.n)
    kwargs, guidance, labels = labels_for(cfg.model.num_classes, args.class_spec, args.guidance, len(u8),
                                          data_labels, args.images)
    common = dict(steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, device=dev,
                  amp_dtype=amp_dtype(args.precision), progress=not args.no_progress, model_kwargs=kwargs,
                  guidance=guidance)
    seeds = list(range(args.seed, args.seed + len(u8)))
    return model, diffusion, u8, labels, seeds, common, out, grid


def _write(out, grid, results, inputs, labels, rows, names, extra: dict, what: str) -> None:
    from ..atomic import atomic_write_npz
    from ..editio import comparison_grid

    arrays = dict(arr_0=results, inputs=inputs, **extra)
    if labels is not None:
        arrays["arr_1"] = labels
    atomic_write_npz(out, **arrays)
    comparison_grid(rows, names, grid)
    print(f"wrote {len(results)} {what} to {out} (uint8 NHWC arr_0, inputs{', mask' if 'mask' in extra else ''}"
          f"{', labels arr_1' if labels is not None else ''}) and a grid ({', '.join(names)}) to {grid}")


def _inpaint(args) -> None:
    import torch

    from ..editing import inpaint
    from ..editing.masks import load_mask
    from ..images import to_model, to_uint8

    if args.eta != 0.0 and args.sampler != "ddim":
        raise UserError("--eta applies to --sampler ddim")
    model, diffusion, u8, labels, seeds, common, out, grid = _load(args)
    N, H, W, C = u8.shape
    gen = load_mask(args.mask, N, H, W, seeds)  # float32 [N, 1, H, W], 1 = generate
    x = inpaint(diffusion, model, to_model(u8), torch.from_numpy(gen), seeds, resample=args.resample,
                jump=args.jump, sampler=args.sampler, eta=args.eta, **common)
    result = to_uint8(x)
    gen_hwc = gen.transpose(0, 2, 3, 1).astype(bool).repeat(C, axis=3)
    masked = u8.copy()
    masked[gen_hwc] = 128
    _write(out, grid, result, u8, labels, [u8, masked, result], ["input", "masked", "result"],
           {"mask": gen[:, 0].astype("uint8")}, f"inpainted images (R={args.resample}, J={args.jump})")


def _sdedit(args) -> None:
    from ..editing import sdedit
    from ..images import to_model, to_uint8

    model, diffusion, u8, labels, seeds, common, out, grid = _load(args)
    x = sdedit(diffusion, model, to_model(u8), args.strength, seeds, sampler=args.sampler, eta=args.eta,
               clip_denoised=args.clip == "on", **common)
    result = to_uint8(x)
    _write(out, grid, result, u8, labels, [u8, result], ["input", f"S={args.strength:g}"], {},
           f"SDEdit results (strength {args.strength:g}, {args.sampler})")


def run(args) -> None:
    {"inpaint": _inpaint, "sdedit": _sdedit}[args.method](args)
