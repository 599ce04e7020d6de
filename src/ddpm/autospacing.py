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

# Measured on two eps models of the `digits` preset (8x8, T = 200): the one `make demo` trains
# (1,500 steps, EMA) and the same run's step-1,000 checkpoint, with one command per sampler and model:
#   ddpm eval steps --ckpt CKPT --samplers S --nfe 2,3,5,8 (or 2,3,4,5,8,10; 3,5,10) \
#       --spacing trailing,linspace,quadratic,logsnr --n 500 --batch-size 500 --out steps_S.json
# plus the README's NFE 5/10 table of the same `make demo` model (its UniPC rows at 5 calls were
# reproduced exactly). Digits Fréchet distance (FD), 500 samples, seeds 0..499; quality numbers,
# independent of machine load. For a sampler and budget measured on both models the entry is the
# spacing with the lowest mean over the two of FD / (that model's best FD there): the one closest
# to the best on both. Measured FDs (model 1500 / model 1000), trailing, linspace, quadratic, logsnr:
#   unipc   2: 77.6 246 202 246 / 97.2 277 237 277 -> trailing
#   unipc   3: 16.7 27.4 12.7 18.0 / 21.8 25.5 35.2 21.8 -> trailing (quadratic wins on one, loses 1.6x on the other)
#   unipc   5: 4.63 1.83 1.87 3.56 / 7.13 1.78 3.38 2.99 -> linspace (the case; 4: linspace 2.36 on model 1000)
#   unipc   8: 2.62 2.36 3.34 1.81 / 5.46 4.17 6.75 3.09 -> logsnr
#   unipc  10: 2.57 2.75 3.88 2.51 / 5.39 5.52 7.52 5.25 -> logsnr
#   dpm++2m 3: 17.6 27.4 13.0 18.0 / 23.8 25.5 35.9 21.9 -> logsnr
#   dpm++2m 5: 4.86 1.84 2.15 3.79 / 7.63 1.86 4.93 3.21 -> linspace
#   dpm++2m 10: 2.42 2.37 3.47 1.85 / 5.05 4.79 7.03 3.62 -> logsnr
#   dpm++3m 5: 4.59 1.91 3.47 2.41 / 6.43 1.87 9.22 3.30 -> linspace
#   dpm++3m 10: 2.55 3.28 5.74 4.77 / 5.23 6.58 10.4 9.99 -> trailing
#   ddim    5: 7.26 12.1 10.3 17.6 / 14.0 19.8 23.4 34.7 -> trailing (also at 3 on model 1000: 34.8 vs >= 88.6)
#   ddim   10: 3.28 4.06 4.77 5.35 / 7.43 9.27 9.99 11.6 -> trailing
#   dpm2    3: 23.4 44.0 43.5 59.6 / 36.5 52.0 87.2 92.8 -> trailing
#   dpm2    5: 6.38 2.40 9.09 14.7 / 12.1 5.19 21.6 30.1 -> linspace
#   dpm2   10: 2.79 3.33 3.86 3.73 / 6.02 7.34 8.06 7.98 -> trailing
#   dpm3    5: 5.58 8.05 2.81 5.59 / 8.59 10.2 6.54 6.01 -> quadratic
#   dpm3   10: 2.44 2.76 3.28 2.88 / 5.10 5.08 6.79 5.95 -> trailing
#   (dpm3 at 3 calls: FDs equal dpm2's on model 1000, 36.5 52.0 87.2 92.8, so dpm2's choice)
#   dpm++2m-sde 5: 6.50 3.13 5.92 5.76 / 5.53 3.01 4.64 5.50 -> linspace
#   dpm++2m-sde 10: 2.27 2.77 1.68 3.57 / 2.08 3.37 1.60 2.70 -> quadratic
#   (dpm++2m-sde at 3 calls, model 1000 only: 16.2 38.3 17.5 24.9 -> the fallback, trailing, kept)
#   pndm    3: 310 273 314 273 / 315 292 315 292 -> linspace (every spacing fails: PLMS needs more calls)
#   pndm    5: 276 314 300 311 / 288 311 300 311 -> trailing (likewise)
#   pndm   10: 4.97 178 7.20 19.4 / 17.5 195 10.7 28.4 -> quadratic
#   ancestral 3: 26.9 279 244 271 / 34.9 281 265 278 -> trailing
#   ancestral 5: 23.1 207 114 205 / 30.7 213 133 216 -> trailing
#   ancestral 10: 18.3 94.0 20.4 53.0 / 23.5 102 26.9 65.8 -> trailing
# At 2 calls every multistep solver takes the same two steps (dpm++2m's FDs equal unipc's on model
# 1500), so dpm++2m and dpm++3m take unipc's 2-call choice; at 3 calls dpm++3m's FDs equal
# dpm++2m's (model 1000: 23.80 25.52 35.94 21.94 both), so it takes dpm++2m's 3-call choice. A row (n, s) covers the budgets up to n calls not
# covered by an earlier row (so 4 takes 5's choice, 6-9 take 10's); above the last row (more than
# 10 calls, not measured) and for a sampler not listed, auto is trailing.
AUTO_SPACING: Mapping[str, tuple[tuple[int, str], ...]] = {
    "unipc": ((3, "trailing"), (5, "linspace"), (10, "logsnr")),
    "dpm++2m": ((2, "trailing"), (3, "logsnr"), (5, "linspace"), (10, "logsnr")),
    "dpm++3m": ((2, "trailing"), (3, "logsnr"), (5, "linspace"), (10, "trailing")),
    "ddim": ((10, "trailing"),),
    "dpm2": ((3, "trailing"), (5, "linspace"), (10, "trailing")),
    "dpm3": ((3, "trailing"), (5, "quadratic"), (10, "trailing")),
    "dpm++2m-sde": ((3, "trailing"), (5, "linspace"), (10, "quadratic")),
    "pndm": ((3, "linspace"), (5, "trailing"), (10, "quadratic")),
    "ancestral": ((10, "trailing"),),
}


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
