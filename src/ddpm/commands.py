"""What each ``ddpm`` subcommand does, given its parsed arguments.

Handlers check everything they can (paths, ranges, checkpoint readability) before writing any
file, and raise :class:`UserError` for mistakes; :mod:`ddpm.cli` turns those into one line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from .atomic import atomic_write_json, atomic_write_npz
from .cliutil import amp_dtype as _amp, check_suffix as _check_suffix, count_parameters, device as _device
from .config import PRESET_HELP, PRESETS, Config, apply_overrides, get_preset
from .errors import UserError


# ---------------------------------------------------------------------------------------------- train

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
    from .datasets.survey import survey
    from .sizes import auto_resolution, check_resolution, config_for

    sv = survey(source)
    res = check_resolution(resolution) if resolution is not None else (
        sv.prepared_resolution or auto_resolution(sv.min_side))
    if sv.prepared_resolution is not None and res != sv.prepared_resolution:
        from .datasets.prepared import read_prepared

        read_prepared(source, res, verify=False)  # raises its one-line "prepared at NxN" DataError
    return config_for(res, sv.channels, size or _default_size(device), source)


def cmd_train(args: argparse.Namespace) -> None:
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
        from .options import MODEL_SIZES
        from .plan import build_plan

        note, family = "", cfg.preset.rstrip("0123456789")
        if args.preset is None and args.data is not None and args.resume is None and family in MODEL_SIZES:
            note = f" (size {family}; --size {'|'.join(MODEL_SIZES)}, --resolution N)"
        for line in build_plan(cfg, dev, preset=args.preset, size_note=note, world_size=world):
            print(line, flush=True)
    if args.dry_run:
        return
    from .training.loop import train

    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if result.get("stopped_by"):  # a graceful stop (SIGINT/SIGTERM): the trainer printed where to resume
        raise SystemExit(128 + int(result["stopped_by"]))
    if result.get("rank", 0) == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")


# ---------------------------------------------------------------------------------------------- sample

def cmd_sample(args: argparse.Namespace) -> None:
    from .cmd_distill import sample_distilled

    if sample_distilled(args):  # a distillation run or student file: DDIM on the student's kept steps
        return
    from .api import load
    from .images import grid_scale, save_grid, to_uint8
    from .sampling import sample
    from .speed import Speed

    out = _check_suffix(args.out, ".npz", "--out")
    grid = _check_suffix(args.grid, ".png", "--grid") if args.grid else out.with_suffix(".png")
    if args.conv == "winograd" and args.compile:
        raise UserError("--conv winograd cannot be combined with --compile (inductor compiles the direct "
                        "convolution); drop one of them")
    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    T = diffusion.num_timesteps
    if args.steps is not None and args.steps > T:
        raise UserError(f"--steps {args.steps}: the model was trained with T={T} steps; expected 1..{T}")
    if args.interp_t is not None and args.interp_t >= T:
        raise UserError(f"--interp-t {args.interp_t}: expected 0..{T - 1}")
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    pair = None
    if args.interpolate:  # read the two test images first: a bad --data must fail before any file is written
        from .data import load_images
        from .images import to_model

        pair = to_model(load_images(args.data or cfg.data.source, "test", cfg.model.resolution,
                                    cfg.model.in_channels, n=2), dev)
        if len(pair) < 2:
            raise UserError(f"--data {args.data or cfg.data.source}: --interpolate needs at least 2 test images")
    seeds = list(range(args.seed, args.seed + args.n))
    from .conditioning import class_grid, guided_call, sampling_labels

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
        from .analytic import load_or_estimate
        from .checkpoint import read_meta, resolve_checkpoint

        gamma = load_or_estimate(args.ckpt, model, diffusion, cfg, read_meta(resolve_checkpoint(args.ckpt)), dev,
                                 progress=not args.no_progress)
        var_options = {"var": "analytic", "gamma": gamma}
    if getattr(args, "order", None) is not None:
        if args.sampler in ("ancestral", "ddim"):
            raise UserError(f"--order applies to the solvers (unipc: 2 or 3), not --sampler {args.sampler}")
        var_options = {**(var_options or {}), "order": args.order}
    x = sample(diffusion, model, shape, seeds, batch_size=args.batch_size, sampler=args.sampler,
               steps=args.steps, eta=args.eta, model_kwargs=model_kwargs, guidance=guidance,
               sampler_options=var_options, spacing=getattr(args, "spacing", "trailing"),
               clip_denoised=getattr(args, "clip", "on") == "on", **common)
    images = to_uint8(x)
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
    stem = out.with_suffix("")
    if args.progressive or args.chains or args.interpolate:
        from .evaluate import figures

        scale = grid_scale(cfg.model.resolution)
        from .sampling import interpolate, sample_chains, sample_progressive

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


# ---------------------------------------------------------------------------------------------- eval

def _nll(args: argparse.Namespace):
    from .api import load
    from .data import load_images
    from .evaluate.nll import evaluate_nll

    out = _check_suffix(args.out, ".json", "--out")
    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    src = args.data or cfg.data.source
    labels = None
    if cfg.model.num_classes > 0:  # class-conditional bits/dim: -log2 p(x | y) with the data's labels
        import numpy as np

        from .conditioning import dataset_labels
        from .data import open_dataset

        ds = open_dataset(src, args.split, cfg.model.resolution, cfg.model.in_channels)
        count = len(ds) if args.n is None else min(int(args.n), len(ds))
        labels = dataset_labels(ds, cfg.model.num_classes, src)[:count]
        images = ds.take(np.arange(count))
    else:
        images = load_images(src, args.split, cfg.model.resolution, cfg.model.in_channels, n=args.n)
    result = evaluate_nll(model, diffusion, images, batch_size=args.batch_size, seed=args.seed, device=dev,
                          amp_dtype=_amp(args.precision), progress=not args.no_progress, labels=labels)
    what = " class-conditional" if labels is not None else ""
    return result, out, f"{src} ({args.split}, {len(images)} images{what})"


def cmd_eval(args: argparse.Namespace) -> None:
    if args.what == "nll" and args.var == "analytic":
        from .analytic import command_nll

        command_nll(args)
    elif args.what == "nll" and args.steps is not None:
        raise UserError("--steps needs --var analytic (the model's own bound runs all T steps)")
    elif args.what == "analytic":
        from .analytic import command_estimate

        command_estimate(args)
    elif args.what == "steps":
        from .evaluate.steps import command as steps_command

        steps_command(args)
    elif args.what == "nll":
        result, out, what = _nll(args)
        result.save(out)
        print(f"bits/dim on {what}: {result.total_bpd:.4f} ± {result.total_bpd_stderr:.4f} (stderr)  "
              f"prior {result.prior_bpd:.2e}  L0 (decoder) {result.decoder_bpd:.4f}  rate L1..LT {result.rate_bpd:.4f}")
        print(f"wrote {out}")
    elif args.what == "rd":
        from .evaluate.nll import NLLResult
        from .evaluate.rd import format_table, plot_rd, rate_distortion, save_rd

        if (args.ckpt is None) == (args.from_json is None):
            raise UserError("give exactly one of --ckpt (run a new pass) or --from NLL.json (reuse one)")
        if args.from_json is not None:
            out = _check_suffix(args.out, ".json", "--out")
            result, what = NLLResult.load(args.from_json), args.from_json
        else:
            result, out, what = _nll(args)
        rows = rate_distortion(result)
        csv, png = out.with_suffix(".csv"), out.with_suffix(".png")
        save_rd(rows, out, csv)
        plot_rd(rows, png)
        print(f"rate-distortion on {what}; total {result.total_bpd:.4f} bits/dim")
        print(format_table(rows, every=max(1, len(rows) // 10)))
        print(f"wrote {out}, {csv}, {png}")
    elif args.what == "fid":
        _eval_fid(args)
    elif args.what == "quality":
        _eval_quality(args)
    elif args.what == "guidance":
        _eval_guidance(args)


def _eval_guidance(args: argparse.Namespace) -> None:
    from .api import load
    from .evaluate.guidance import check_digits_model, guidance_sweep, parse_weights, save_guidance

    out = _check_suffix(args.out, ".json", "--out")
    weights = parse_weights(args.guidance)
    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    check_digits_model(cfg, str(args.ckpt))
    if args.steps is not None and args.steps > diffusion.num_timesteps:
        raise UserError(f"--steps {args.steps}: the model was trained with T={diffusion.num_timesteps} steps; "
                        f"expected 1..{diffusion.num_timesteps}")
    rows = guidance_sweep(model, diffusion, cfg, weights, args.n, seed=args.seed, batch_size=args.batch_size,
                          device=dev, amp_dtype=_amp(args.precision), sampler=args.sampler, steps=args.steps,
                          log=print, progress=not args.no_progress)
    meta = {"ckpt": str(args.ckpt), "n": args.n, "seed": args.seed, "sampler": args.sampler,
            "steps": args.steps or diffusion.num_timesteps, "precision": args.precision,
            "convention": "eps = eps_uncond + W (eps_cond - eps_uncond); Ho & Salimans w = W - 1"}
    paths = save_guidance(rows, out, meta)
    print("     W  agreement  Fréchet distance")
    for r in rows:
        print(f"{r['guidance']:6g}  {r['agreement']:9.3f}  {r['fd']:16.3f}")
    print(f"wrote {', '.join(str(p) for p in paths)}")


def _samples_from(args: argparse.Namespace, n: int):
    """uint8 NHWC samples: drawn from --ckpt, or read from --samples."""
    if (args.ckpt is None) == (args.samples is None):
        raise UserError("give exactly one of --ckpt (a model to sample from) or --samples (an .npz or folder)")
    if args.samples is not None:
        from .data import read_samples

        return read_samples(args.samples), None
    from .api import load
    from .evaluate.fid import generate_samples

    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    # split over ranks under torchrun (image k still uses seed SEED+k), gathered on every rank
    guidance = getattr(args, "guidance", None)
    if guidance is not None and cfg.model.num_classes == 0:
        raise UserError(f"--guidance: {args.ckpt} is an unconditional model (model.num_classes=0); "
                        f"guidance needs a class-conditional one")
    images = generate_samples(diffusion, model, n, shape, seed=args.seed, batch_size=args.batch_size, device=dev,
                              amp_dtype=_amp(args.precision), progress=True, num_classes=cfg.model.num_classes,
                              guidance=guidance)
    return images, cfg


def _eval_fid(args: argparse.Namespace) -> None:
    from .evaluate.fid import compute_fid

    out = _check_suffix(args.out, ".json", "--out")
    samples, cfg = _samples_from(args, args.n)
    ref = args.ref or (cfg.data.source if cfg is not None else None)
    if ref is None:
        raise UserError("--ref is required with --samples (the reference dataset, e.g. cifar-10-python.tar.gz)")
    res = compute_fid(samples, ref, split=args.split, cache_dir=args.cache_dir,
                      inception_weights=args.inception_weights, batch_size=args.batch_size, device=_device(args.device))
    atomic_write_json(out, res)
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    print(f"wrote {out}")


def _eval_quality(args: argparse.Namespace) -> None:
    from .evaluate.digits_quality import digits_quality, digits_reference

    out = _check_suffix(args.out, ".json", "--out")
    labels = None
    if args.samples is not None and args.guidance is not None:
        raise UserError("--guidance applies to samples drawn from --ckpt, not to --samples")
    if args.samples is not None:  # labelled samples (arr_1 beside arr_0, as ddpm sample --class writes)
        from .datasets.arrays import load_labels

        samples, _ = _samples_from(args, args.n)
        if str(args.samples).lower().endswith(".npz"):
            labels = load_labels(args.samples, len(samples))
    else:
        samples, labels = _quality_samples(args)
    res = digits_quality(samples, labels=labels)
    ref = digits_reference()
    res["reference"] = {k: ref[k] for k in ("test_accuracy", "train_vs_test", "noise_vs_test")}
    atomic_write_json(out, res)
    real, noise = ref["train_vs_test"], ref["noise_vs_test"]
    print(f"digits quality of {len(samples)} samples: Fréchet distance {res['fd']:.3f}, classifier confidence "
          f"{res['confidence']:.3f}, class balance {res['balance']:.3f}, class histogram {res['class_histogram']}")
    print(f"  for scale: real train digits score {real['fd']:.3f} / {real['confidence']:.3f} / {real['balance']:.3f}; "
          f"uniform noise {noise['fd']:.1f} / {noise['confidence']:.3f} / {noise['balance']:.3f}")
    if labels is not None:
        per = ", ".join("-" if a is None else f"{a:.2f}" for a in res["agreement_per_class"])
        print(f"  agreement with the requested class: {res['agreement']:.3f} overall; per class 0..9: {per}")
    print(f"wrote {out}")


def _quality_samples(args: argparse.Namespace):
    """(uint8 samples, labels or None) from --ckpt: balanced labels for a class-conditional model."""
    from .api import load

    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    if cfg.model.num_classes <= 0:
        if args.guidance is not None:
            raise UserError(f"--guidance needs a class-conditional model; {args.ckpt} is unconditional "
                            f"(model.num_classes=0)")
        return _samples_from(args, args.n)[0], None
    from .evaluate.guidance import check_digits_model, sample_labelled

    check_digits_model(cfg, str(args.ckpt))
    return sample_labelled(model, diffusion, cfg, args.n, 1.0 if args.guidance is None else args.guidance,
                           seed=args.seed, batch_size=args.batch_size, device=dev, amp_dtype=_amp(args.precision),
                           progress=True)


# ---------------------------------------------------------------------------------------------- convert/config

def cmd_convert(args: argparse.Namespace) -> None:
    from .interop.diffusers import from_diffusers_dir, to_diffusers_dir

    if args.direction == "from-diffusers":
        out = _check_suffix(args.out, ".safetensors", "OUT")
        path = from_diffusers_dir(args.src, out)
        print(f"wrote {path}; sample with: ddpm sample --ckpt {path}")
    else:
        path = to_diffusers_dir(args.src, args.out, weights=args.weights)
        print(f"wrote {path}; load with: UNet2DModel.from_pretrained({str(path)!r})")


def cmd_config(args: argparse.Namespace) -> None:
    if args.preset is None:
        if args.overrides:
            raise UserError("--set needs --preset")
        width = max(len(n) for n in PRESETS)
        for name in PRESETS:
            print(f"{name:<{width}}  {PRESET_HELP.get(name, '')}")
        return
    cfg = apply_overrides(get_preset(args.preset), list(args.overrides))
    print(cfg.to_json())


# ---------------------------------------------------------------------------------------------- data

def cmd_data(args: argparse.Namespace) -> None:
    """``ddpm data prepare SRC OUT.npy --resolution N [--channels C]`` (ddpm.datasets.prepared)."""
    from .datasets.prepared import labels_path, sidecar
    from .prepare import prepare
    from .datasets.survey import survey

    out = _check_suffix(args.out, ".npy", "OUT")
    for p in (out, sidecar(out), labels_path(out)):
        if p.exists():
            raise UserError(f"OUT {out}: '{p}' already exists; remove it or choose another OUT (nothing was written)")
    channels = args.channels if args.channels is not None else survey(args.src).channels
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="img", desc="prepare", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    try:
        meta = prepare(args.src, out, args.resolution, channels, log=print, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    names = meta["class_names"]
    print(f"wrote {out}: {meta['count']:,} images, uint8 [{meta['count']}, {meta['resolution']}, "
          f"{meta['resolution']}, {meta['channels']}]"
          + (f", {len(names)} classes from subfolders ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
             if names else "")
          + f"; description {sidecar(out)}; train with --data {out}")

