"""Adam with the official linear warm-up, global-norm clipping, and a flat optimiser state.

Spec 8.2: Adam(β1=0.9, β2=0.999, eps=1e-8), LR(step) = lr·min(step/warmup, 1) with ``step``
the 0-based index of the update being applied (so the very first update has LR 0), no decay,
gradients clipped to global norm ``grad_clip``.

The optimiser state is stored in checkpoints as plain tensors keyed by parameter *name*
(``optim/<param>/exp_avg``), so a checkpoint does not depend on parameter order.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..config import TrainConfig
from ..errors import CheckpointError


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """lr·min(step / warmup_steps, 1); ``warmup_steps == 0`` means no warm-up (paper Appendix B)."""
    if warmup_steps <= 0:
        return float(lr)
    return float(lr) * min(step / warmup_steps, 1.0)


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam from ``cfg``; the fused kernel on CUDA, the multi-tensor (foreach) one elsewhere.

    The initial LR is 0: :func:`set_lr` sets the warmed-up value before every step.
    """
    kwargs = dict(lr=0.0, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=0.0)
    if device.type == "cuda":
        return torch.optim.Adam(params, fused=True, **kwargs)
    return torch.optim.Adam(params, foreach=True, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (fp32 scalar tensor); scale them to ``max_norm`` if above it.

    Called on the gradient of the full-batch mean loss (after DDP has averaged it over ranks and
    after gradient accumulation), as a single-GPU re-implementation normally does. The official
    TPU code instead clips each replica's local-batch gradient to ``grad_clip/num_replicas``
    inside a CrossShardOptimizer and then sums; the two differ only when clipping is active
    (paper Appendix B). ``max_norm == 0`` disables clipping; the norm is still returned for logging.
    Non-finite norms are returned as is and the gradients are left untouched.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=params[0].device if params else "cpu")
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=2.0, foreach=True)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm, foreach=True)
    return norm


_PER_PARAM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def apply_update(optimizer: torch.optim.Optimizer, scaler, finite: bool) -> None:
    """The optimiser step after backward and clipping, as the trainer takes it: skipped when the
    loss or gradient norm is not finite; with a ``GradScaler`` (fp16) the step goes through it
    and the scale is updated either way (lowered after an overflow)."""
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten the optimiser state: ``{"<name>/exp_avg": t, ...}`` plus JSON ``param_groups``.

    ``names`` gives the parameter names in the optimiser's parameter order.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if k not in _PER_PARAM_KEYS:
                raise ValueError(f"unexpected optimizer state key {k!r}")
            tensors[f"{names[idx]}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float32)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    for g in groups:
        g["betas"] = list(g["betas"])
    return tensors, {"param_groups": groups, "param_names": list(names)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str],
                           tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Inverse of :func:`optimizer_tensors` for the optimiser built over the same named parameters."""
    saved_names = list(meta.get("param_names", []))
    if sorted(saved_names) != sorted(names):
        missing = sorted(set(names) - set(saved_names))[:3]
        extra = sorted(set(saved_names) - set(names))[:3]
        raise CheckpointError(f"checkpoint optimizer state does not match the model's parameters "
                              f"(missing {missing}, unexpected {extra})")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(names):
        entry = {k: tensors[f"{name}/{k}"] for k in _PER_PARAM_KEYS if f"{name}/{k}" in tensors}
        if entry:
            state[idx] = entry
    current = optimizer.state_dict()["param_groups"]
    saved_groups = meta.get("param_groups", [])
    if len(saved_groups) != len(current):
        raise CheckpointError("checkpoint optimizer has a different number of parameter groups")
    groups = []
    for cur, saved in zip(current, saved_groups):
        g = dict(cur)
        # Only hyper-parameters carry over; implementation flags (fused/foreach) follow this device.
        for k in _HYPER_KEYS:
            if k in saved and k in g:
                g[k] = tuple(saved[k]) if k == "betas" else saved[k]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
