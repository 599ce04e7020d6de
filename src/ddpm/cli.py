"""The ``ddpm`` command line: ``train | sample | eval | convert | config | data``.

Only this module parses arguments. Every handler validates its inputs before it writes
anything; user mistakes raise :class:`ddpm.errors.UserError` and end as one line on stderr
with exit status 2 (argparse's own errors are folded into the same one-line form).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import UserError
from .options import (CLIP_CHOICES, CONV_MODES, MODEL_SIZES, REVERSE_VARIANCES, SAMPLE_PRECISIONS, SPLITS,
                      TIMESTEP_SPACINGS, WEIGHTS)

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ddpm sample: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


def _at_least(cast, lo, noun: str):
    """An argparse type: ``cast(s)`` (int or float) that must be >= ``lo`` (NaN is refused too)."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {lo}, got {s!r}") from None
        if not v >= lo:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {lo}, got {s}")
        return v
    parse.__name__ = f"{cast.__name__}>={lo}"
    return parse


def _int_at_least(lo: int):
    return _at_least(int, lo, "an integer")


def _float_at_least(lo: float):
    return _at_least(float, lo, "a number")


_POS = _int_at_least(1)
_NONNEG = _int_at_least(0)


class _FMT(argparse.HelpFormatter):
    """Appends '(default: X)' to every option whose help does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def _add_common_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--ckpt", required=required, metavar="CKPT|RUN_DIR",
                   help="checkpoint file, or a run folder (its latest checkpoint, EMA weights)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS,
                   help="network precision. fp32 (default): faithful numbers. bf16 autocast: the fast path on GPUs "
                        "and on CPUs with AVX512-BF16 or AMX (Intel Xeon Cooper Lake/Sapphire Rapids and later, "
                        "AMD Zen 4 and later; ~2x fp32 there), several times slower on CPUs without them (AVX2 "
                        "only): see `lscpu | grep -o 'avx512_bf16\\|amx_bf16'`")
    p.add_argument("--batch-size", type=_POS, default=64, help="images per network call")
    p.add_argument("--seed", type=_NONNEG, default=0, help="image k uses seed SEED+k (same image whatever the batch size)")


def build_parser() -> argparse.ArgumentParser:
    from .sizes import RESOLUTIONS

    p = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020): "
                "train, sample, evaluate, convert.", formatter_class=_FMT)
    p.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model from a preset", formatter_class=_FMT,
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
    t.add_argument("--resolution", type=_POS, default=None, metavar="N",
                   help=f"with --data and no --preset: train at NxN ({', '.join(map(str, RESOLUTIONS))}) "
                        "(default: the largest of these not above the smallest image's shorter side, at most 256)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint", formatter_class=_FMT,
                       description="Sample with Algorithm 2 (ancestral), DDIM or another registered sampler. Writes uint8 NHWC arrays "
                                   "under key arr_0 (the ADM evaluator's convention) and a PNG grid.")
    _add_common_model_args(s)
    s.add_argument("--n", type=_POS, default=64, help="number of images")
    from . import samplers  # the registry: one entry per sampler module (imports torch)

    s.add_argument("--sampler", default="ancestral", choices=samplers.names(), metavar="NAME",
                   help="reverse process, one of: " + samplers.describe())
    s.add_argument("--steps", type=_POS, default=None, help="network calls per image (default: all T; fewer "
                   "respace the chain, see --spacing)")
    s.add_argument("--eta", type=_float_at_least(0.0), default=0.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--spacing", default="trailing", choices=TIMESTEP_SPACINGS,
                   help="which timesteps a --steps chain keeps (quadratic: DDIM's n ~ k^2; logsnr: uniform in log-SNR)")
    s.add_argument("--order", type=_POS, default=None,
                   help="solver order for samplers that offer one (unipc: 2 or 3)")
    s.add_argument("--clip", default="on", choices=[c for c in CLIP_CHOICES if c != "both"],
                   help="clamp every x0 prediction to [-1, 1] (the official sampler does; diffusers' solvers do not)")
    s.add_argument("--var", default="model", choices=REVERSE_VARIANCES,
                   help="ancestral/ddim step variance: the model's own, or analytic = Analytic-DPM's optimal one "
                        "(Bao et al. 2022; Gamma_n estimated on first use, stored as RUN/checkpoints/analytic_var.json)")
    s.add_argument("--class", dest="class_spec", default=None, metavar="K|K,K,...|all",
                   help="class-conditional models: one class, a list (cycled over the images) or all "
                        "(image k gets class k mod C); labels go to the .npz as arr_1 (default: all)")
    s.add_argument("--guidance", type=_float_at_least(0.0), default=None, metavar="W",
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
    s.add_argument("--interpolate", action="store_true",
                   help="also write <out>_interpolation.png: two test images mixed at step t (Fig. 8/9)")
    s.add_argument("--interp-t", type=_NONNEG, default=None, help="0-based step for --interpolate (default T/2)")
    s.add_argument("--data", default=None, metavar="SRC", help="test images for --interpolate (default: the run's)")
    s.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (pays off for long runs and on GPUs)")
    s.add_argument("--cuda-graph", action="store_true", help="on CUDA, replay each step from a CUDA graph")
    s.add_argument("--conv", default="auto", choices=CONV_MODES,
                   help="3x3 convolutions on the CPU (eager float32): auto = timed once per layer shape on this "
                        "machine and thread count, Winograd F(4x4,3x3) where it is faster than oneDNN's direct "
                        "convolution (cached in ~/.cache/ddpm; DDPM_AUTOTUNE=0 turns the timing off and uses "
                        "Winograd for >= 128 channels); winograd = always for >= 128 channels (rounding a few "
                        "times the direct one's); direct = oneDNN")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="bits/dim, rate-distortion, FID/IS/KID, digits quality", formatter_class=_FMT)
    esub = e.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    esub.required = True
    for name, helptext in (("nll", "exact bits/dim: all T terms plus the prior (paper section 4.2, Table 1)"),
                           ("rd", "rate-distortion curve (paper Table 4, Fig. 5) from the same pass")):
        q = esub.add_parser(name, help=helptext, formatter_class=_FMT, description=helptext)
        _add_common_model_args(q, required=(name == "nll"))
        if name == "rd":
            q.add_argument("--from", dest="from_json", default=None, metavar="NLL.json",
                           help="reuse the per-step terms saved by `ddpm eval nll` instead of a new pass")
        q.add_argument("--data", default=None, metavar="SRC", help="dataset (default: the run's)")
        q.add_argument("--split", default="test", choices=SPLITS, help="dataset split")
        q.add_argument("--n", type=_POS, default=None, help="number of images (default: the whole split)")
        q.add_argument("--out", default=f"{name}.json", metavar="FILE.json",
                       help="results; rd also writes FILE.csv and FILE.png")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "nll":
            q.add_argument("--var", default="model", choices=REVERSE_VARIANCES,
                           help="analytic: the bound with Analytic-DPM's variance in every term, beside both fixed "
                                "variances from the same pass (paired; a different JSON than the model's own)")
            q.add_argument("--steps", type=_POS, default=None,
                           help="with --var analytic: the bound of a respaced chain of this many steps (trailing)")
    an = esub.add_parser("analytic", help="estimate Analytic-DPM's Gamma_n over training images (RUN/checkpoints/analytic_var.json)",
                         formatter_class=_FMT)
    _add_common_model_args(an)
    an.add_argument("--n", type=_POS, default=500, help="training images (one noise draw each per step)")
    an.add_argument("--data", default=None, metavar="SRC", help="training images (default: the run's dataset)")
    st = esub.add_parser("steps", help="sample quality against network calls, per sampler (steps.json/.csv/.png)",
                         formatter_class=_FMT)
    _add_common_model_args(st)
    st.add_argument("--samplers", default="ancestral,ddim", metavar="A,B,...", help="sampler names, comma-separated")
    st.add_argument("--nfe", default="5,10,20,50", metavar="N,N,...", help="network calls per image")
    st.add_argument("--spacing", default="trailing", metavar="S,S,...", help="timestep spacings, comma-separated")
    st.add_argument("--clip", default="on", choices=CLIP_CHOICES, help="clamp x0 predictions to [-1, 1]")
    st.add_argument("--eta", type=_float_at_least(0.0), default=0.0, help="DDIM eta")
    st.add_argument("--var", default="model", choices=REVERSE_VARIANCES, help="ancestral/ddim variance")
    st.add_argument("--full", action="store_true", help="add the full T-step ancestral chain as a reference row")
    st.add_argument("--n", type=_POS, default=500, help="images per point (the same seeds for every point)")
    st.add_argument("--ref", default=None, metavar="SRC",
                    help="score by FID against this dataset (fid extra) instead of the digits measure")
    st.add_argument("--split", default="train", choices=SPLITS, help="--ref split")
    st.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights file")
    st.add_argument("--out", default="steps.json", metavar="FILE.json", help="results; also FILE.csv and FILE.png")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = esub.add_parser("fid", help="FID, IS and KID through torch-fidelity (optional extra 'fid')",
                        formatter_class=_FMT)
    f.add_argument("--ckpt", default=None, metavar="CKPT|RUN_DIR", help="model to sample from")
    f.add_argument("--samples", default=None, metavar="NPZ|DIR", help="existing samples instead of a model")
    f.add_argument("--ref", default=None, metavar="SRC", help="reference dataset (default: the run's)")
    f.add_argument("--split", default="train", choices=SPLITS, help="reference split (paper: train)")
    f.add_argument("--n", type=_POS, default=50_000, help="number of samples (paper: 50,000)")
    f.add_argument("--batch-size", type=_POS, default=256, help="images per network call")
    f.add_argument("--seed", type=_NONNEG, default=0, help="first seed")
    f.add_argument("--device", default=None, help="device")
    f.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    f.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights file")
    f.add_argument("--cache-dir", default=None, help="where reference statistics are cached")
    f.add_argument("--guidance", type=_float_at_least(0.0), default=None, metavar="W",
                   help="class-conditional --ckpt: balanced classes (image k asks for k mod C) at guidance W "
                        "(default 1: plain conditional)")
    f.add_argument("--out", default="fid.json", metavar="FILE.json", help="results")
    qd = esub.add_parser("quality", help="offline sample quality for the embedded digits (classifier features)",
                         formatter_class=_FMT)
    qd.add_argument("--ckpt", default=None, metavar="CKPT|RUN_DIR", help="model to sample from")
    qd.add_argument("--samples", default=None, metavar="NPZ", help="existing samples instead of a model")
    qd.add_argument("--n", type=_POS, default=500, help="number of samples to draw from --ckpt")
    qd.add_argument("--batch-size", type=_POS, default=500, help="images per network call")
    qd.add_argument("--seed", type=_NONNEG, default=0, help="first seed")
    qd.add_argument("--device", default=None, help="device")
    qd.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    qd.add_argument("--guidance", type=_float_at_least(0.0), default=None, metavar="W",
                    help="class-conditional --ckpt: balanced classes (image k asks for k mod 10) at guidance W "
                         "(default 1); labelled samples also get the classifier's agreement with their class")
    qd.add_argument("--out", default="quality.json", metavar="FILE.json", help="results")
    gd = esub.add_parser("guidance", formatter_class=_FMT,
                         help="classifier-free guidance sweep on a class-conditional digits model: classifier "
                              "agreement and Fréchet distance against W",
                         description="For each W, N balanced samples (image k asks for class k mod 10, the same "
                                     "seeds at every W) scored by the digits classifier. W = 1 is the plain "
                                     "conditional model, 0 the unconditional one (Ho & Salimans' w = W - 1). "
                                     "Writes FILE.json, FILE.csv and FILE.png.")
    gd.add_argument("--ckpt", required=True, metavar="CKPT|RUN_DIR", help="class-conditional digits checkpoint")
    gd.add_argument("--guidance", default="0,1,2,3,5", metavar="W,W,...", help="guidance weights")
    gd.add_argument("--n", type=_POS, default=500, help="samples per weight")
    gd.add_argument("--sampler", default="ancestral", choices=samplers.names(), metavar="NAME",
                    help="reverse process: " + ", ".join(samplers.names()))
    gd.add_argument("--steps", type=_POS, default=None, help="reverse steps (default: all T)")
    gd.add_argument("--batch-size", type=_POS, default=500, help="images per network call")
    gd.add_argument("--seed", type=_NONNEG, default=0, help="first seed")
    gd.add_argument("--device", default=None, help="device")
    gd.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS, help="network precision")
    gd.add_argument("--out", default="guidance.json", metavar="FILE.json", help="results (also FILE.csv, FILE.png)")
    gd.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("convert", help="weights to and from diffusers' UNet2DModel", formatter_class=_FMT)
    csub = c.add_subparsers(dest="direction", metavar="DIRECTION", parser_class=_Parser)
    csub.required = True
    cf = csub.add_parser("from-diffusers", help="diffusers UNet2DModel folder -> our checkpoint", formatter_class=_FMT)
    cf.add_argument("src", metavar="DIR", help="folder with config.json and diffusion_pytorch_model.safetensors/.bin")
    cf.add_argument("out", metavar="OUT", help="checkpoint file to write (.safetensors)")
    ct = csub.add_parser("to-diffusers", help="our checkpoint -> diffusers folder", formatter_class=_FMT)
    ct.add_argument("src", metavar="CKPT", help="checkpoint file or run folder")
    ct.add_argument("out", metavar="DIR", help="folder to write (UNet2DModel.from_pretrained(DIR))")
    ct.add_argument("--weights", default="ema", choices=WEIGHTS, help="which weights to export")

    d = sub.add_parser("data", help="prepare a dataset once for fast training", formatter_class=_FMT)
    dsub = d.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    dp = dsub.add_parser("prepare", help="decode, crop and resize every image once into OUT.npy (+ OUT.json)",
                         formatter_class=_FMT,
                         description="Decode, centre-crop and area-resize every image of SRC once, exactly as "
                                     "training from SRC would, into a memory-mapped uint8 OUT.npy [N,H,W,C] and "
                                     "OUT.json (provenance, class names from subfolders, sha256). Train with "
                                     "--data OUT.npy.")
    dp.add_argument("src", metavar="SRC",
                    help="image folder (one subfolder per class keeps labels), or any --data source")
    dp.add_argument("out", metavar="OUT.npy", help="array file to write (OUT.json and OUT.labels.npy beside it)")
    dp.add_argument("--resolution", type=_POS, required=True, metavar="N", help="output size NxN in pixels")
    dp.add_argument("--channels", type=int, default=None, choices=(1, 3),
                    help="1 (grey) or 3 (RGB) (default: 3 if any image is in a colour mode, else 1)")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")

    from . import cmd_distill

    cmd_distill.add_parser(sub)
    g = sub.add_parser("config", help="list presets or print one", formatter_class=_FMT)
    gsub = g.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    gsub.required = True
    gs = gsub.add_parser("show", help="list presets, or print one resolved config as JSON", formatter_class=_FMT)
    gs.add_argument("--preset", default=None, help="preset to print (default: list all)")
    gs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a value before printing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import cmd_distill, commands

    handler = {
        "train": commands.cmd_train,
        "sample": commands.cmd_sample,
        "eval": commands.cmd_eval,
        "convert": commands.cmd_convert,
        "config": commands.cmd_config,
        "data": commands.cmd_data,
        "distill": cmd_distill.run,
    }[args.command]
    try:
        handler(args)
    except UserError as e:
        sys.stderr.write(f"ddpm {args.command}: error: {_one_line(str(e))}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # also a second SIGINT/SIGTERM during a graceful stop (signum set)
        sys.stderr.write(f"ddpm {args.command}: interrupted\n")
        return 128 + getattr(e, "signum", 2)
    return 0


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    raise SystemExit(main())

