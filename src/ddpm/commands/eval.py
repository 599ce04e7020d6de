"""``ddpm eval nll|rd|analytic|steps|fid|quality|guidance``: bits/dim, rate-distortion, Analytic-DPM,
quality against network calls, FID/IS/KID, the digits measure and guidance sweeps."""

from __future__ import annotations

import argparse

from ..atomic import atomic_write_json
from ..cliutil import amp_dtype as _amp, check_suffix as _check_suffix, device as _device
from ..errors import UserError
from ..options import CLIP_CHOICES, REVERSE_VARIANCES, SAMPLE_PRECISIONS, SPLITS
from .args import (NONNEG, POS, Formatter, Parser, add_model_args, add_resume_args, command_identity,
                   float_at_least)

HELP = "bits/dim, rate-distortion, FID/IS/KID, digits quality"


def add_parser(sub) -> argparse.ArgumentParser:
    from .. import samplers

    e = sub.add_parser("eval", help=HELP, formatter_class=Formatter)
    esub = e.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser)
    esub.required = True
    for name, helptext in (("nll", "exact bits/dim: all T terms plus the prior (paper section 4.2, Table 1)"),
                           ("rd", "rate-distortion curve (paper Table 4, Fig. 5) from the same pass")):
        q = esub.add_parser(name, help=helptext, formatter_class=Formatter, description=helptext)
        add_model_args(q, required=(name == "nll"))
        if name == "rd":
            q.add_argument("--from", dest="from_json", default=None, metavar="NLL.json",
                           help="reuse the per-step terms saved by `ddpm eval nll` instead of a new pass")
        q.add_argument("--data", default=None, metavar="SRC", help="dataset (default: the run's)")
        q.add_argument("--split", default="test", choices=SPLITS, help="dataset split")
        q.add_argument("--n", type=POS, default=None, help="number of images (default: the whole split)")
        q.add_argument("--out", default=f"{name}.json", metavar="FILE.json",
                       help="results; rd also writes FILE.csv and FILE.png")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "nll":
            q.add_argument("--var", default="model", choices=REVERSE_VARIANCES,
                           help="analytic: the bound with Analytic-DPM's variance in every term, beside both fixed "
                                "variances from the same pass (paired; a different JSON than the model's own)")
            q.add_argument("--steps", type=POS, default=None,
                           help="with --var analytic: the bound of a respaced chain of this many steps (trailing)")
    an = esub.add_parser("analytic", help="estimate Analytic-DPM's Gamma_n over training images (RUN/checkpoints/analytic_var.json)",
                         formatter_class=Formatter)
    add_model_args(an)
    an.add_argument("--n", type=POS, default=500, help="training images (one noise draw each per step)")
    an.add_argument("--data", default=None, metavar="SRC", help="training images (default: the run's dataset)")
    st = esub.add_parser("steps", help="sample quality against network calls, per sampler (steps.json/.csv/.png)",
                         formatter_class=Formatter)
    add_model_args(st)
    st.add_argument("--samplers", default="ancestral,ddim", metavar="A,B,...", help="sampler names, comma-separated")
    st.add_argument("--nfe", default="5,10,20,50", metavar="N,N,...", help="network calls per image")
    st.add_argument("--spacing", default="auto", metavar="S,S,...",
                    help="timestep spacings, comma-separated (auto: per sampler and NFE, the one measured best)")
    st.add_argument("--clip", default="on", choices=CLIP_CHOICES, help="clamp x0 predictions to [-1, 1]")
    st.add_argument("--eta", type=float_at_least(0.0), default=0.0, help="DDIM eta")
    st.add_argument("--var", default="model", choices=REVERSE_VARIANCES, help="ancestral/ddim variance")
    st.add_argument("--full", action="store_true", help="add the full T-step ancestral chain as a reference row")
    st.add_argument("--n", type=POS, default=500, help="images per point (the same seeds for every point)")
    st.add_argument("--ref", default=None, metavar="SRC",
                    help="score by FID against this dataset (fid extra) instead of the digits measure")
    st.add_argument("--split", default="train", choices=SPLITS, help="--ref split")
    st.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights file")
    st.add_argument("--out", default="steps.json", metavar="FILE.json", help="results; also FILE.csv and FILE.png")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = esub.add_parser("fid", help="FID, IS and KID through torch-fidelity (optional extra 'fid')",
                        formatter_class=Formatter)
    f.add_argument("--ckpt", default=None, metavar="CKPT|RUN_DIR", help="model to sample from")
    f.add_argument("--samples", default=None, metavar="NPZ|DIR", help="existing samples instead of a model")
    f.add_argument("--ref", default=None, metavar="SRC", help="reference dataset (default: the run's)")
    f.add_argument("--split", default="train", choices=SPLITS, help="reference split (paper: train)")
    f.add_argument("--n", type=POS, default=50_000, help="number of samples (paper: 50,000)")
    f.add_argument("--batch-size", type=POS, default=256, help="images per network call")
    f.add_argument("--seed", type=NONNEG, default=0, help="first seed")
    f.add_argument("--device", default=None, help="device")
    f.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    f.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights file")
    f.add_argument("--cache-dir", default=None, help="where reference statistics are cached")
    f.add_argument("--guidance", type=float_at_least(0.0), default=None, metavar="W",
                   help="class-conditional --ckpt: balanced classes (image k asks for k mod C) at guidance W "
                        "(default 1: plain conditional)")
    f.add_argument("--out", default="fid.json", metavar="FILE.json", help="results")
    add_resume_args(f)  # --chunk-size, --overwrite: the samples continue after a kill (ddpm.chunks)
    qd = esub.add_parser("quality", help="offline sample quality for the embedded digits (classifier features)",
                         formatter_class=Formatter)
    qd.add_argument("--ckpt", default=None, metavar="CKPT|RUN_DIR", help="model to sample from")
    qd.add_argument("--samples", default=None, metavar="NPZ", help="existing samples instead of a model")
    qd.add_argument("--n", type=POS, default=500, help="number of samples to draw from --ckpt")
    qd.add_argument("--batch-size", type=POS, default=500, help="images per network call")
    qd.add_argument("--seed", type=NONNEG, default=0, help="first seed")
    qd.add_argument("--device", default=None, help="device")
    qd.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    qd.add_argument("--guidance", type=float_at_least(0.0), default=None, metavar="W",
                    help="class-conditional --ckpt: balanced classes (image k asks for k mod 10) at guidance W "
                         "(default 1); labelled samples also get the classifier's agreement with their class")
    qd.add_argument("--out", default="quality.json", metavar="FILE.json", help="results")
    gd = esub.add_parser("guidance", formatter_class=Formatter,
                         help="classifier-free guidance sweep on a class-conditional digits model: classifier "
                              "agreement and Fréchet distance against W",
                         description="For each W, N balanced samples (image k asks for class k mod 10, the same "
                                     "seeds at every W) scored by the digits classifier. W = 1 is the plain "
                                     "conditional model, 0 the unconditional one (Ho & Salimans' w = W - 1). "
                                     "Writes FILE.json, FILE.csv and FILE.png.")
    gd.add_argument("--ckpt", required=True, metavar="CKPT|RUN_DIR", help="class-conditional digits checkpoint")
    gd.add_argument("--guidance", default="0,1,2,3,5", metavar="W,W,...", help="guidance weights")
    gd.add_argument("--n", type=POS, default=500, help="samples per weight")
    gd.add_argument("--sampler", default="ancestral", choices=samplers.names(), metavar="NAME",
                    help="reverse process: " + ", ".join(samplers.names()))
    gd.add_argument("--steps", type=POS, default=None, help="reverse steps (default: all T)")
    gd.add_argument("--batch-size", type=POS, default=500, help="images per network call")
    gd.add_argument("--seed", type=NONNEG, default=0, help="first seed")
    gd.add_argument("--device", default=None, help="device")
    gd.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    gd.add_argument("--out", default="guidance.json", metavar="FILE.json", help="results (also FILE.csv, FILE.png)")
    gd.add_argument("--no-progress", action="store_true", help="no progress bar")
    return e


def _nll(args: argparse.Namespace):
    from ..api import load
    from ..data import load_images
    from ..evaluate.nll import evaluate_nll

    out = _check_suffix(args.out, ".json", "--out")
    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    src = args.data or cfg.data.source
    labels = None
    if cfg.model.num_classes > 0:  # class-conditional bits/dim: -log2 p(x | y) with the data's labels
        import numpy as np

        from ..conditioning import dataset_labels
        from ..data import open_dataset

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


def run(args: argparse.Namespace) -> None:
    if args.what == "nll" and args.var == "analytic":
        from ..analytic import command_nll

        command_nll(args)
    elif args.what == "nll" and args.steps is not None:
        raise UserError("--steps needs --var analytic (the model's own bound runs all T steps)")
    elif args.what == "analytic":
        from ..analytic import command_estimate

        command_estimate(args)
    elif args.what == "steps":
        from ..evaluate.steps import command as steps_command

        steps_command(args)
    elif args.what == "nll":
        result, out, what = _nll(args)
        result.save(out)
        print(f"bits/dim on {what}: {result.total_bpd:.4f} ± {result.total_bpd_stderr:.4f} (stderr)  "
              f"prior {result.prior_bpd:.2e}  L0 (decoder) {result.decoder_bpd:.4f}  rate L1..LT {result.rate_bpd:.4f}")
        print(f"wrote {out}")
    elif args.what == "rd":
        from ..evaluate.nll import NLLResult
        from ..evaluate.rd import format_table, plot_rd, rate_distortion, save_rd

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
    from ..api import load
    from ..evaluate.guidance import check_digits_model, guidance_sweep, parse_weights, save_guidance

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
        from ..data import read_samples

        return read_samples(args.samples), None
    from ..api import load
    from ..evaluate.fid import generate_samples

    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    # split over ranks under torchrun (image k still uses seed SEED+k), gathered on every rank
    guidance = getattr(args, "guidance", None)
    if guidance is not None and cfg.model.num_classes == 0:
        raise UserError(f"--guidance: {args.ckpt} is an unconditional model (model.num_classes=0); "
                        f"guidance needs a class-conditional one")
    resume = {}
    if hasattr(args, "overwrite"):  # ddpm eval fid: finished chunks kept in OUT.parts/ (ddpm.chunks)
        resume = dict(resume_at=args.out, identity=command_identity(args, dev), overwrite=args.overwrite,
                      chunk=args.chunk_size)
    images = generate_samples(diffusion, model, n, shape, seed=args.seed, batch_size=args.batch_size, device=dev,
                              amp_dtype=_amp(args.precision), progress=True, num_classes=cfg.model.num_classes,
                              guidance=guidance, **resume)
    return images, cfg


def _eval_fid(args: argparse.Namespace) -> None:
    from ..evaluate.fid import compute_fid

    out = _check_suffix(args.out, ".json", "--out")
    samples, cfg = _samples_from(args, args.n)
    ref = args.ref or (cfg.data.source if cfg is not None else None)
    if ref is None:
        raise UserError("--ref is required with --samples (the reference dataset, e.g. cifar-10-python.tar.gz)")
    res = compute_fid(samples, ref, split=args.split, cache_dir=args.cache_dir,
                      inception_weights=args.inception_weights, batch_size=args.batch_size, device=_device(args.device))
    atomic_write_json(out, res)
    if args.ckpt is not None:
        from ..chunks import finish

        finish(out)  # the result is written: the sample chunks go
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    print(f"wrote {out}")


def _eval_quality(args: argparse.Namespace) -> None:
    from ..evaluate.digits_quality import digits_quality, digits_reference

    out = _check_suffix(args.out, ".json", "--out")
    labels = None
    if args.samples is not None and args.guidance is not None:
        raise UserError("--guidance applies to samples drawn from --ckpt, not to --samples")
    if args.samples is not None:  # labelled samples (arr_1 beside arr_0, as ddpm sample --class writes)
        from ..datasets.arrays import load_labels

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
    from ..api import load

    dev = _device(args.device)
    model, diffusion, cfg, _ = load(args.ckpt, device=dev)
    if cfg.model.num_classes <= 0:
        if args.guidance is not None:
            raise UserError(f"--guidance needs a class-conditional model; {args.ckpt} is unconditional "
                            f"(model.num_classes=0)")
        return _samples_from(args, args.n)[0], None
    from ..evaluate.guidance import check_digits_model, sample_labelled

    check_digits_model(cfg, str(args.ckpt))
    return sample_labelled(model, diffusion, cfg, args.n, 1.0 if args.guidance is None else args.guidance,
                           seed=args.seed, batch_size=args.batch_size, device=dev, amp_dtype=_amp(args.precision),
                           progress=True)
