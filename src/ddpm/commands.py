"""What each ``ddpm`` subcommand does, given its parsed arguments.

Handlers check everything they can (paths, ranges, checkpoint readability) before writing any
file, and raise :class:`UserError` for mistakes; :mod:`ddpm.cli` turns those into one line.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import PRESET_HELP, PRESETS, Config, apply_overrides, get_preset
from .errors import UserError


# ---------------------------------------------------------------------------------------------- helpers

def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _amp(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def _check_suffix(path: str, suffix: str, option: str) -> Path:
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise UserError(f"{option} {path}: expected a {suffix} file name")
    if p.is_dir():
        raise UserError(f"{option} {path}: is a folder, expected a {suffix} file")
    return p


def _save_npz(path: Path, images: np.ndarray) -> None:
    """Atomically write uint8 NHWC images under key arr_0."""
    import io

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    atomic_write_bytes(path, buf.getvalue())


def _write_json(path: Path, obj) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _grid_scale(resolution: int) -> int:
    """Enlarge tiny images (8x8 digits) so the grid is viewable."""
    return max(1, 64 // resolution)


def count_parameters(cfg: Config) -> int:
    """Parameter count of the configured U-Net, built on the meta device (no memory)."""
    import torch

    from .nets.unet import UNet

    with torch.device("meta"):
        model = UNet.from_config(cfg.model, cfg.out_channels)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- train

def resolve_train_config(args: argparse.Namespace) -> Config:
    """Preset (or the run's own config.json when resuming without --preset) + --data + --set."""
    run_cfg = Path(args.out) / "config.json" if args.out else None
    if args.preset is None and args.resume is not None and run_cfg is not None and run_cfg.is_file():
        cfg = Config.from_json(run_cfg.read_text())
    else:
        cfg = get_preset("digits" if args.preset is None else args.preset)
    if args.data is not None:
        cfg = replace(cfg, data=replace(cfg.data, source=args.data))
    return apply_overrides(cfg, list(args.overrides))


def cmd_train(args: argparse.Namespace) -> None:
    cfg = resolve_train_config(args)
    out = Path(args.out or f"runs/{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; expected a run folder")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: no such checkpoint file (use 'auto' or a ckpt_*.safetensors path)")
    if args.dry_run:
        print(cfg.to_json())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"model: {count_parameters(cfg):,} parameters; output channels {cfg.out_channels}")
        print(f"run folder: {out}; world size {world}; per-rank batch {cfg.train.batch_size // max(world, 1)}")
        return
    _device(args.device)
    from .train.loop import train

    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if result.get("rank", 0) == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")


# ---------------------------------------------------------------------------------------------- sample

def cmd_sample(args: argparse.Namespace) -> None:
    from .api import load
    from .images import save_grid, to_uint8
    from .sampling import sample

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
    common = dict(device=dev, amp_dtype=_amp(args.precision), progress=not args.no_progress,
                  winograd={"auto": None, "winograd": True, "direct": False}[args.conv])
    x = sample(diffusion, model, shape, seeds, batch_size=args.batch_size, sampler=args.sampler,
               steps=args.steps, eta=args.eta, compile=args.compile, cuda_graph=args.cuda_graph, **common)
    images = to_uint8(x)
    _save_npz(out, images)
    save_grid(images[:64], grid, scale=_grid_scale(cfg.model.resolution))
    print(f"wrote {len(images)} samples to {out} (uint8 NHWC, key arr_0) and a grid to {grid}")
    stem = out.with_suffix("")
    if args.progressive or args.chains or args.interpolate:
        from .evaluate import figures

        scale = _grid_scale(cfg.model.resolution)
        from .sampling import interpolate, sample_chains, sample_progressive

        if args.progressive:
            n = min(args.n, 8)
            every = max(1, T // 10)
            _, xs, ts = sample_progressive(diffusion, model, shape, seeds[:n], every=every, **common)
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
    images = load_images(src, args.split, cfg.model.resolution, cfg.model.in_channels, n=args.n)
    result = evaluate_nll(model, diffusion, images, batch_size=args.batch_size, seed=args.seed, device=dev,
                          amp_dtype=_amp(args.precision), progress=not args.no_progress)
    return result, out, f"{src} ({args.split}, {len(images)} images)"


def cmd_eval(args: argparse.Namespace) -> None:
    if args.what == "nll":
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
    images = generate_samples(diffusion, model, n, shape, seed=args.seed, batch_size=args.batch_size, device=dev,
                              amp_dtype=_amp(args.precision), progress=True)
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
    _write_json(out, res)
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    print(f"wrote {out}")


def _eval_quality(args: argparse.Namespace) -> None:
    from .evaluate.digits_quality import digits_quality, digits_reference

    out = _check_suffix(args.out, ".json", "--out")
    samples, _ = _samples_from(args, args.n)
    res = digits_quality(samples)
    ref = digits_reference()
    res["reference"] = {k: ref[k] for k in ("test_accuracy", "train_vs_test", "noise_vs_test")}
    _write_json(out, res)
    real, noise = ref["train_vs_test"], ref["noise_vs_test"]
    print(f"digits quality of {len(samples)} samples: Fréchet distance {res['fd']:.3f}, classifier confidence "
          f"{res['confidence']:.3f}, class balance {res['balance']:.3f}, class histogram {res['class_histogram']}")
    print(f"  for scale: real train digits score {real['fd']:.3f} / {real['confidence']:.3f} / {real['balance']:.3f}; "
          f"uniform noise {noise['fd']:.1f} / {noise['confidence']:.3f} / {noise['balance']:.3f}")
    print(f"wrote {out}")


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
