"""The ``ddpm`` subcommands: one module per command, listed in one table.

Each module has ``HELP`` (its one-line summary), ``add_parser(sub)`` (its arguments, under the
argparse subparsers ``sub``) and ``run(args)`` (what it does). Adding a command is one new module
and one row here; :mod:`ddpm.cli` builds the parser from this table and calls ``run``. Handlers
validate their inputs before writing anything and raise :class:`ddpm.errors.UserError` for
mistakes, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

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
    """Add every command's parser to the argparse subparsers ``sub``, in table order."""
    for name in COMMANDS:
        module(name).add_parser(sub)
