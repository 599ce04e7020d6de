"""Argument-parsing pieces every subcommand module shares: the one-line-error parser, the help
formatter that states defaults, numeric argument types, and the options of commands that load a
model (``--ckpt --device --precision --batch-size --seed``)."""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ddpm sample: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


class Formatter(argparse.HelpFormatter):
    """Appends '(default: X)' to every option whose help does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def at_least(cast, lo, noun: str):
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


def int_at_least(lo: int):
    return at_least(int, lo, "an integer")


def float_at_least(lo: float):
    return at_least(float, lo, "a number")


POS = int_at_least(1)
NONNEG = int_at_least(0)


def add_parser(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    """A subcommand parser with the package's formatter (every module adds its own this way)."""
    return sub.add_parser(name, help=help, formatter_class=Formatter, **kw)


def subcommands(p: argparse.ArgumentParser, dest: str, metavar: str):
    """Nested subcommands (``ddpm eval nll``) with the one-line-error parser; one is required."""
    s = p.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser)
    s.required = True
    return s


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The options of every command that loads a model and runs it."""
    from ..options import SAMPLE_PRECISIONS

    p.add_argument("--ckpt", required=required, metavar="CKPT|RUN_DIR",
                   help="checkpoint file, or a run folder (its latest checkpoint, EMA weights)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=SAMPLE_PRECISIONS,
                   help="network precision. fp32 (default): faithful numbers. bf16 autocast: the fast path on GPUs "
                        "and on CPUs with AVX512-BF16 or AMX (Intel Xeon Cooper Lake/Sapphire Rapids and later, "
                        "AMD Zen 4 and later; ~2x fp32 there), several times slower on CPUs without them (AVX2 "
                        "only): see `lscpu | grep -o 'avx512_bf16\\|amx_bf16'`")
    p.add_argument("--batch-size", type=POS, default=64, help="images per network call")
    p.add_argument("--seed", type=NONNEG, default=0, help="image k uses seed SEED+k (same image whatever the batch size)")
