"""Every option vocabulary of the package, declared once (no torch import).

Config validation (:mod:`ddpm.config`), the command line's ``choices=`` (:mod:`ddpm.cli`) and the
schedule names of :mod:`ddpm.schedule` (also what the interop matches against) read these tuples,
so adding a value is one edit here plus its implementation (:mod:`ddpm.diffusion`'s enums,
:mod:`ddpm.training.precision`, :mod:`ddpm.training.tsampler`, ...); ``tests/test_options.py``
checks that the implementations and the readers agree with them. The sampler names are not here: they come from the
sampler registry (:func:`ddpm.samplers.names`), which is their one declaration.
"""

from __future__ import annotations

# Diffusion parameterisation (paper section 3.2 and 4; Table 2's rows).
MEAN_TYPES = ("eps", "xstart", "xprev", "v")  # v: Salimans & Ho 2022, section 4
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "rescaled_kl", "hybrid")

# Beta schedules (paper section 4 and Appendix B; the official code's ablations; improved DDPM's cosine).
BETA_SCHEDULES = ("linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine")

# Training.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")   # train.precision ("auto": bf16 on CUDA with bf16, else fp32)
T_SAMPLERS = ("uniform", "importance")          # train.t_sampler
# Recipes since the paper (ddpm.training.weighting / schedules); "none"/"constant" = the paper.
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")     # train.loss_weighting: none | min_snr:G | p2:K,G
LR_SCHEDULES = ("constant", "cosine", "linear")  # train.lr_schedule (after the linear warm-up)
EMA_WARMUPS = ("none", "ramp")                   # train.ema_warmup (ramp: min(decay, (1+n)/(10+n)))

# Sampling / evaluation on the command line.
SAMPLE_PRECISIONS = ("fp32", "bf16")            # --precision of ddpm sample / eval
# --spacing; "auto": per sampler and number of calls, the one measured best (ddpm.autospacing)
TIMESTEP_SPACINGS = ("auto", "trailing", "leading", "linspace", "quadratic", "logsnr")
CONV_MODES = ("auto", "winograd", "direct")     # --conv
WEIGHTS = ("ema", "model")                      # which weights of a checkpoint
SPLITS = ("train", "test")
REVERSE_VARIANCES = ("model", "analytic")       # --var: the model's own or Analytic-DPM's (Bao et al. 2022)
CLIP_CHOICES = ("on", "off", "both")            # ddpm eval steps --clip
MASK_REGIONS = ("left", "right", "top", "bottom", "center", "border")  # ddpm edit inpaint --mask (generated part)

# Model size families for one's own images (ddpm.sizes; `ddpm train --data X --size ...`).
MODEL_SIZES = ("tiny", "small", "base")


def parse_loss_weighting(value: str) -> tuple[str, tuple[float, ...]]:
    """``"none"`` -> ("none", ()); ``"min_snr:5"`` -> ("min_snr", (5.0,)); ``"p2:1,1"`` -> ("p2", (1.0, 1.0)).

    ``min_snr:G`` needs G > 0 (Hang et al. 2023 use 5); ``p2:K,G`` needs K > 0 and G >= 0 (Choi et
    al. 2022 use K = 1, G in 0.5..1). Raises ValueError with the expected form.
    """
    name, _, rest = str(value).strip().partition(":")
    name = name.strip().lower()
    want = {"none": 0, "min_snr": 1, "p2": 2}
    if name not in want:
        raise ValueError("none, min_snr:G (e.g. min_snr:5) or p2:K,G (e.g. p2:1,1)")
    try:
        args = tuple(float(a) for a in rest.split(",")) if rest.strip() else ()
    except ValueError:
        raise ValueError(f"numbers after '{name}:'") from None
    if name == "min_snr" and not args:
        args = (5.0,)  # Hang et al.'s gamma
    if name == "p2" and not args:
        args = (1.0, 1.0)
    if len(args) != want[name]:
        raise ValueError({"none": "none without arguments", "min_snr": "min_snr:G with one number G > 0",
                          "p2": "p2:K,G with two numbers K > 0, G >= 0"}[name])
    if name == "min_snr" and not args[0] > 0:
        raise ValueError("min_snr:G with G > 0")
    if name == "p2" and not (args[0] > 0 and args[1] >= 0):
        raise ValueError("p2:K,G with K > 0 and G >= 0")
    return name, args
