"""The sampler registry: every reverse-process sampler, looked up by name.

A sampler is one module in this package holding one :class:`~ddpm.samplers.base.Sampler`
subclass decorated with :func:`register` (see ``ancestral.py``, the shortest). Every module
here is imported when the package is, so adding a sampler is one new file plus its tests:
:func:`ddpm.sample`, ``ddpm sample --sampler`` (its choices and help) and ``ddpm eval steps``
find it by its ``name``.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import SamplingOptionError, suggest

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make the sampler ``cls`` (with ``name`` and ``help``) available by name."""
    name = getattr(cls, "name", "")
    if not name or name in _REGISTRY:
        raise ValueError(f"sampler {cls.__name__} needs a unique non-empty name, got {name!r}")
    _REGISTRY[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Every registered sampler's name; ``ancestral`` and ``ddim`` first, then alphabetical."""
    first = [n for n in ("ancestral", "ddim") if n in _REGISTRY]
    return tuple(first + sorted(n for n in _REGISTRY if n not in first))


def get(name: str) -> type:
    """The sampler class registered as ``name``; a :class:`SamplingOptionError` naming the
    choices (and the closest) otherwise."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise SamplingOptionError(f"unknown sampler {name!r}; expected one of {', '.join(names())}"
                                  f"{suggest(str(name), names())}")
    return cls


def describe() -> str:
    """One ``name: help`` line per sampler (the CLI's --sampler help)."""
    return "; ".join(f"{n}: {_REGISTRY[n].help}" for n in names())


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["register", "names", "get", "describe"]
