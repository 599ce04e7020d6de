"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, Algorithm 2): a student that takes one deterministic DDIM step
where its teacher takes two, halved phase after phase down to a few network calls.

- :mod:`.grid`: the kept DDPM indices of every phase (start grid, halving).
- :mod:`.target`: the two-teacher-step target x_tilde and the truncated-SNR weight.
- :mod:`.phase`: one optimiser step of a phase (reusing ``training``'s optimiser, EMA, seeds).
- :mod:`.settings`: the settings, their defaults, the phases and the student's config (v-prediction).
- :mod:`.run`: the driver (run folder, lock, graceful stop, checkpoints, exact resume).
- :mod:`.files`: the run folder's files, and which student ``ddpm sample`` picks.
- :mod:`.sample`: DDIM on a student's kept indices.
- :mod:`.plan`: what ``ddpm distill`` prints first.
"""

from .files import choose_student, is_distilled_run, list_students
from .grid import default_start, halve, start_grid
from .run import distill
from .sample import sample_student
from .settings import DistillSettings, default_settings, phases

__all__ = ["distill", "DistillSettings", "default_settings", "phases", "sample_student", "choose_student",
           "is_distilled_run", "list_students", "default_start", "halve", "start_grid"]
