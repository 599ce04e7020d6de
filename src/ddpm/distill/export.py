"""A distilled student's diffusers scheduler: ``DDIMScheduler`` (eta 0) on its kept steps.

The student's kept indices come from halving the ``trailing`` grid (:mod:`.grid`), and halving a
trailing grid of 2K steps gives the trailing grid of K steps (k_{2i+1} of round(T - j T/2K) - 1
is round(T - j' T/K) - 1), so diffusers' ``timestep_spacing="trailing"`` with
``num_inference_steps=K`` lists exactly the student's steps. diffusers' DDIM step goes from t to
t - T // K, which is the student's next kept step when K divides T (K <= 8 for T = 200 or
1000); otherwise the export is refused with a one-line reason. ``set_alpha_to_one`` makes the
last step land on x0, and ``clip_sample`` clamps x0 as the teacher did. Sample with
``use_clipped_model_output=True`` (``DDIMPipeline(...)(num_inference_steps=K, eta=0.0,
use_clipped_model_output=True)``): the student's steps recompute eps from the clamped x0, as
this package's DDIM does; diffusers' default keeps the unclamped one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..respacing import space_timesteps


def diffusers_walk(T: int, K: int) -> list[tuple[int, int]]:
    """(t, prev) pairs diffusers' DDIMScheduler visits with trailing spacing (prev -1 = x0)."""
    ts = (np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1).tolist()
    return [(t, t - T // K if t - T // K >= 0 else -1) for t in ts]


def student_scheduler(sched: dict[str, Any], kept: Sequence[int]) -> tuple[dict[str, Any] | None, str | None]:
    """``sched`` (our DDPMScheduler config of the student's diffusion) as a DDIMScheduler config
    that samples the student on ``kept``; or (None, why) when diffusers' DDIM cannot walk them."""
    T, K = int(sched["num_train_timesteps"]), len(kept)
    kept = [int(k) for k in kept]
    ours = [(kept[j], kept[j - 1] if j > 0 else -1) for j in range(K - 1, -1, -1)]
    if kept != [int(k) for k in space_timesteps(T, K, "trailing")] or diffusers_walk(T, K) != ours:
        return None, (f"diffusers' DDIMScheduler steps by T//K = {T // K} and cannot walk this {K}-step student's "
                      f"kept steps {kept}; sample it with ddpm sample")
    out = {k: v for k, v in sched.items() if k != "variance_type"}
    out.update(_class_name="DDIMScheduler", set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0,
               clip_sample=True, clip_sample_range=1.0, rescale_betas_zero_snr=False)
    return out, None
