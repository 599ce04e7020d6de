"""``ddpm encode``: deterministic DDIM latents of real images (Song et al. 2021, inversion).

Writes ``--out`` LATENTS.npz: ``arr_0`` float32 [N, C, H, W] latents, ``steps`` (K, 0 = all T),
``spacing``, ``num_timesteps``, ``inputs`` (uint8 NHWC) and ``arr_1`` labels for a conditional
model. Decode them with ``ddpm sample --ckpt C --x-T LATENTS.npz --sampler ddim --steps K --clip
off`` (the same K and spacing). ``--interpolate``: the first two images' latents slerped at
11 points and decoded, beside the DDPM paper's stochastic-encoder interpolation (section 4.4),
as OUT_interpolation.png.
"""

from __future__ import annotations

from pathlib import Path

from ..cliutil import amp_dtype, check_suffix, device as choose_device
from ..errors import UserError
from ..options import TIMESTEP_SPACINGS
from .args import NONNEG, POS, Formatter, add_model_args, float_at_least

HELP = "real images -> DDIM latents (deterministic inversion)"


def add_parser(sub):
    e = sub.add_parser("encode", help=HELP, formatter_class=Formatter,
                       description="Encode real images to DDIM latents x_T (Song et al. 2021; eta 0, clipping "
                                   "off). Decode with: ddpm sample --ckpt C --x-T LATENTS.npz --sampler ddim "
                                   "--steps K --clip off. The round trip improves as K grows. Ctrl-C stops "
                                   "(exit 130) without writing anything.")
    add_model_args(e)
    e.add_argument("--images", required=True, metavar="SRC",
                   help="test | train (the run's own data), an image folder, an image file, or .npz/.npy of uint8 "
                        "images at the model's size")
    e.add_argument("--out", required=True, metavar="LATENTS.npz", help="latents (float32 NCHW under arr_0)")
    e.add_argument("--steps", type=POS, default=None, help="K kept steps (default: all T)")
    e.add_argument("--spacing", default="trailing", choices=TIMESTEP_SPACINGS, help="which steps --steps keeps")
    e.add_argument("--n", type=POS, default=None, help="encode only the first N images (default: all)")
    e.add_argument("--resize", action="store_true",
                   help="convert, centre-crop and area-resize images of another size or channel count to the model's")
    e.add_argument("--class", dest="class_spec", default=None, metavar="C|C,C,...|all",
                   help="class labels for a class-conditional model (default: the images' own labels)")
    e.add_argument("--guidance", type=float_at_least(0.0), default=None, metavar="W", help="classifier-free guidance weight W")
    e.add_argument("--interpolate", action="store_true",
                   help="also decode a spherical interpolation of the first two images' latents (11 points) "
                        "beside the stochastic-encoder one (DDPM section 4.4), to OUT_interpolation.png")
    e.add_argument("--interp-t", type=NONNEG, default=None, help="0-based step of the stochastic-encoder row "
                                                                  "(default T/2)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    return e


def run(args) -> None:
    import numpy as np

    from ..api import load
    from ..atomic import atomic_write_npz
    from ..editing import ddim_invert
    from ..editio import labels_for, read_images
    from ..images import to_model

    out = check_suffix(args.out, ".npz", "--out")
    dev = choose_device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    T = diffusion.num_timesteps
    if args.steps is not None and not 2 <= args.steps <= T:
        raise UserError(f"--steps {args.steps}: the model was trained with T={T} steps; expected 2..{T}")
    if args.interp_t is not None and args.interp_t >= T:
        raise UserError(f"--interp-t {args.interp_t}: expected 0..{T - 1}")
    u8, data_labels = read_images(args.images, cfg.data.source, cfg.model.resolution, cfg.model.in_channels,
                                  resize=args.resize, n=args.n)
    if args.interpolate and len(u8) < 2:
        raise UserError(f"--interpolate needs at least 2 images; --images {args.images} gave {len(u8)}")
    if args.interpolate and cfg.model.num_classes > 0:
        raise UserError("--interpolate decodes unconditionally (as the DDPM paper's section 4.4); this checkpoint is "
                        "class-conditional: encode without --interpolate and decode with ddpm sample --x-T --class")
    kwargs, guidance, labels = labels_for(cfg.model.num_classes, args.class_spec, args.guidance, len(u8),
                                          data_labels, args.images)
    common = dict(batch_size=args.batch_size, device=dev, amp_dtype=amp_dtype(args.precision),
                  progress=not args.no_progress)
    x0 = to_model(u8)
    z = ddim_invert(diffusion, model, x0, steps=args.steps, spacing=args.spacing, model_kwargs=kwargs,
                    guidance=guidance, **common)
    interp_path = Path(f"{out.with_suffix('')}_interpolation.png")
    rows = _interpolation(diffusion, model, x0[:2], z[:2], args, T, common) if args.interpolate else None
    arrays = dict(arr_0=z.numpy(), steps=np.int64(args.steps or 0), spacing=np.array(args.spacing),
                  num_timesteps=np.int64(T), inputs=u8)
    if labels is not None:
        arrays["arr_1"] = labels
    atomic_write_npz(out, **arrays)
    K = args.steps or T
    print(f"wrote {len(z)} DDIM latents ({K} steps, {args.spacing}) to {out}; decode with: ddpm sample --ckpt "
          f"{args.ckpt} --x-T {out} --sampler ddim --steps {K} --spacing {args.spacing} --clip off")
    if rows is not None:
        from ..evaluate import figures
        from ..images import grid_scale

        figures.save_interpolation(x0[0], x0[1], rows, _LAMBDAS, interp_path, scale=grid_scale(cfg.model.resolution))
        print(f"wrote the interpolation of images 0 and 1 (row 1: DDIM latents, slerp; row 2: stochastic encoder "
              f"at t={args.interp_t if args.interp_t is not None else T // 2}, DDPM section 4.4) to {interp_path}")


_LAMBDAS = [i / 10 for i in range(11)]


def _interpolation(diffusion, model, pair, latents, args, T, common):
    """[2, 11, C, H, W]: DDIM-latent slerp decoded, and the stochastic encoder's mix (unconditional)."""
    import torch

    from ..editing import ddim_decode, slerp
    from ..sampling import interpolate

    kw = {k: common[k] for k in ("device", "amp_dtype", "progress")}
    ddim = ddim_decode(diffusion, model, slerp(latents[0], latents[1], _LAMBDAS), steps=args.steps,
                       spacing=args.spacing, **kw)
    t = args.interp_t if args.interp_t is not None else T // 2
    stoch = interpolate(diffusion, model, pair[0], pair[1], t, _LAMBDAS, args.seed, **kw)
    return torch.stack([ddim, stoch])
