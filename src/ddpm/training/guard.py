"""The non-finite guard decided on the device: an optimiser step that is taken only where a
0-d bool tensor says so, without reading that tensor on the host.

A DDPM training step must skip its update when the loss or the gradient norm is not finite
(paper Appendix B trains in bf16 on TPUs; a NaN would otherwise poison the weights, the Adam
moments and the EMA). Deciding that with ``if torch.isfinite(loss)`` costs one host round trip
per step, which on a GPU stalls the launch queue. Here the decision stays a device tensor
``finite`` and is applied the way a gradient scaler applies its ``found_inf``:

* fused Adam (the CUDA default, also available on the CPU): the kernel's own ``found_inf``
  argument (1.0 skips the update of the weights and both moments; torch then subtracts it from
  the step count it had incremented, so Adam's ``step`` is unchanged too);
* any other optimiser on a GPU (e.g. foreach Adam): the update is taken, then every weight and
  every state tensor is put back with ``torch.where(skip, before, after)`` from a copy made
  just before. The kept values of an applied step are the optimiser's own, bit for bit, so the
  result is identical to a host-side ``if``. Cost: one copy of weights and moments per step.
* on the CPU (the trainer's foreach Adam there) the flag is read on the host: a CPU has no
  launch queue to stall, so the read is free, while the copy-and-restore above cost ~15% of a
  cifar10 training step at batch 8 (2-core Xeon, benchmarks/README.md). Same results bit for bit
  (tests/test_step_device.py). :data:`HOST_GUARD_ON_CPU` = False keeps the device form on the CPU
  too (the tests use it to check, on a CPU, the step that runs on a GPU).

A skipped *first* step leaves zero moments and step 0 in the state (torch creates the state
on the first call), which is the same optimiser as one with no state.
"""

from __future__ import annotations

import torch


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group runs a fused kernel that accepts ``found_inf``."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)


HOST_GUARD_ON_CPU = True


def guarded_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` where ``finite`` (bool [] on the parameters' device) is true;
    otherwise weights and optimiser state are left exactly as they were. No host read, except
    of a CPU flag for a non-fused optimiser (:data:`HOST_GUARD_ON_CPU`)."""
    if HOST_GUARD_ON_CPU and finite.device.type == "cpu" and not is_fused(optimizer):
        if bool(finite):
            optimizer.step()
        return
    if is_fused(optimizer):
        # the fused kernel reads found_inf on the device; torch's GradScaler sets the same attributes
        optimizer.found_inf = (~finite).to(torch.float32)
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        return
    _step_then_restore(optimizer, finite)


@torch.no_grad()
def _step_then_restore(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    before = [(p, p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
               if p in optimizer.state else {}) for p in params]
    optimizer.step()
    skip = ~finite
    for p, old_p, old_state in before:
        p.copy_(torch.where(skip, old_p, p))
        for k, v in optimizer.state[p].items():
            if not torch.is_tensor(v):
                continue
            old = old_state.get(k)
            if old is None:  # created by this very step: "no state" is zeros (moments, step count)
                old = torch.zeros_like(v)
            # Adam's step count may live on the CPU while ``finite`` is on the GPU (foreach Adam
            # on CUDA, not the trainer's choice): that one select then waits for the device.
            v.copy_(torch.where(skip.to(v.device), old, v))
