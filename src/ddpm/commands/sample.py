"""``ddpm sample``: images from a checkpoint with any registered sampler (uint8 NHWC ``arr_0`` in an
.npz and a PNG grid), and the paper's figures 6-9 on request."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import atomic_write_npz
from ..cliutil import amp_dtype as _amp, check_suffix as _check_suffix
from ..errors import UserError
from ..options import CLIP_CHOICES, CONV_MODES, REVERSE_VARIANCES, TIMESTEP_SPACINGS
from .args import NONNEG, POS, Formatter, add_model_args, add_resume_args, command_identity, float_at_least

HELP = "draw samples from a checkpoint"


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("sample", help=HELP, formatter_class=Formatter,
                       description="Sample with Algorithm 2 (ancestral), DDIM or another registered sampler. Writes uint8 NHWC arrays "
                                   "under key arr_0 (the ADM evaluator's convention) and a PNG grid. A distillation run (ddpm "
                                   "distill) samples its student on the student's own kept steps: --sampler ancestral "
                                   "(the default) is the stochastic walk of Meng et al. 2023, --sampler ddim the "
                                   "deterministic DDIM walk (with --eta).")
    add_model_args(s)
    s.add_argument("--n", type=POS, default=64, help="number of images")
    from .. import samplers  # the registry: one entry per sampler module (imports torch)

    s.add_argument("--sampler", default="ancestral", choices=samplers.names(), metavar="NAME",
                   help="reverse process, one of: " + samplers.describe())
    s.add_argument("--steps", type=POS, default=None, help="network calls per image (default: all T; fewer "
                   "respace the chain, see --spacing)")
    s.add_argument("--eta", type=float_at_least(0.0), default=0.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--spacing", default="auto", choices=TIMESTEP_SPACINGS,
                   help="which timesteps a --steps chain keeps. auto: the one measured best for --sampler at "
                        "--steps calls (ddpm.autospacing; trailing where not measured); quadratic: DDIM's n ~ k^2; "
                        "logsnr: uniform in log-SNR")
    s.add_argument("--order", type=POS, default=None,
                   help="solver order for samplers that offer one (unipc: 2 or 3)")
    s.add_argument("--clip", default="on", choices=[c for c in CLIP_CHOICES if c != "both"],
                   help="clamp every x0 prediction to [-1, 1] (the official sampler does; diffusers' solvers do not)")
    s.add_argument("--var", default="model", choices=REVERSE_VARIANCES,
                   help="ancestral/ddim step variance: the model's own, or analytic = Analytic-DPM's optimal one "
                        "(Bao et al. 2022; Gamma_n estimated on first use, stored as RUN/checkpoints/analytic_var.json)")
    s.add_argument("--class", dest="class_spec", default=None, metavar="K|K,K,...|all",
                   help="class-conditional models: one class, a list (cycled over the images) or all "
                        "(image k gets class k mod C); labels go to the .npz as arr_1 (default: all)")
    s.add_argument("--guidance", type=float_at_least(0.0), default=None, metavar="W",
                   help="classifier-free guidance: eps = eps_uncond + W (eps_cond - eps_uncond); W = 1 plain "
                        "conditional (default), 0 unconditional, > 1 sharper and less diverse (Ho & Salimans' "
                        "w is W - 1)")
    s.add_argument("--out", default="samples.npz", metavar="FILE.npz", help="samples file")
    s.add_argument("--grid", default=None, metavar="FILE.png", help="PNG grid of the first 64 samples "
                   "(default: the --out path with .png)")
    s.add_argument("--progressive", action="store_true",
                   help="also write <out>_progressive.png: x0 predicted along the reverse process (Fig. 6)")
    s.add_argument("--chains", action="store_true",
                   help="also write <out>_chains.png: samples sharing x_T and noise until a split step (Fig. 7)")
    s.add_argument("--x-T", dest="x_T", default=None, metavar="LATENTS.npz",
                   help="start from these latents x_T (float [N, C, H, W], e.g. DDIM latents of real images from "
                        "ddpm encode: decode them with --sampler ddim --steps K --clip off) instead of the seeds' "
                        "noise; --n is then the number of latents")
    s.add_argument("--interpolate", action="store_true",
                   help="also write <out>_interpolation.png: two test images mixed at step t (Fig. 8/9)")
    s.add_argument("--interp-t", type=NONNEG, default=None, help="0-based step for --interpolate (default T/2)")
    s.add_argument("--data", default=None, metavar="SRC", help="test images for --interpolate (default: the run's)")
    s.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (pays off for long runs and on GPUs)")
    s.add_argument("--cuda-graph", action="store_true", help="on CUDA, replay each step from a CUDA graph")
    s.add_argument("--conv", default="auto", choices=CONV_MODES,
                   help="3x3 convolutions on the CPU (eager float32): auto = decided with the memory layout by "
                        "timing whole network calls at this batch once per machine and thread count (-v shows "
                        "the choice and the timings), and within Winograd F(4x4,3x3) each layer shape where it "
                        "is faster than oneDNN's direct convolution (cached in ~/.cache/ddpm; DDPM_AUTOTUNE=0 "
                        "turns the timing off and uses Winograd for >= 128 channels); winograd = always for "
                        ">= 128 channels (rounding a few times the direct one's); direct = oneDNN")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_resume_args(s)  # --chunk-size, --overwrite (ddpm.chunks)
    return s


def run(args: argparse.Namespace) -> None:
    from .distill import sample_distilled

    if sample_distilled(args):  # a distillation run or student file: its kept steps (stochastic or DDIM)
        return
    from ..api import load
    from ..images import grid_scale, save_grid
    from ..speed import Speed

    out = _check_suffix(args.out, ".npz", "--out")
    grid = _check_suffix(args.grid, ".png", "--grid") if args.grid else out.with_suffix(".png")
    if args.conv == "winograd" and args.compile:
        raise UserError("--conv winograd cannot be combined with --compile (inductor compiles the direct "
                        "convolution); drop one of them")
    from .. import distributed as D

    env = D.setup(args.device)  # under torchrun: join the group; rank r draws the chunks c mod W == r
    dev = env.device
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    T = diffusion.num_timesteps
    if args.steps is not None and args.steps > T:
        raise UserError(f"--steps {args.steps}: the model was trained with T={T} steps; expected 1..{T}")
    if args.interp_t is not None and args.interp_t >= T:
        raise UserError(f"--interp-t {args.interp_t}: expected 0..{T - 1}")
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    pair = None
    if args.interpolate:  # read the two test images first: a bad --data must fail before any file is written
        from ..data import load_images
        from ..images import to_model

        pair = to_model(load_images(args.data or cfg.data.source, "test", cfg.model.resolution,
                                    cfg.model.in_channels, n=2), dev)
        if len(pair) < 2:
            raise UserError(f"--data {args.data or cfg.data.source}: --interpolate needs at least 2 test images")
    x_T = None
    if args.x_T:  # given latents (e.g. ddpm encode's): one image per latent, the step noise still per seed
        from ..editio import latents_note, read_latents

        x_T, meta = read_latents(args.x_T, shape)
        args.n = len(x_T)
        note = latents_note(meta, args.steps, args.spacing, args.sampler, args.clip == "on", T)
        if note:
            print(note)
    seeds = list(range(args.seed, args.seed + args.n))
    from ..conditioning import class_grid, guided_call, sampling_labels

    labels, weight = sampling_labels(cfg.model.num_classes, args.class_spec, args.guidance, len(seeds),
                                     what=str(args.ckpt))
    model_kwargs, guidance = guided_call(labels, weight, cfg.model.num_classes)
    speed = Speed(compile=args.compile, cuda_graph=args.cuda_graph,
                  winograd={"auto": None, "winograd": True, "direct": False}[args.conv])
    common = dict(device=dev, amp_dtype=_amp(args.precision), progress=not args.no_progress, speed=speed)
    var_options = None
    if getattr(args, "var", "model") == "analytic":  # Analytic-DPM: Gamma_n stored beside the checkpoint
        if args.sampler not in ("ancestral", "ddim"):
            raise UserError(f"--var analytic applies to --sampler ancestral or ddim, not {args.sampler!r}")
        from ..analytic import load_or_estimate
        from ..checkpoint import read_meta, resolve_checkpoint

        gamma = load_or_estimate(args.ckpt, model, diffusion, cfg, read_meta(resolve_checkpoint(args.ckpt)), dev,
                                 progress=not args.no_progress)
        var_options = {"var": "analytic", "gamma": gamma}
    if getattr(args, "order", None) is not None:
        if args.sampler in ("ancestral", "ddim"):
            raise UserError(f"--order applies to the solvers (unipc: 2 or 3), not --sampler {args.sampler}")
        var_options = {**(var_options or {}), "order": args.order}
    spacing = getattr(args, "spacing", "auto")
    if spacing == "auto" and args.steps is not None and env.is_main:
        from ..autospacing import resolve_spacing

        print(f"spacing: auto -> {resolve_spacing(spacing, args.sampler, args.steps)} "
              f"(measured best for {args.sampler} at {args.steps} network calls)")
    from ..chunks import finish, run_chunked, sampling_chunks

    # finished chunks kept in OUT.parts/: the same command continues after a kill (ddpm.chunks)
    make = sampling_chunks(diffusion, model, shape, args.seed, labels=labels, model_kwargs=model_kwargs,
                           sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=guidance,
                           sampler_options=var_options, spacing=spacing,
                           clip_denoised=getattr(args, "clip", "on") == "on", x_T=x_T,
                           **{**common, "progress": False})
    images = run_chunked(out, command_identity(args, dev), args.n, make, batch_size=args.batch_size,
                         chunk=args.chunk_size, overwrite=args.overwrite, progress=not args.no_progress,
                         write_out=False)["arr_0"]
    if not env.is_main:  # rank 0 writes the file, the grid and the figures
        D.teardown(env)
        return
    if labels is None:
        atomic_write_npz(out, arr_0=images)  # uint8 NHWC under arr_0
        save_grid(images[:64], grid, scale=grid_scale(cfg.model.resolution))
        print(f"wrote {len(images)} samples to {out} (uint8 NHWC, key arr_0) and a grid to {grid}")
    else:  # labels beside the images (the ADM evaluator's arr_1); the grid has one row per class
        atomic_write_npz(out, arr_0=images, arr_1=labels)
        cells, cols = class_grid(images, labels)
        save_grid(cells, grid, nrow=cols, scale=grid_scale(cfg.model.resolution))
        print(f"wrote {len(images)} samples of classes {sorted(set(labels.tolist()))} at guidance W={weight:g} to "
              f"{out} (uint8 NHWC arr_0, int64 labels arr_1) and a grid (one row per class) to {grid}")
    finish(out)  # OUT is complete: its chunks go
    D.teardown(env)  # (a no-op without torchrun)
    stem = out.with_suffix("")
    if args.progressive or args.chains or args.interpolate:
        from ..evaluate import figures

        scale = grid_scale(cfg.model.resolution)
        from ..sampling import interpolate, sample_chains, sample_progressive

        if args.progressive:
            n = min(args.n, 8)
            every = max(1, T // 10)
            kw = {} if model_kwargs is None else {"model_kwargs": {k: v[:n] for k, v in model_kwargs.items()},
                                                  "guidance": guidance}
            _, xs, ts = sample_progressive(diffusion, model, shape, seeds[:n], every=every, **kw, **common)
            path = Path(f"{stem}_progressive.png")
            figures.save_progressive(xs, ts, path, scale=scale)
            print(f"wrote progressive x0 predictions (Fig. 6) to {path}")
        if args.chains:
            splits = tuple(int(T * f) for f in (0.0, 0.25, 0.5, 0.75))
            xc = sample_chains(diffusion, model, shape, args.seed, 8, split_steps=splits, **common)
            path = Path(f"{stem}_chains.png")
            figures.save_chains(xc, splits, path, scale=scale)
            print(f"wrote shared-latent chains (Fig. 7) to {path}")
        if args.interpolate:
            t = args.interp_t if args.interp_t is not None else T // 2
            lambdas = [i / 10 for i in range(11)]
            xi = interpolate(diffusion, model, pair[0], pair[1], t, lambdas, args.seed, **common)
            path = Path(f"{stem}_interpolation.png")
            figures.save_interpolation(pair[0], pair[1], xi, lambdas, path, scale=scale)
            print(f"wrote interpolation at t={t} (Fig. 8/9) to {path}")
