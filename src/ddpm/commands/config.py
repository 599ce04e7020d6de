"""``ddpm config show``: list the presets, or print one resolved config as JSON."""

from __future__ import annotations

import argparse

from ..config import PRESET_HELP, PRESETS, apply_overrides, get_preset
from ..errors import UserError
from .args import Formatter, Parser

HELP = "list presets or print one"


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("config", help=HELP, formatter_class=Formatter)
    gsub = g.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    gsub.required = True
    gs = gsub.add_parser("show", help="list presets, or print one resolved config as JSON", formatter_class=Formatter)
    gs.add_argument("--preset", default=None, help="preset to print (default: list all)")
    gs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a value before printing")
    return g


def run(args: argparse.Namespace) -> None:
    if args.preset is None:
        if args.overrides:
            raise UserError("--set needs --preset")
        width = max(len(n) for n in PRESETS)
        for name in PRESETS:
            print(f"{name:<{width}}  {PRESET_HELP.get(name, '')}")
        return
    cfg = apply_overrides(get_preset(args.preset), list(args.overrides))
    print(cfg.to_json())
