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

# Sampling / evaluation on the command line.
SAMPLE_PRECISIONS = ("fp32", "bf16")            # --precision of ddpm sample / eval
# --spacing; "auto": per sampler and number of calls, the one measured best (ddpm.autospacing)
TIMESTEP_SPACINGS = ("auto", "trailing", "leading", "linspace", "quadratic", "logsnr")
CONV_MODES = ("auto", "winograd", "direct")     # --conv
WEIGHTS = ("ema", "model")                      # which weights of a checkpoint
SPLITS = ("train", "test")
REVERSE_VARIANCES = ("model", "analytic")       # --var: the model's own or Analytic-DPM's (Bao et al. 2022)
CLIP_CHOICES = ("on", "off", "both")            # ddpm eval steps --clip

# Model size families for one's own images (ddpm.sizes; `ddpm train --data X --size ...`).
MODEL_SIZES = ("tiny", "small", "base")
