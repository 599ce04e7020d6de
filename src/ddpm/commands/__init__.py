"""The ``ddpm`` subcommands: one module per command, listed in one table.

Each module has ``HELP`` (its one-line summary), ``add_parser(sub)`` (its arguments, under the
argparse subparsers ``sub``) and ``run(args)`` (what it does). Adding a command is one new module
and one row here; :mod:`ddpm.cli` builds the parser from this table and calls ``run``. Handlers
validate their inputs before writing anything and raise :class:`ddpm.errors.UserError` for
mistakes, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# command name -> module in this package (imported when the parser is built or the command runs)
COMMANDS: dict[str, str] = {
    "train": "train",
    "sample": "sample",
    "eval": "eval",
    "convert": "convert",
    "data": "data",
    "config": "config",
    "report": "report",
    "edit": "edit",
    "encode": "encode",
    "distill": "distill",
}


def module(name: str) -> ModuleType:
    """The module of command ``name`` (a key of :data:`COMMANDS`)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def add_all(sub) -> None:
    """Add every command's parser to the argparse subparsers ``sub``, in table order; each (and
    each of its own subcommands) takes ``-v/--verbose``."""
    for name in COMMANDS:
        module(name).add_parser(sub)
        _add_verbose(sub.choices[name])


def _add_verbose(parser) -> None:
    # SUPPRESS: a nested subcommand's default must not overwrite a -v given before it
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also print what the library decides on the way (e.g. the network path: "
                             "memory layout and convolution routing, with the timings behind the choice)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)
