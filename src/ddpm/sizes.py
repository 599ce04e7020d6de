"""Model size families for one's own images: ``tiny | small | base`` at each supported resolution.

``config_for(resolution, channels, size, source)`` is the run config ``ddpm train --data X``
uses when no ``--preset`` is given. The network follows the paper's U-Net (section 4 and
Appendix B), its depth per resolution follows improved-diffusion's channel multipliers
(Nichol & Dhariwal 2021): 32: 1,2,2,2; 64: 1,2,3,4; 128: 1,1,2,3,4; 256: 1,1,2,2,4,4. Those four
halve the image until the lowest feature map is 4-8 pixels; the other supported sizes follow the
same rule with the neighbouring power of two's multipliers: 8: 1,2 (the digits preset's,
8 -> 4); 16: 1,2,2 (16 -> 4); 48: 1,2,2,2 (48 -> 6, as 32); 96: 1,1,2,3,4 (96 -> 6, as 128);
192: 1,1,2,2,4,4 (192 -> 6, as 256). Attention
sits at the paper's 16x16 level (12x12 for the 3·2^k sizes, the level closest to it), and below
32 pixels at the first downsampled level (the digits preset's 4x4 at 8x8).

Sizes (``ch`` the base width; every width ch·mult must be a multiple of 32 for GroupNorm):

- ``tiny``: ch 32, one ResBlock per level, no dropout, T = 200 (linear betas rescaled by 1000/T,
  improved-diffusion's rule, as the digits preset), batch 32, 1,500 steps: meant for a first
  look at simple data within about 15 minutes on a 2-core CPU at 32x32. It trains with the
  recipe measured best for short runs rather than the paper's (README "Training faster"): lr 2e-3
  decaying linearly to 0 after a 100-step warm-up, Adam beta2 0.99, EMA 0.99, and **no random
  flips**. On the 32x32 folder of the 1,797 scikit-learn digits, 1,000 steps of the paper's recipe
  with flips score digits Frechet distance 91.1 (500 samples shrunk back to 8x8), this recipe
  without flips 6.85, and 3.74 at 1,500 steps (the default run: 9 min 57 s on 2 quiet Xeon
  cores). Flips are off because a short run gains nothing from augmentation (it sees each image a
  few dozen times) while a flip is wrong for data with a handedness: half-mirrored real digits
  alone score 7.3 where the real ones score 1.6. ``--set data.random_flip=true`` puts
  them back (the ``small`` and ``base`` sizes, long runs, keep the paper's flips).
- ``small``: ch 64, two ResBlocks per level, dropout 0.1, T = 1000, lr 2e-4, batch 64, EMA
  0.9999: one GPU, hours.
- ``base``: the paper's width (ch 128, two ResBlocks, T = 1000, lr 2e-4, batch 128 up to 64
  pixels; lr 2e-5, batch 64 above, as the 256x256 runs), dropout 0.1 up to 64 pixels, else 0.

Automatic resolution (:func:`auto_resolution`): the largest supported size not above the
smallest image's shorter side (images are never enlarged), at most 256.
"""

from __future__ import annotations

from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from .errors import ConfigError, suggest
from .options import MODEL_SIZES

# Supported resolution -> channel multipliers (module docstring: why these).
CH_MULT: dict[int, tuple[int, ...]] = {
    8: (1, 2),
    16: (1, 2, 2),
    32: (1, 2, 2, 2),
    48: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    96: (1, 1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    192: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
}
RESOLUTIONS: tuple[int, ...] = tuple(sorted(CH_MULT))
TINY_STEPS = 1500  # module doc: the tiny size's run length
MAX_AUTO_RESOLUTION = 256


def _attention_level(resolution: int) -> int:
    """Side of the level that gets self-attention: the paper's 16 (or the level closest to it)."""
    sides, s = [], resolution
    for _ in CH_MULT[resolution]:
        sides.append(s)
        s //= 2
    if resolution < 32:
        return sides[1]
    return min(sides, key=lambda v: (abs(v - 16), v))


def check_size(size: str) -> str:
    if size not in MODEL_SIZES:
        raise ConfigError(f"--size {size!r}: expected one of {', '.join(MODEL_SIZES)}{suggest(size, MODEL_SIZES)}")
    return size


def check_resolution(resolution: int) -> int:
    if resolution not in CH_MULT:
        raise ConfigError(f"--resolution {resolution}: the size family supports "
                          f"{', '.join(map(str, RESOLUTIONS))}; expected one of these (or a --preset with "
                          f"--set model.resolution=... model.ch_mult=...)")
    return int(resolution)


def auto_resolution(min_side: int) -> int:
    """The largest supported resolution <= ``min_side`` (pixels) and <= 256; 8 if even 8 is too big
    (the loader then refuses the too-small images with a one-line DataError)."""
    fits = [r for r in RESOLUTIONS if r <= min(int(min_side), MAX_AUTO_RESOLUTION)]
    return fits[-1] if fits else RESOLUTIONS[0]


def model_for(resolution: int, channels: int, size: str) -> ModelConfig:
    """The U-Net of ``size`` at ``resolution`` (pixels) for ``channels`` (1 or 3) image channels."""
    check_size(size)
    check_resolution(resolution)
    ch, blocks, dropout = {"tiny": (32, 1, 0.0), "small": (64, 2, 0.1),
                           "base": (128, 2, 0.1 if resolution <= 64 else 0.0)}[size]
    return ModelConfig(resolution=resolution, in_channels=channels, ch=ch, ch_mult=CH_MULT[resolution],
                       num_res_blocks=blocks, attn_resolutions=(_attention_level(resolution),), dropout=dropout)


def config_for(resolution: int, channels: int, size: str, source: str) -> Config:
    """A whole run for one's own images: :func:`model_for` plus the size's diffusion and training."""
    model = model_for(resolution, channels, size)
    data = DataConfig(source=source, random_flip=size != "tiny")  # module doc: why tiny has no flips
    if size == "tiny":
        diffusion = DiffusionConfig(num_timesteps=200, beta_start=5e-4, beta_end=0.1)
        # the short-run recipe of the module doc; more pixels cost proportionally more time per
        # step (the plan says how long)
        every = TINY_STEPS // 4
        train = TrainConfig(total_steps=TINY_STEPS, batch_size=32, lr=2e-3, lr_schedule="linear", warmup_steps=100,
                            adam_beta2=0.99, ema_decay=0.99, log_every=50, sample_every=every, sample_n=64,
                            save_every=every)
    elif size == "small":
        diffusion = DiffusionConfig()
        train = TrainConfig(total_steps=200_000, batch_size=64, lr=2e-4, warmup_steps=5000,
                            sample_every=10_000, save_every=10_000)
    else:
        diffusion = DiffusionConfig(var_type="fixedlarge" if resolution <= 64 else "fixedsmall")
        big = resolution > 64
        train = TrainConfig(total_steps=800_000, batch_size=64 if big else 128, lr=2e-5 if big else 2e-4,
                            sample_every=50_000 if big else 10_000, sample_n=16 if big else 64)
    return Config(preset=f"{size}{resolution}", model=model, diffusion=diffusion, data=data, train=train).validate()
