"""The ``ddpm`` command line: ``train | sample | eval | convert | data | config | report | distill``.

Only this module and :mod:`ddpm.commands` parse arguments: each subcommand is one module of
:mod:`ddpm.commands`, listed in its table. Every handler validates its inputs before it writes
anything; user mistakes raise :class:`ddpm.errors.UserError` and end as one line on stderr with
exit status 2 (argparse's own errors are folded into the same one-line form).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .commands import add_all, module
from .commands.args import EXIT_USER_ERROR, Formatter, Parser
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020): "
               "train, sample, evaluate, convert.", formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_all(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = _verbose_logging() if getattr(args, "verbose", False) else None
    try:
        module(args.command).run(args)
    except UserError as e:
        sys.stderr.write(f"ddpm {args.command}: error: {_one_line(str(e))}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # also a second SIGINT/SIGTERM during a graceful stop (signum set)
        sys.stderr.write(f"ddpm {args.command}: interrupted\n")
        return 128 + getattr(e, "signum", 2)
    finally:
        if restore is not None:
            restore()
    return 0


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at creation)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _verbose_logging():
    """``-v``: the library's INFO records (logger ``ddpm``) on stderr, one line each, for the
    command's duration. Returns the function that undoes it (``main`` may run again in-process)."""
    logger = logging.getLogger("ddpm")
    handler, level = _Stderr(), logger.level
    handler.setFormatter(logging.Formatter("ddpm: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return restore


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    raise SystemExit(main())
