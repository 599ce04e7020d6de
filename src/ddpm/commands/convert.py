"""``ddpm convert from-diffusers|to-diffusers``: weights to and from diffusers' UNet2DModel."""

from __future__ import annotations

import argparse

from ..cliutil import check_suffix as _check_suffix
from ..options import WEIGHTS
from .args import Formatter, Parser

HELP = "weights to and from diffusers' UNet2DModel"


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("convert", help=HELP, formatter_class=Formatter)
    csub = c.add_subparsers(dest="direction", metavar="DIRECTION", parser_class=Parser)
    csub.required = True
    cf = csub.add_parser("from-diffusers", help="diffusers UNet2DModel folder -> our checkpoint", formatter_class=Formatter)
    cf.add_argument("src", metavar="DIR", help="folder with config.json and diffusion_pytorch_model.safetensors/.bin")
    cf.add_argument("out", metavar="OUT", help="checkpoint file to write (.safetensors)")
    ct = csub.add_parser("to-diffusers", help="our checkpoint -> diffusers folder", formatter_class=Formatter)
    ct.add_argument("src", metavar="CKPT", help="checkpoint file or run folder")
    ct.add_argument("out", metavar="DIR", help="folder to write (UNet2DModel.from_pretrained(DIR))")
    ct.add_argument("--weights", default="ema", choices=WEIGHTS, help="which weights to export")
    return c


def run(args: argparse.Namespace) -> None:
    from ..interop.diffusers import from_diffusers_dir, to_diffusers_dir

    if args.direction == "from-diffusers":
        out = _check_suffix(args.out, ".safetensors", "OUT")
        path = from_diffusers_dir(args.src, out)
        print(f"wrote {path}; sample with: ddpm sample --ckpt {path}")
    else:
        path = to_diffusers_dir(args.src, args.out, weights=args.weights)
        print(f"wrote {path}; load with: UNet2DModel.from_pretrained({str(path)!r})")
