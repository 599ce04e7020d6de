"""Editing real images with a trained DDPM, no retraining: one module per method.

- :mod:`~ddpm.editing.inpaint`: RePaint (Lugmayr et al., CVPR 2022) and the replacement method
  (Song et al., ICLR 2021) - :func:`inpaint`.
- :mod:`~ddpm.editing.sdedit`: SDEdit (Meng et al., ICLR 2022) - :func:`sdedit`.
- :mod:`~ddpm.editing.invert`: deterministic DDIM inversion (Song et al., ICLR 2021) -
  :func:`ddim_invert`, :func:`ddim_decode`, :func:`slerp`, :func:`interpolate_latents`.
- :mod:`~ddpm.editing.masks`: inpainting masks (1 = generate, 0 = keep) and their checks.

Every function takes the network and ``model_kwargs``/``guidance`` like :func:`ddpm.sample`,
runs on the sampler seams (:class:`ddpm.samplers.base.Chain`, :class:`~ddpm.samplers.base.Denoiser`)
and draws image k's noise only from ``ImageNoise(seeds[k])``. No command-line code lives here.
"""

from .inpaint import inpaint, repaint_schedule
from .invert import ddim_decode, ddim_invert, interpolate_latents, slerp
from .sdedit import sdedit

__all__ = ["inpaint", "repaint_schedule", "sdedit", "ddim_invert", "ddim_decode", "slerp", "interpolate_latents"]
