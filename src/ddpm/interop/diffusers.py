"""Weights to and from diffusers' ``UNet2DModel`` (the layout of the released DDPM weights).

diffusers is *not* needed at run time: folders are read and written as JSON + safetensors.

Correspondence (see ``ddpm.nets.unet`` for our names; ``L`` = number of levels)::

    ours                                   diffusers UNet2DModel
    conv_in                                conv_in
    temb.dense0 / temb.dense1              time_embedding.linear_1 / linear_2
    down.{l}.block.{j}.norm1|conv1|norm2|conv2   down_blocks.{l}.resnets.{j}.(same)
    ...block.{j}.temb_proj                 ...resnets.{j}.time_emb_proj
    ...block.{j}.nin_shortcut              ...resnets.{j}.conv_shortcut
    down.{l}.attn.{j}.norm|q|k|v|proj_out  down_blocks.{l}.attentions.{j}.group_norm|to_q|to_k|to_v|to_out.0
                                           (old files: query|key|value|proj_attn, also read)
    down.{l}.downsample.conv               down_blocks.{l}.downsamplers.0.conv
    mid.block_1 / mid.attn_1 / mid.block_2 mid_block.resnets.0 / attentions.0 / resnets.1
    up.{l}.block|attn.{j}                  up_blocks.{L-1-l}.resnets|attentions.{j}
    up.{l}.upsample.conv                   up_blocks.{L-1-l}.upsamplers.0.conv
    norm_out / conv_out                    conv_norm_out / conv_out
    class_emb                              class_embedding (conditional models)

The architectures agree exactly when the diffusers config uses the official settings: a
positional embedding with ``flip_sin_to_cos=False`` and ``freq_shift=1`` (sin first, divisor
half-1), GroupNorm 32 / eps 1e-6, silu, single-head attention (``attention_head_dim`` None or
equal to the block's channels), ``downsample_padding=0`` (pad right/bottom by one, TF SAME),
additive time embedding, a mid block with attention, and ``block_out_channels[0] == ch``
(diffusers' ``conv_in`` outputs ``block_out_channels[0]``, the official one ``ch``; so
``ch_mult[0]`` must be 1). :func:`diffusers_config_to_model` checks every such field.

Class-conditional models: our ``class_emb`` (num_classes + 1 rows, the last the null label of
classifier-free guidance) is diffusers' ``class_embedding`` with ``class_embed_type`` null and
``num_class_embeds = num_classes + 1``; both add it to the time embedding after its MLP, so
``UNet2DModel(x, t, class_labels=y)`` equals ``UNet(x, t, y)``. A diffusers model with
``num_class_embeds = N`` therefore reads as ``num_classes = N - 1``: its last row is taken as the
null label (a model trained without one still converts; guidance then means little).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ..nets.unet import attention_levels, level_resolutions

__all__ = [
    "diffusers_config_to_model", "model_to_diffusers_config", "state_dict_from_diffusers", "state_dict_to_diffusers",
    "from_diffusers_dir", "to_diffusers_dir", "scheduler_config_to_diffusion", "diffusion_to_scheduler_config",
]

CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel.__init__ defaults (diffusers 0.25-0.42): a key missing from config.json means this.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

# DDPMScheduler.__init__ defaults for the fields we read.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon",
}

_VAR_FROM_DIFFUSERS = {"fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge",
                       "fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall", "learned_range": "learned_range"}
_VAR_TO_DIFFUSERS = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned_range": "learned_range"}
# v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, section 4) is diffusers' "v_prediction", with the
# same alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (its get_velocity).
_MEAN_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "xstart", "v_prediction": "v"}
_MEAN_TO_DIFFUSERS = {"eps": "epsilon", "xstart": "sample", "v": "v_prediction"}
_SCHEDULE_FROM_DIFFUSERS = {"linear": "linear", "scaled_linear": "quad"}
_SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "quad": "scaled_linear"}


def _unsupported(where: str, field: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(f"{where}: unsupported {field}={json.dumps(value)}; supported: {supported}")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def diffusers_config_to_model(cfg: Mapping[str, Any], where: str = "diffusers config.json"):
    """Check a ``UNet2DModel`` config and translate it.

    Args:
        cfg: the parsed ``config.json``; missing keys take diffusers' defaults.
        where: how to name the file in error messages.
    Returns:
        (``ddpm.config.ModelConfig``, out_channels).
    Raises:
        CheckpointError: a field the official architecture cannot express, naming the field, its
            value and what is supported.
    """
    from ..config import ModelConfig

    c = dict(UNET2D_DEFAULTS)
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key not in UNET2D_DEFAULTS:
            raise CheckpointError(f"{where}: unknown UNet2DModel field {key!r}={json.dumps(value)}; this converter "
                                  f"knows {', '.join(sorted(UNET2D_DEFAULTS))}")
        c[key] = value
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise _unsupported(where, "_class_name", cls, '"UNet2DModel"')

    def need(field: str, ok: bool, supported: str) -> None:
        if not ok:
            raise _unsupported(where, field, c[field], supported)

    need("time_embedding_type", c["time_embedding_type"] == "positional", '"positional"')
    need("flip_sin_to_cos", c["flip_sin_to_cos"] is False, "false (sin first, as the official embedding)")
    need("freq_shift", c["freq_shift"] == 1, "1 (frequency divisor half-1, as the official embedding)")
    need("center_input_sample", c["center_input_sample"] is False, "false")
    need("act_fn", c["act_fn"] in ("silu", "swish"), '"silu"')
    need("norm_num_groups", c["norm_num_groups"] == 32, "32")
    need("attn_norm_num_groups", c["attn_norm_num_groups"] in (None, 32), "null or 32")
    need("norm_eps", isinstance(c["norm_eps"], (int, float)) and math.isclose(c["norm_eps"], 1e-6, rel_tol=1e-6),
         "1e-06 (TF group_norm's epsilon)")
    need("resnet_time_scale_shift", c["resnet_time_scale_shift"] == "default", '"default" (additive time embedding)')
    need("mid_block_scale_factor", c["mid_block_scale_factor"] == 1, "1 (unscaled residuals)")
    need("downsample_padding", c["downsample_padding"] == 0,
         "0 (pad right/bottom by one before the stride-2 conv: TF 'SAME', as the released weights)")
    need("downsample_type", c["downsample_type"] == "conv", '"conv"')
    need("upsample_type", c["upsample_type"] == "conv", '"conv"')
    need("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", '"UNetMidBlock2D"')
    need("add_attention", c["add_attention"] is True, "true (the official middle block has attention)")
    need("class_embed_type", c["class_embed_type"] is None,
         "null (unconditional, or a class table with num_class_embeds)")
    need("num_class_embeds", c["num_class_embeds"] is None
         or (isinstance(c["num_class_embeds"], int) and not isinstance(c["num_class_embeds"], bool)
             and c["num_class_embeds"] >= 2),
         "null (unconditional) or an integer >= 2 (the classes plus the null label)")
    need("layers_per_block", isinstance(c["layers_per_block"], int) and c["layers_per_block"] >= 1,
         "an integer >= 1 (the same for every block)")
    need("dropout", isinstance(c["dropout"], (int, float)) and 0.0 <= c["dropout"] < 1.0, "a number in [0, 1)")

    boc = c["block_out_channels"]
    need("block_out_channels", isinstance(boc, (list, tuple)) and len(boc) >= 1
         and all(isinstance(b, int) and b > 0 for b in boc) and all(b % boc[0] == 0 for b in boc),
         "a list of positive integers, each a multiple of the first (ch * ch_mult)")
    n = len(boc)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    need("down_block_types", len(down) == n and all(b in ("DownBlock2D", "AttnDownBlock2D") for b in down),
         f"{n} entries (one per block_out_channels) of DownBlock2D / AttnDownBlock2D")
    need("up_block_types", len(up) == n and all(b in ("UpBlock2D", "AttnUpBlock2D") for b in up),
         f"{n} entries of UpBlock2D / AttnUpBlock2D")
    mirrored = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    need("up_block_types", up == mirrored,
         f"the mirror of down_block_types, {json.dumps(mirrored)} (attention at the same resolutions down and up)")

    ch = boc[0]
    ch_mult = tuple(b // ch for b in boc)
    attn_channels = [boc[i] for i, b in enumerate(down) if b == "AttnDownBlock2D"] + [boc[-1]]
    need("attention_head_dim", c["attention_head_dim"] is None or all(c["attention_head_dim"] == a for a in attn_channels),
         f"null or the channel count of every attention block ({sorted(set(attn_channels))}): one head")
    need("time_embedding_dim", c["time_embedding_dim"] in (None, 4 * ch), f"null or {4 * ch} (4 * block_out_channels[0])")

    size = c["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    need("sample_size", isinstance(size, int) and size > 0, "a positive integer (square images)")
    need("in_channels", c["in_channels"] in (1, 3, 4), "1, 3 or 4")
    need("out_channels", c["out_channels"] in (c["in_channels"], 2 * c["in_channels"]),
         f"in_channels ({c['in_channels']}) or twice it (learned variance)")

    attn_res = [r for r, b in zip(level_resolutions(size, len(down)), down) if b == "AttnDownBlock2D"]
    model = ModelConfig(resolution=size, in_channels=c["in_channels"], ch=ch, ch_mult=ch_mult,
                        num_res_blocks=c["layers_per_block"], attn_resolutions=tuple(attn_res),
                        dropout=float(c["dropout"]),
                        num_classes=0 if c["num_class_embeds"] is None else int(c["num_class_embeds"]) - 1)
    try:
        model.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: this UNet2DModel does not fit our model config: {e}") from None
    return model, int(c["out_channels"])


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:
        return "0.25.0"


def model_to_diffusers_config(model_cfg: Any, out_channels: int) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json for a ``ModelConfig`` (every field written out).

    Raises:
        CheckpointError: ``ch_mult[0] != 1`` (diffusers' conv_in width is block_out_channels[0]).
    """
    mc = model_cfg
    if mc.ch_mult[0] != 1:
        raise CheckpointError(f"model.ch_mult={list(mc.ch_mult)} cannot be written as a diffusers UNet2DModel: "
                              f"its conv_in and time embedding use block_out_channels[0], which must equal "
                              f"model.ch, so ch_mult must start with 1")
    down = ["AttnDownBlock2D" if a else "DownBlock2D"
            for a in attention_levels(mc.resolution, len(mc.ch_mult), mc.attn_resolutions)]
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": _diffusers_version(),
        "sample_size": mc.resolution, "in_channels": mc.in_channels, "out_channels": int(out_channels),
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2D", "up_block_types": up,
        "block_out_channels": [mc.ch * m for m in mc.ch_mult], "layers_per_block": mc.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": float(mc.dropout), "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": 32,
        "attn_norm_num_groups": None, "norm_eps": 1e-06, "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None,
        "num_class_embeds": (int(mc.num_classes) + 1) if getattr(mc, "num_classes", 0) else None,
        "num_train_timesteps": None,
    }


# ----------------------------------------------------------------------------------------------
# scheduler_config.json <-> DiffusionConfig


def _default_var_type(resolution: int) -> str:
    # the official sampling scripts: CIFAR-10 (32x32) sampled with fixedlarge, the 256x256 models with fixedsmall.
    return "fixedlarge" if resolution == 32 else "fixedsmall"


def scheduler_config_to_diffusion(sched: Mapping[str, Any] | None, resolution: int, out_channels: int,
                                  in_channels: int, where: str = "scheduler_config.json"):
    """A ``DiffusionConfig`` from a diffusers scheduler config (or the official sampling scripts' defaults if None).

    Sampling-time options (clip_sample, thresholding, timestep_spacing, ...) are not part of our
    config and are ignored: our sampler clips x0 as the official code does.
    Raises:
        CheckpointError: a schedule, prediction type or variance type with no equivalent here.
    """
    from ..config import DiffusionConfig

    learned_out = out_channels == 2 * in_channels
    if sched is None:
        if learned_out:
            raise CheckpointError(f"out_channels={out_channels} means a learned variance, but there is no "
                                  f"{SCHEDULER_NAME} saying which kind; add one with variance_type "
                                  f'"learned_range"')
        return DiffusionConfig(var_type=_default_var_type(resolution))
    s = dict(SCHEDULER_DEFAULTS)
    s.update({k: v for k, v in sched.items() if v is not None or k == "trained_betas"})
    T = int(s["num_train_timesteps"])
    start, end = float(s["beta_start"]), float(s["beta_end"])

    if s["trained_betas"] is not None:
        schedule = _match_trained_betas(s["trained_betas"], start, end, where)
        T = len(s["trained_betas"])
    elif s["beta_schedule"] in _SCHEDULE_FROM_DIFFUSERS:
        schedule = _SCHEDULE_FROM_DIFFUSERS[s["beta_schedule"]]
    elif s["beta_schedule"] == "squaredcos_cap_v2":
        schedule = "cosine"  # improved-diffusion's cosine, cap 0.999: the same formula as ours
    else:
        raise _unsupported(where, "beta_schedule", s["beta_schedule"],
                           '"linear", "scaled_linear" (our quad), "squaredcos_cap_v2" (our cosine) or trained_betas '
                           "matching one of our schedules")
    if s.get("rescale_betas_zero_snr"):
        raise _unsupported(where, "rescale_betas_zero_snr", True, "false")

    pred = s["prediction_type"]
    if pred not in _MEAN_FROM_DIFFUSERS:
        raise _unsupported(where, "prediction_type", pred,
                           '"epsilon" (our eps), "sample" (our xstart) or "v_prediction" (our v)')
    mean_type = _MEAN_FROM_DIFFUSERS[pred]

    if "variance_type" in sched and sched["variance_type"] is not None:
        vt = sched["variance_type"]
        if vt not in _VAR_FROM_DIFFUSERS:
            raise _unsupported(where, "variance_type", vt,
                               '"fixed_large", "fixed_small" (and their _log forms) or "learned_range"; diffusers\' '
                               '"learned" reads the output as a variance, the official "learned" as a log-variance')
        var_type = _VAR_FROM_DIFFUSERS[vt]
    elif learned_out:
        raise CheckpointError(f"{where}: out_channels={out_channels} means a learned variance but variance_type "
                              f'is missing; expected "learned_range"')
    else:
        var_type = _default_var_type(resolution)
    if (var_type in ("learned", "learned_range")) != learned_out:
        raise CheckpointError(f"{where}: variance_type {sched.get('variance_type')!r} does not fit the UNet's "
                              f"out_channels={out_channels} (in_channels={in_channels}; a learned variance needs twice)")
    loss = {"learned": "kl", "learned_range": "hybrid"}.get(var_type, "mse")
    # Schedules that ignore beta_start/beta_end keep our defaults (validation needs 0 < start <= end).
    if schedule in ("cosine", "jsd"):
        start, end = DiffusionConfig.beta_start, DiffusionConfig.beta_end
    dc = DiffusionConfig(num_timesteps=T, beta_schedule=schedule, beta_start=start, beta_end=end,
                         mean_type=mean_type, var_type=var_type, loss_type=loss)
    try:
        dc.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return dc


def _match_trained_betas(betas: Any, start: float, end: float, where: str) -> str:
    import numpy as np

    from ..schedule import SCHEDULES, get_beta_schedule

    b = np.asarray(betas, dtype=np.float64)
    for name in SCHEDULES:
        try:
            ours = get_beta_schedule(name, len(b), start, end)
        except ValueError:
            continue
        if np.allclose(ours, b, rtol=1e-5, atol=1e-8):
            return name
    raise _unsupported(where, "trained_betas", f"<{len(b)} values>",
                       f"one of our schedules ({', '.join(SCHEDULES)}) with beta_start={start}, beta_end={end}")


def diffusion_to_scheduler_config(dc: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A ``DDPMScheduler`` config for a ``DiffusionConfig``, or (None, why) when it has none."""
    if dc.mean_type not in _MEAN_TO_DIFFUSERS:
        return None, (f"diffusion.mean_type={dc.mean_type!r} (the paper's mu-tilde prediction) has no diffusers "
                      f"prediction_type; sample with ddpm's sampler")
    if dc.var_type not in _VAR_TO_DIFFUSERS:
        return None, (f"diffusion.var_type={dc.var_type!r} (a raw log-variance output) has no diffusers variance_type "
                      f"(diffusers' 'learned' reads the output as a variance); sample with ddpm's sampler")
    sched: dict[str, Any] = {
        "_class_name": "DDPMScheduler", "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": dc.num_timesteps, "beta_start": dc.beta_start, "beta_end": dc.beta_end,
    }
    if dc.beta_schedule in _SCHEDULE_TO_DIFFUSERS:
        sched.update(beta_schedule=_SCHEDULE_TO_DIFFUSERS[dc.beta_schedule], trained_betas=None)
    else:
        from ..schedule import get_beta_schedule

        betas = get_beta_schedule(dc.beta_schedule, dc.num_timesteps, dc.beta_start, dc.beta_end)
        sched.update(beta_schedule="linear", trained_betas=[float(x) for x in betas])
    sched.update(variance_type=_VAR_TO_DIFFUSERS[dc.var_type], clip_sample=True, clip_sample_range=1.0,
                 prediction_type=_MEAN_TO_DIFFUSERS[dc.mean_type], thresholding=False,
                 # "trailing" starts fewer-step sampling at t = T-1 like ours; diffusers' "leading" does not.
                 timestep_spacing="trailing", steps_offset=0)
    return sched, None


# ----------------------------------------------------------------------------------------------
# state dicts

_RES_FROM = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
             "conv_shortcut": "nin_shortcut"}
_RES_TO = {v: k for k, v in _RES_FROM.items()}
_ATT_FROM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # second row: pre-0.14 names
_ATT_TO = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_PARAM = r"(weight|bias)"


def _num_levels(keys, pattern: str, what: str) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not levels:
        raise CheckpointError(f"{what}: no down-path weights found (is this a UNet2DModel state dict?)")
    return max(levels) + 1


def state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DModel`` state dict -> ours (same tensors; legacy 1x1-conv attention weights squeezed).

    Raises:
        CheckpointError: a key that has no place in the official architecture.
    """
    L = _num_levels(sd, r"down_blocks\.(\d+)\.", "diffusers state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _key_from_diffusers(key, L)
        if new is None:
            raise CheckpointError(f"diffusers state dict: unexpected weight {key!r} (not part of the official "
                                  f"DDPM U-Net layout)")
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", new) and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # old AttentionBlock stored 1x1 convs
        out[new] = value
    return out


def _key_from_diffusers(key: str, L: int) -> str | None:
    return _translate(key, L, to_ours=True)


def state_dict_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers ``UNet2DModel`` names (current ``to_q``/``to_out.0`` form); same tensors.

    Exact inverse of :func:`state_dict_from_diffusers` on current-format files.
    """
    L = _num_levels(sd, r"down\.(\d+)\.", "ddpm state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _key_to_diffusers(key, L)
        if new is None:
            raise CheckpointError(f"ddpm state dict: unexpected weight {key!r}")
        out[new] = value
    return out


def _key_to_diffusers(key: str, L: int) -> str | None:
    return _translate(key, L, to_ours=False)


# One row per kind of weight, (ours, theirs), read in both directions by :func:`_translate`.
# Fields: {p} weight|bias; {d} a down level (the same index on both sides); {u} an up level (ours
# counts levels, diffusers counts blocks from the bottom: block = L - 1 - level); {j} the block or
# attention index in a level; {res} a ResBlock part (_RES_FROM); {att} an attention part (_ATT_FROM,
# which also reads pre-0.14 names); {mid} ours block_1/block_2 <-> diffusers resnets.0/1.
_NAME_TABLE = (
    ("conv_in.{p}", "conv_in.{p}"),
    ("temb.dense0.{p}", "time_embedding.linear_1.{p}"),
    ("temb.dense1.{p}", "time_embedding.linear_2.{p}"),
    ("norm_out.{p}", "conv_norm_out.{p}"),
    ("conv_out.{p}", "conv_out.{p}"),
    ("class_emb.{p}", "class_embedding.{p}"),
    ("down.{d}.block.{j}.{res}.{p}", "down_blocks.{d}.resnets.{j}.{res}.{p}"),
    ("up.{u}.block.{j}.{res}.{p}", "up_blocks.{u}.resnets.{j}.{res}.{p}"),
    ("down.{d}.attn.{j}.{att}.{p}", "down_blocks.{d}.attentions.{j}.{att}.{p}"),
    ("up.{u}.attn.{j}.{att}.{p}", "up_blocks.{u}.attentions.{j}.{att}.{p}"),
    ("down.{d}.downsample.conv.{p}", "down_blocks.{d}.downsamplers.0.conv.{p}"),
    ("up.{u}.upsample.conv.{p}", "up_blocks.{u}.upsamplers.0.conv.{p}"),
    ("mid.block_{mid}.{res}.{p}", "mid_block.resnets.{mid}.{res}.{p}"),
    ("mid.attn_1.{att}.{p}", "mid_block.attentions.0.{att}.{p}"),
)
_FIELD_RE = {"p": r"weight|bias", "d": r"\d+", "u": r"\d+", "j": r"\d+", "res": r"\w+", "att": r"[\w.]+?",
             "mid": r"\d"}


def _template_re(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(x) if i % 2 == 0 else f"(?P<{x}>{_FIELD_RE[x]})"
                              for i, x in enumerate(parts)))


_COMPILED = [(_template_re(ours), _template_re(theirs), ours, theirs) for ours, theirs in _NAME_TABLE]


def _translate(key: str, L: int, to_ours: bool) -> str | None:
    """``key`` in the other naming (diffusers -> ours with ``to_ours``), or None if no row matches."""
    for ours_re, theirs_re, ours, theirs in _COMPILED:
        m = (theirs_re if to_ours else ours_re).fullmatch(key)
        if m is None:
            continue
        f = dict(m.groupdict())
        if "res" in f:
            f["res"] = (_RES_FROM if to_ours else _RES_TO).get(f["res"])
        if "att" in f:
            f["att"] = (_ATT_FROM if to_ours else _ATT_TO).get(f["att"])
        if "u" in f:
            f["u"] = L - 1 - int(f["u"])  # the mirror is its own inverse
        if "mid" in f:
            mid = int(f["mid"]) + (1 if to_ours else -1)  # ours 1, 2 <-> theirs 0, 1
            f["mid"] = mid if mid in ((1, 2) if to_ours else (0, 1)) else None
        if any(v is None for v in f.values()):
            return None
        return (ours if to_ours else theirs).format(**f)
    return None


# ----------------------------------------------------------------------------------------------
# folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _find_unet_dir(src: Path) -> Path:
    if (src / CONFIG_NAME).is_file():
        return src
    if (src / "unet" / CONFIG_NAME).is_file():
        return src / "unet"
    raise CheckpointError(f"{src}: no diffusers UNet found (expected {src / CONFIG_NAME} or "
                          f"{src / 'unet' / CONFIG_NAME} of a pipeline folder)")


def _load_weights(unet_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, bin_ = (unet_dir / n for n in WEIGHTS_NAMES)
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu"), st
        except Exception as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    if bin_.is_file():
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as e:
            raise CheckpointError(f"{bin_}: cannot be read as plain tensors ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{bin_}: expected a dict of tensors")
        return sd, bin_
    raise CheckpointError(f"{unet_dir}: no weights file (expected {WEIGHTS_NAMES[0]} or {WEIGHTS_NAMES[1]})")


def _find_scheduler(src: Path, unet_dir: Path) -> Path | None:
    for p in (unet_dir / SCHEDULER_NAME, src / SCHEDULER_NAME, src / "scheduler" / SCHEDULER_NAME):
        if p.is_file():
            return p
    return None


def from_diffusers_dir(src_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert a local diffusers ``UNet2DModel`` folder into our checkpoint file.

    Args:
        src_dir: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
            ``.bin``, read with ``weights_only=True``), or a pipeline folder with ``unet/``.
            ``scheduler_config.json`` (beside the weights, in ``src_dir`` or ``scheduler/``) sets
            T, the beta schedule, the prediction and variance type; without one: linear
            1e-4..0.02, T = 1000, eps, and fixedlarge for 32x32 / fixedsmall otherwise (the official sampling scripts).
        out_path: the ``.safetensors`` checkpoint to write (``kind: "weights"``, tensors under
            ``ema/``, floats as float32).
    Returns:
        ``out_path`` as a Path. ``ddpm.load(out_path)`` then gives the model.
    Raises:
        CheckpointError: missing folder/files, unsupported config fields, or weights that do not
            fit the architecture the config describes.
    """
    from .. import __version__
    from ..checkpoint import add_prefix, save_checkpoint
    from ..config import Config
    from ..nets.unet import UNet

    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"diffusers folder not found: {src}")
    unet_dir = _find_unet_dir(src)
    config_path = unet_dir / CONFIG_NAME
    model_cfg, out_ch = diffusers_config_to_model(_read_json(config_path), where=str(config_path))
    sched_path = _find_scheduler(src, unet_dir)
    sched = _read_json(sched_path) if sched_path else None
    diff_cfg = scheduler_config_to_diffusion(sched, model_cfg.resolution, out_ch, model_cfg.in_channels,
                                             where=str(sched_path) if sched_path else SCHEDULER_NAME)
    cfg = Config(preset="converted", model=model_cfg, diffusion=diff_cfg)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{src}: converted config is invalid: {e}") from None
    if cfg.out_channels != out_ch:  # guarded above; kept as a cheap invariant
        raise CheckpointError(f"{src}: out_channels={out_ch} does not fit diffusion var_type {diff_cfg.var_type!r}")

    raw, weights_path = _load_weights(unet_dir)
    state = state_dict_from_diffusers(raw)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in UNet.from_config(model_cfg, out_ch).state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + \
                ([f"shape {'; '.join(wrong[:3])}"] if wrong else [])
        raise CheckpointError(f"{weights_path}: weights do not fit {config_path} ({' | '.join(parts)})")

    meta = {"config": cfg.to_dict(), "kind": "weights", "step": 0, "version": __version__,
            "source": {"format": "diffusers", "path": str(src.resolve()), "weights": weights_path.name,
                       "scheduler": str(sched_path.relative_to(src)) if sched_path else None}}
    out = Path(out_path)
    save_checkpoint(out, add_prefix(state, "ema/"), meta)
    return out


def to_diffusers_dir(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, weights: str = "ema") -> Path:
    """Write our checkpoint as a diffusers folder.

    Files written in ``out_dir`` (the flat layout of the released ``google/ddpm-*`` repos, so the
    weights are stored once)::

        config.json                          UNet2DModel config
        diffusion_pytorch_model.safetensors  UNet weights (``weights``: "ema" or "model")
        scheduler_config.json                DDPMScheduler (betas, T, variance, epsilon/sample/v_prediction, clip)
        model_index.json                     {"unet": UNet2DModel, "scheduler": DDPMScheduler}

    Use::

        from diffusers import UNet2DModel, DDPMPipeline
        unet = UNet2DModel.from_pretrained(out_dir)
        pipe = DDPMPipeline.from_pretrained(out_dir)     # finds unet and scheduler in the root
        images = pipe(batch_size=4, num_inference_steps=1000).images

    diffusers' ``fixed_large`` uses beta_1 at the last step where the official code uses
    beta-tilde_2; no noise is added there, so samples agree (bits/dim would not).

    When diffusers cannot represent the diffusion (``mean_type`` xprev, ``var_type`` learned),
    only the UNet files are written (scheduler_config.json / model_index.json are removed if an
    older export left them) and a ``UserWarning`` says that sampling needs ddpm's sampler.

    Args:
        ckpt_path: a checkpoint file or a run folder (its latest checkpoint).
        out_dir: created if needed; existing files of these names are replaced.
        weights: "ema" (default) or "model".
    Returns:
        ``out_dir`` as a Path.
    Raises:
        CheckpointError: unreadable checkpoint, no such weights, or a model diffusers cannot express.
    """
    from safetensors.torch import save as st_save

    from ..api import load_weights
    from ..checkpoint import atomic_write_bytes

    path, state, cfg, meta = load_weights(ckpt_path, weights)
    unet_cfg = model_to_diffusers_config(cfg.model, cfg.out_channels)
    theirs = state_dict_to_diffusers(state)
    sched, why = diffusion_to_scheduler_config(cfg.diffusion)
    pipeline = "DDPMPipeline"
    if sched is not None and (meta.get("distill") or {}).get("kept"):  # a distilled student: DDIM on its steps
        from ..distill.export import student_scheduler

        sched, why = student_scheduler(sched, meta["distill"]["kept"])
        pipeline = "DDIMPipeline"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAMES[0],
                       st_save({k: v.contiguous() for k, v in theirs.items()}, metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, unet_cfg)
    if sched is not None:
        _write_json(out / SCHEDULER_NAME, sched)
        _write_json(out / "model_index.json", {
            "_class_name": pipeline, "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DModel"]})
    else:
        for name in (SCHEDULER_NAME, "model_index.json"):
            (out / name).unlink(missing_ok=True)
        warnings.warn(f"{out}: wrote the UNet only; {why}", UserWarning, stacklevel=2)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
