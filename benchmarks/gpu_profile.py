"""Where the time of one GPU workload goes: wall time per call against the GPU's busy time.

    python benchmarks/gpu_profile.py [--out FILE.json]
    python benchmarks/gpu_profile.py --dry-run        # the same code path on the CPU, tiny U-Net

For each workload (eager, no CUDA graphs, so that every kernel is visible to the profiler) it runs
``--calls`` calls after one warm-up under ``torch.profiler`` and reports the wall seconds per call,
the summed kernel time per call (the GPU's busy time; wall minus busy is launch overhead and host
waits) and the ten kernels that take the most GPU time. Workloads (cifar10 U-Net, as gpu.py):

* sample_*  ``--sample-steps`` reverse steps at batch ``--sample-batch`` in bf16 autocast,
            ours in channels_last and in NCHW, diffusers' loop with its model in bf16;
* train_*   ``--train-steps`` optimiser steps at batch ``--train-batch``, ours in bf16 autocast
            with fused Adam (channels_last and NCHW) against diffusers' loop in bf16 autocast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _kernel_table(prof, calls: int, top: int) -> tuple[float, list[dict]]:
    """(busy seconds per call, the ``top`` kernels by device time) from a finished profile."""
    rows = []
    for e in prof.key_averages():
        # Kernels only: an operator's own row also carries the device time of the kernels it
        # launched, so summing both would count that time twice.
        if str(getattr(e, "device_type", "")).endswith("CPU"):
            continue
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        if dev_us and dev_us > 0:
            rows.append({"name": e.key[:90], "count_per_call": e.count / calls, "ms_per_call": dev_us / 1e3 / calls})
    rows.sort(key=lambda r: -r["ms_per_call"])
    return sum(r["ms_per_call"] for r in rows) / 1e3, rows[:top]


def profile(fn, device: torch.device, calls: int, top: int = 10) -> dict:
    """Profile ``calls`` calls of ``fn`` (after one unprofiled warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / calls
    busy, kernels = _kernel_table(prof, calls, top)
    return {"wall_s_per_call": wall, "gpu_busy_s_per_call": busy, "busy_fraction": busy / wall if wall else None,
            "top_kernels": kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny U-Net on the CPU, batch 2 (tests the script)")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default bench_results/gpu_profile_<time>.json)")
    args = p.parse_args(argv)
    from gpu import _tiny
    from report import result_path, write_json
    from workloads import (OursOptions, OursSampler, OursTrainStep, SampleOptions, TheirsSampler, TheirsTrainStep,
                           build_models, copy_model, fixed_batch)

    from ddpm.config import get_preset
    from ddpm.diffusion import GaussianDiffusion

    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cudnn.benchmark = True
    cfg = get_preset("cifar10")
    if args.dry_run:
        cfg = _tiny(cfg)
        args.sample_batch, args.sample_steps, args.train_batch, args.train_steps, args.calls = 2, 2, 2, 1, 1
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    T, bf16 = diffusion.num_timesteps, torch.bfloat16
    result: dict = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "args": vars(args), "workloads": {}}
    ours, theirs = build_models(cfg, device)
    B, k = args.sample_batch, args.sample_steps
    work = {
        "sample_ours_bf16_channels_last": OursSampler(ours, diffusion, shape, B, k, device,
                                                      SampleOptions(channels_last=True, amp_dtype=bf16)),
        "sample_ours_bf16_nchw": OursSampler(ours, diffusion, shape, B, k, device,
                                             SampleOptions(channels_last=False, amp_dtype=bf16)),
        "sample_diffusers_bf16": TheirsSampler(copy_model(theirs).to(bf16), shape, B, k, device, T),
    }
    x0 = fixed_batch(cfg, args.train_batch, device)
    ours_t, theirs_t = build_models(cfg, device, train=True)
    fused = device.type == "cuda"
    n = args.train_steps

    def repeat(fn):
        return lambda: [fn() for _ in range(n)]

    work["train_ours_bf16_channels_last"] = repeat(OursTrainStep(
        copy_model(ours_t), diffusion, x0, device, OursOptions(channels_last=True, precision="bf16", fused_adam=fused)))
    work["train_ours_bf16_nchw"] = repeat(OursTrainStep(
        ours_t, diffusion, x0, device, OursOptions(channels_last=False, precision="bf16", fused_adam=fused)))
    work["train_diffusers_bf16"] = repeat(TheirsTrainStep(theirs_t, x0, device, amp_dtype=bf16))
    for name, fn in work.items():
        r = profile(fn, device, args.calls)
        result["workloads"][name] = r
        print(f"{name}: wall {r['wall_s_per_call'] * 1e3:.1f} ms/call, GPU busy {r['gpu_busy_s_per_call'] * 1e3:.1f} "
              f"ms/call; top: " + "; ".join(f"{kk['name'][:40]} {kk['ms_per_call']:.1f}" for kk in r["top_kernels"][:5]),
              flush=True)
    out = result_path(args.out, "gpu_profile")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
