"""Run configuration: frozen dataclasses, the paper's runs as named presets, ``--set`` overrides.

A :class:`Config` has four parts: ``model`` (the U-Net), ``diffusion`` (schedule and
parameterisation), ``data`` and ``train``. Presets are the paper's runs (paper Appendix B and
10); every run writes its resolved config as JSON and every checkpoint carries it.

Overrides are ``section.key=value`` strings (``train.lr=1e-4``); a bare ``key=value`` is
accepted when the key name is unique across sections. Values are parsed by the field's type
and validated; mistakes raise :class:`ConfigError` naming the key and suggesting the closest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError, suggest
from .options import (BETA_SCHEDULES, EMA_WARMUPS, LOSS_TYPES, LR_SCHEDULES, MEAN_TYPES, PRECISIONS, T_SAMPLERS,
                      VAR_TYPES, parse_loss_weighting)


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net (paper Appendix B). Output channels are derived: C, or 2C for learned variances."""

    resolution: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    # Class-conditional network (classifier-free guidance): C classes, labels 0..C-1 from the data;
    # 0 = unconditional (the paper's models; configs and checkpoints without the key load as 0).
    num_classes: int = 0
    # Activation checkpointing of the ResBlocks (torch.utils.checkpoint): their activations are
    # recomputed in the backward pass instead of kept, for large resolutions on small GPUs (about
    # one more forward pass of time); gradients are bit-identical with it on and off.
    checkpointing: bool = False

    def validate(self) -> None:
        _check(isinstance(self.checkpointing, bool), "model.checkpointing", self.checkpointing, "true or false")
        _check(self.resolution >= 4, "model.resolution", self.resolution, "an integer >= 4")
        _check(self.in_channels in (1, 3, 4), "model.in_channels", self.in_channels, "1, 3 or 4")
        _check(self.ch >= 32 and self.ch % 32 == 0, "model.ch", self.ch, "a multiple of 32 (GroupNorm uses 32 groups)")
        _check(len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult), "model.ch_mult", self.ch_mult,
               "a comma-separated list of positive integers")
        _check(self.resolution % (2 ** (len(self.ch_mult) - 1)) == 0, "model.ch_mult", self.ch_mult,
               f"at most {_max_levels(self.resolution)} levels for resolution {self.resolution} (each level halves it)")
        _check(self.num_res_blocks >= 1, "model.num_res_blocks", self.num_res_blocks, "an integer >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")
        _check(self.num_classes >= 0, "model.num_classes", self.num_classes, "an integer >= 0 (0 = unconditional)")


@dataclass(frozen=True)
class DiffusionConfig:
    """Schedule and parameterisation (paper sections 2-3). ``t`` is 0-based everywhere."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: str = "eps"
    var_type: str = "fixedlarge"
    loss_type: str = "mse"

    def validate(self) -> None:
        _check(self.num_timesteps >= 2, "diffusion.num_timesteps", self.num_timesteps, "an integer >= 2")
        _choice(self.beta_schedule, BETA_SCHEDULES, "diffusion.beta_schedule")
        _choice(self.mean_type, MEAN_TYPES, "diffusion.mean_type")
        _choice(self.var_type, VAR_TYPES, "diffusion.var_type")
        _choice(self.loss_type, LOSS_TYPES, "diffusion.loss_type")
        _check(0.0 < self.beta_start <= self.beta_end <= 1.0, "diffusion.beta_start/beta_end",
               (self.beta_start, self.beta_end), "0 < beta_start <= beta_end <= 1")

    @property
    def learned_variance(self) -> bool:
        return self.var_type in ("learned", "learned_range")


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from (see :mod:`ddpm.data`).

    ``source`` is ``digits`` (embedded), a CIFAR-10 python archive or folder, an image folder,
    or an ``.npz``/``.npy`` of uint8 images. Images are centre-cropped and resized to
    ``model.resolution`` with ``model.in_channels`` channels.
    """

    source: str = "digits"
    random_flip: bool = True
    skip_bad_images: bool = False
    # Class names of a conditional run, label order (an image folder's subfolders, sorted);
    # filled in by the trainer from the data, empty for unconditional runs.
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(bool(self.source), "data.source", self.source, "a dataset name or path")


def _auto_bool(v):
    """--set and JSON give strings or booleans: True, False or the lower-cased string ("auto")."""
    if isinstance(v, str):
        low = v.strip().lower()
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(low, low)
    return v


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper Appendix B): Adam, linear warm-up from 0, clipping, EMA."""

    total_steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999
    grad_accum: int = 1
    seed: int = 0
    t_sampler: str = "uniform"
    precision: str = "auto"
    compile: bool = False
    # CUDA: capture the whole step (forward, backward, clipping, Adam, EMA) once in a CUDA graph
    # and replay it (ddpm.training.graphstep); one process, uniform t, bf16/fp32
    cuda_graph: bool = False
    # NHWC weights and activations: "auto" (default) decides on the CPU together with the
    # convolution routing, by timing the run's step at its batch once per machine
    # (ddpm.netpath.for_training); on CUDA NHWC only with compile. true/false force it.
    channels_last: bool | str = "auto"
    # CPU float32 eager runs: Winograd F(4x4,3x3) for the wide 3x3 convs (ddpm.winograd) where
    # the timing above finds it faster; false: never. No effect with compile, autocast, on CUDA
    winograd: bool = True
    max_nonfinite_in_row: int = 20
    log_every: int = 100
    sample_every: int = 10_000
    sample_n: int = 64
    sample_seed: int = 0
    save_every: int = 10_000
    # Also checkpoint when this many minutes passed since the last checkpoint (0 = off), so
    # that long steps on big models never leave hours unsaved.
    save_every_minutes: float = 0.0
    keep_last: int = 3
    # Rewrite RUN/report.html (ddpm.report: status, curves, sample grids, results) this often, in
    # minutes, and once at the end of the run (0 = off). Rank 0 only; a failure is a warning.
    report_every: float = 5.0
    num_workers: int = 0
    # The whole training set on the training device as uint8, batches gathered and flipped there
    # (no host-to-device copy of images per step): "auto" on CUDA when it takes <= 2 GiB and
    # <= 10% of the device's memory (CIFAR-10: 150 MB), never on the CPU; true/false force it.
    data_on_device: bool | str = "auto"
    # Label dropout for classifier-free guidance: the probability that an image's label is
    # replaced by the null label (only used when model.num_classes > 0).
    p_uncond: float = 0.1
    # Recipes since the paper (ddpm.training.weighting / schedules); the defaults are the paper's.
    # Loss weight per t: none (L_simple) | min_snr:G (Hang et al. 2023) | p2:K,G (Choi et al. 2022).
    loss_weighting: str = "none"
    # LR after warm-up: constant (the paper) | cosine | linear (to 0 at total_steps).
    lr_schedule: str = "constant"
    # EMA decay warm-up: none (the paper) | ramp (min(ema_decay, (1+n)/(10+n)) at update n).
    ema_warmup: str = "none"
    # Progress grids (every sample_every steps): a few-step solver from the sampler registry and
    # its network calls (grid_steps 0 = the full T-step chain of grid_sampler).
    grid_sampler: str = "dpm++2m"
    grid_steps: int = 20

    def __post_init__(self) -> None:
        # --set and JSON give strings or booleans: store True, False or "auto"
        v = self.channels_last
        if isinstance(v, str):
            low = v.strip().lower()
            v = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}.get(low, low)
        object.__setattr__(self, "channels_last", v)
        object.__setattr__(self, "data_on_device", _auto_bool(self.data_on_device))

    def validate(self) -> None:
        _check(self.total_steps >= 1, "train.total_steps", self.total_steps, "an integer >= 1")
        _check(self.channels_last is True or self.channels_last is False or self.channels_last == "auto",
               "train.channels_last", self.channels_last, "auto, true or false")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a positive number")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        _check(0 <= self.adam_beta1 < 1, "train.adam_beta1", self.adam_beta1, "a number in [0, 1)")
        _check(0 <= self.adam_beta2 < 1, "train.adam_beta2", self.adam_beta2, "a number in [0, 1)")
        _check(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "a positive number")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a number in [0, 1)")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "an integer >= 1")
        _check(self.batch_size % self.grad_accum == 0, "train.grad_accum", self.grad_accum,
               f"a divisor of train.batch_size={self.batch_size}")
        _check(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        _choice(self.t_sampler, T_SAMPLERS, "train.t_sampler")
        _choice(self.precision, PRECISIONS, "train.precision")
        _check(self.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row", self.max_nonfinite_in_row, "an integer >= 1")
        for name in ("log_every", "sample_every", "save_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "an integer >= 0 (0 disables)")
        _check(0 <= self.save_every_minutes < float("inf"), "train.save_every_minutes",
               self.save_every_minutes, "a number of minutes >= 0 (0 disables)")
        _check(0 <= self.report_every < float("inf"), "train.report_every", self.report_every,
               "a number of minutes >= 0 (0 disables)")
        _check(self.sample_n >= 1, "train.sample_n", self.sample_n, "an integer >= 1")
        _check(self.keep_last >= 1, "train.keep_last", self.keep_last, "an integer >= 1")
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, "an integer >= 0")
        _check(self.data_on_device is True or self.data_on_device is False or self.data_on_device == "auto",
               "train.data_on_device", self.data_on_device, "auto, true or false")
        _check(0.0 <= self.p_uncond <= 1.0, "train.p_uncond", self.p_uncond, "a probability in [0, 1]")
        try:
            parse_loss_weighting(self.loss_weighting)
        except ValueError as e:
            raise ConfigError(f"invalid value for train.loss_weighting: {self.loss_weighting!r}; expected {e}") from None
        _choice(self.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
        _choice(self.ema_warmup, EMA_WARMUPS, "train.ema_warmup")
        _check(self.grid_steps >= 0, "train.grid_steps", self.grid_steps,
               "an integer >= 0 (network calls per progress grid; 0 = the full chain)")
        from .samplers import names as sampler_names  # the registry is the samplers' one declaration

        _choice(self.grid_sampler, sampler_names(), "train.grid_sampler")


@dataclass(frozen=True)
class Config:
    """A whole run. ``preset`` records which named config it started from."""

    preset: str = "cifar10"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def out_channels(self) -> int:
        """Network output channels: C, or 2C when the variance is learned."""
        return self.model.in_channels * (2 if self.diffusion.learned_variance else 1)

    def validate(self) -> "Config":
        for part in (self.model, self.diffusion, self.data, self.train):
            part.validate()
        if parse_loss_weighting(self.train.loss_weighting)[0] != "none":
            # the weight multiplies the MSE of eps / x0 / v (ddpm.training.weighting)
            _check(self.diffusion.loss_type == "mse", "train.loss_weighting", self.train.loss_weighting,
                   f"none with diffusion.loss_type={self.diffusion.loss_type} (a weighting needs loss_type=mse)")
            _check(self.diffusion.mean_type in ("eps", "xstart", "v"), "train.loss_weighting",
                   self.train.loss_weighting,
                   f"none with diffusion.mean_type={self.diffusion.mean_type} (a weighting needs eps, xstart or v)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`. Unknown keys raise (they mean another version or a typo)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for k, v in d.items():
            if k not in hints:
                raise ConfigError(f"unknown config section '{k}'{suggest(k, hints)}")
            sub = hints[k]
            if dataclasses.is_dataclass(sub):
                kwargs[k] = _section_from_dict(sub, v, k)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _section_from_dict(typ: type, d: Any, name: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{name}' must be an object")
    hints = get_type_hints(typ)
    kwargs = {}
    for k, v in d.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{name}.{k}'{suggest(k, hints)}")
        kwargs[k] = tuple(v) if get_origin(hints[k]) is tuple else v
    return typ(**kwargs)


def _max_levels(resolution: int) -> int:
    n = 1
    while resolution % 2 == 0 and resolution > 4:
        resolution //= 2
        n += 1
    return n


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {value!r}; expected {expected}")


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value for {key}: {value!r}; expected one of {', '.join(choices)}"
                          f"{suggest(value, choices)}")


# ----------------------------------------------------------------------------------------------
# Presets: the paper's runs (paper Appendix B) and small configurations for this machine.

_CIFAR_MODEL = ModelConfig(resolution=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,),
                           dropout=0.1)
_256_MODEL = ModelConfig(resolution=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,),
                         dropout=0.0)
_CIFAR = Config(preset="cifar10", model=_CIFAR_MODEL, diffusion=DiffusionConfig(var_type="fixedlarge"),
                data=DataConfig(source="cifar-10-python.tar.gz", random_flip=True),
                train=TrainConfig(total_steps=800_000, batch_size=128, lr=2e-4))


def _lsun(name: str, steps: int, flip: bool, source: str, ch: int = 128) -> Config:
    return Config(preset=name, model=replace(_256_MODEL, ch=ch), diffusion=DiffusionConfig(var_type="fixedsmall"),
                  data=DataConfig(source=source, random_flip=flip),
                  train=TrainConfig(total_steps=steps, batch_size=64, lr=2e-5, sample_every=50_000, sample_n=16))


def _ablation(name: str, mean: str, var: str, loss: str) -> Config:
    return replace(_CIFAR, preset=name, diffusion=DiffusionConfig(mean_type=mean, var_type=var, loss_type=loss))


PRESETS: dict[str, Config] = {
    # The default: scikit-learn's 8x8 digits, small enough to train on a 2-core CPU in minutes.
    # Flips are off: a mirrored digit is not a digit. T = 200 with the linear schedule rescaled by
    # 1000/T (improved-diffusion's rule: same signal-to-noise endpoints as the paper's 1e-4..0.02
    # at T = 1000) makes sampling and the exact bits/dim 5x cheaper; everything else is the paper's
    # recipe (eps, MSE, fixedlarge, Adam, warm-up, clipping, EMA) at a scale for minutes, not days.
    "digits": Config(
        preset="digits",
        model=ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2,
                          attn_resolutions=(4,), dropout=0.0),
        diffusion=DiffusionConfig(num_timesteps=200, beta_start=5e-4, beta_end=0.1, var_type="fixedlarge"),
        data=DataConfig(source="digits", random_flip=False),
        train=TrainConfig(total_steps=1500, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                          log_every=50, sample_every=500, sample_n=64, save_every=500, keep_last=3),
    ),
    # Table 1 / Table 2 "L_simple" row: eps prediction, MSE, fixedlarge for sampling and bits/dim.
    "cifar10": _CIFAR,
    # Table 2 ablations over cifar10 (paper Table 2). "mu" is the paper's mu-tilde prediction (xprev).
    "cifar10_mu_kl_learned": _ablation("cifar10_mu_kl_learned", "xprev", "learned", "kl"),
    "cifar10_mu_kl_fixed": _ablation("cifar10_mu_kl_fixed", "xprev", "fixedlarge", "kl"),
    "cifar10_mu_mse": _ablation("cifar10_mu_mse", "xprev", "fixedlarge", "mse"),
    "cifar10_eps_kl_learned": _ablation("cifar10_eps_kl_learned", "eps", "learned", "kl"),
    "cifar10_eps_kl_fixed": _ablation("cifar10_eps_kl_fixed", "eps", "fixedlarge", "kl"),
    # 256x256 runs (paper Appendix B). Flips follow the paper: on for all but LSUN Bedroom (docs/DEVIATIONS.md).
    "celebahq256": _lsun("celebahq256", 500_000, True, "celebahq256/"),
    "lsun_bedroom256": _lsun("lsun_bedroom256", 2_400_000, False, "lsun_bedroom/"),
    "lsun_church256": _lsun("lsun_church256", 1_200_000, True, "lsun_church/"),
    "lsun_cat256": _lsun("lsun_cat256", 1_800_000, True, "lsun_cat/"),
    "lsun_bedroom256_large": _lsun("lsun_bedroom256_large", 1_150_000, False, "lsun_bedroom/", ch=192),
}
# Class-conditional twins for classifier-free guidance (Ho & Salimans 2022): the same network,
# schedule and budget plus a 10-row (+ null) class embedding and 10% label dropout.
PRESETS["digits_cond"] = replace(PRESETS["digits"], preset="digits_cond",
                                 model=replace(PRESETS["digits"].model, num_classes=10),
                                 train=replace(PRESETS["digits"].train, p_uncond=0.1))
# v-prediction twin (Salimans & Ho, ICLR 2022, section 4): the network predicts
# v = alpha_t eps - sigma_t x0 and trains on ||v - v_hat||^2; everything else is digits'.
PRESETS["digits_v"] = replace(PRESETS["digits"], preset="digits_v",
                              diffusion=replace(PRESETS["digits"].diffusion, mean_type="v"))
PRESETS["cifar10_cond"] = replace(_CIFAR, preset="cifar10_cond", model=replace(_CIFAR_MODEL, num_classes=10),
                                  train=replace(_CIFAR.train, p_uncond=0.1))

PRESET_HELP: dict[str, str] = {
    "digits": "default; sklearn 8x8 digits, small U-Net, trains on a CPU in minutes",
    "cifar10": "Table 1/2 L_simple: eps, mse, fixedlarge, lr 2e-4, batch 128, dropout 0.1, 800k steps",
    "digits_v": "digits with v-prediction (Salimans & Ho 2022): v = alpha eps - sigma x0, loss ||v - v_hat||^2",
    "digits_cond": "digits with its 10 classes: class embedding, label dropout 0.1, classifier-free guidance",
    "cifar10_cond": "cifar10 with its 10 classes: class embedding, label dropout 0.1, classifier-free guidance",
    "cifar10_mu_kl_learned": "Table 2: mu-tilde prediction, true bound L, learned diagonal Sigma",
    "cifar10_mu_kl_fixed": "Table 2: mu-tilde prediction, true bound L, fixed isotropic Sigma",
    "cifar10_mu_mse": "Table 2: mu-tilde prediction, ||mu-tilde - mu_theta||^2 (unstable in the paper)",
    "cifar10_eps_kl_learned": "Table 2: eps prediction, true bound L, learned Sigma (unstable in the paper)",
    "cifar10_eps_kl_fixed": "Table 1/2: eps prediction, true bound L, fixed isotropic Sigma",
    "celebahq256": "CelebA-HQ 256: lr 2e-5, batch 64, fixedsmall, 0.5M steps",
    "lsun_bedroom256": "Table 3 LSUN Bedroom: lr 2e-5, batch 64, fixedsmall, no flips, 2.4M steps",
    "lsun_church256": "Table 3 LSUN Church: lr 2e-5, batch 64, fixedsmall, 1.2M steps",
    "lsun_cat256": "Table 3 LSUN Cat: lr 2e-5, batch 64, fixedsmall, 1.8M steps",
    "lsun_bedroom256_large": "Table 3 large Bedroom: ch 192 (256M params), no flips, 1.15M steps",
}


def get_preset(name: str) -> Config:
    """The named preset, validated. Unknown names raise with the closest suggestion."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'{suggest(name, PRESETS)}; "
                          f"available: {', '.join(PRESETS)}")
    return PRESETS[name].validate()


# ----------------------------------------------------------------------------------------------
# Overrides


def _leaf_index() -> dict[str, list[str]]:
    """Map each bare key name to the sections that have it."""
    out: dict[str, list[str]] = {}
    for sec in ("model", "diffusion", "data", "train"):
        for f in fields(get_type_hints(Config)[sec]):
            out.setdefault(f.name, []).append(sec)
    return out


def _parse_value(raw: str, typ: Any, key: str) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            v = float(raw)
            if not v.is_integer():
                raise ValueError
            return int(v)
        if typ is float:
            return float(raw)
        if get_origin(typ) is tuple:
            inner = get_args(typ)[0]
            parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
            return tuple(_parse_value(p.strip(), inner, key) for p in parts)
        return raw
    except ValueError:
        name = getattr(typ, "__name__", None) or ("comma-separated list of integers" if get_origin(typ) is tuple else str(typ))
        raise ConfigError(f"invalid value for {key}: {raw!r}; expected {name}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` (or unique ``key=value``) strings and validate the result."""
    leaves = _leaf_index()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." in key:
            sec, name = key.split(".", 1)
            if sec not in ("model", "diffusion", "data", "train"):
                raise ConfigError(f"unknown config section '{sec}' in --set {item!r}"
                                  f"{suggest(sec, ['model', 'diffusion', 'data', 'train'])}")
        else:
            name = key
            secs = leaves.get(name)
            if not secs:
                all_keys = [f"{s}.{k}" for k, ss in leaves.items() for s in ss] + list(leaves)
                raise ConfigError(f"unknown config key '{key}'{suggest(key, all_keys)}")
            if len(secs) > 1:
                raise ConfigError(f"config key '{key}' is ambiguous; use one of {', '.join(s + '.' + key for s in secs)}")
            sec = secs[0]
        part = getattr(cfg, sec)
        hints = get_type_hints(type(part))
        if name not in hints:
            raise ConfigError(f"unknown config key '{sec}.{name}'{suggest(name, hints)}")
        value = _parse_value(raw, hints[name], f"{sec}.{name}")
        cfg = replace(cfg, **{sec: replace(part, **{name: value})})
    return cfg.validate()
