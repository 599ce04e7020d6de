"""One prepared GPU measurement (benchmarks/gpu.sh runs it; <= 8 minutes on one H100/H200).

    python benchmarks/gpu.py [--out bench_results/gpu.json] [--no-compile]
    python benchmarks/gpu.py --dry-run      # the same code path on the CPU with a tiny U-Net (a test)

Measures, on the cifar10 preset's U-Net (35.7M parameters), against diffusers on the same weights
(workloads.py says exactly what each side does):

* train   training steps/s at batch 128: ours in bf16 autocast with fused Adam, eager (NCHW) and
          (unless --no-compile) ``torch.compile``-d (channels_last), against diffusers' example
          loop in bf16 autocast (and in fp32, for reference).
* sample  seconds for 256 samples x 1000 ancestral steps, extrapolated from k timed steps of a
          k-step chain (the same per-step work; setup included): ours replayed from CUDA graphs in
          fp32 and bf16 (NCHW), and (unless --no-compile) compiled with CUDA graphs in bf16, against
          diffusers' DDPMPipeline loop in fp32 and with the model in bf16.

Every implementation is timed in the same process in rotating order after warm-up (compilation
shows in the warm-up times, reported separately); medians are reported. cuDNN autotuning
(``torch.backends.cudnn.benchmark``) is on for both sides. Writes one JSON (device name, versions,
every timing, the ratios and the issue's targets) and prints a summary.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import result_path, write_json  # noqa: E402
from timing import alternate  # noqa: E402

# The targets on one H100 (paper: TPU v3-8, 21 steps/s and 17 s for 256 x 1000).
TARGETS = {"train_steps_per_s": 100.0, "sample_256x1000_s": 6.0, "x_vs_diffusers_bf16": 1.5}


def log(msg: str) -> None:
    print(msg, flush=True)


def _tiny(cfg):
    """--dry-run: the cifar10 preset with a small U-Net on 16x16 images (same code paths, seconds
    on a CPU)."""
    model = replace(cfg.model, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16)
    return replace(cfg, model=model)


class _Repeat:
    """``n`` calls of ``fn`` per timed call (GPU steps take milliseconds: amortises the sync)."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, int(n)

    def __call__(self) -> None:
        for _ in range(self.n):
            self.fn()


def _summary(tm, per_call: float) -> dict:
    """Median/min seconds per unit of work and the warm-up (first-call) seconds."""
    t = tm
    return {"median_s": t.median / per_call, "min_s": t.min / per_call,
            "warmup_s": [round(w, 3) for w in t.warmup], "repeats": len(t.times)}


def bench_train(args, device, cfg, deadline: float) -> dict:
    from workloads import OursOptions, OursTrainStep, TheirsTrainStep, build_models, copy_model, fixed_batch

    from ddpm.diffusion import GaussianDiffusion

    ours, theirs = build_models(cfg, device, train=True)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    x0 = fixed_batch(cfg, args.train_batch, device)
    cuda = device.type == "cuda"
    variants = {"ours_bf16_fused": OursOptions(channels_last=False, precision="bf16", fused_adam=cuda)}
    if args.compile:
        variants["ours_bf16_fused_compile"] = OursOptions(channels_last=True, precision="bf16", fused_adam=cuda,
                                                          compile=True)
    fns = {"diffusers_bf16": TheirsTrainStep(copy_model(theirs), x0, device, amp_dtype=torch.bfloat16),
           "diffusers_fp32": TheirsTrainStep(theirs, x0, device)}
    if args.channels_last:
        variants.update({f"{k}_channels_last": replace(o, channels_last=True)
                         for k, o in list(variants.items()) if not o.compile})
    for i, (name, o) in enumerate(variants.items()):
        fns[name] = OursTrainStep(copy_model(ours) if i else ours, diffusion, x0, device, o)
    n = args.train_steps
    log(f"[train] cifar10 U-Net, batch {args.train_batch}, {n} steps per timed call, {len(fns)} implementations")
    tm = alternate({k: _Repeat(f, n) for k, f in fns.items()}, args.repeats, warmup=2 if args.compile else 1,
                   device=device, log=log)
    out = {"batch": args.train_batch, "steps_per_call": n, "variants": {}}
    for name, t in tm.items():
        s = _summary(t, n)
        s["steps_per_s"] = 1.0 / s["median_s"]
        loss = getattr(fns[name], "last_loss", None)
        s["last_loss"] = None if loss is None else float(loss)
        out["variants"][name] = s
    ours_best = max((k for k in out["variants"] if k.startswith("ours")),
                    key=lambda k: out["variants"][k]["steps_per_s"])
    ref = out["variants"]["diffusers_bf16"]["steps_per_s"]
    out["ours_best"] = ours_best
    out["ours_best_steps_per_s"] = out["variants"][ours_best]["steps_per_s"]
    out["x_vs_diffusers_bf16"] = out["ours_best_steps_per_s"] / ref
    if time.monotonic() > deadline:
        log("[train] over the time budget: the compiled sampling variant will be skipped")
    return out


def bench_sample(args, device, cfg, deadline: float) -> dict:
    from workloads import OursSampler, SampleOptions, TheirsSampler, build_models, copy_model

    from ddpm.diffusion import GaussianDiffusion

    ours, theirs = build_models(cfg, device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    B, k, T = args.sample_batch, args.sample_steps, diffusion.num_timesteps
    cuda = device.type == "cuda"
    # eager variants in sample()'s default layout (NCHW on CUDA), compiled ones in channels_last
    variants = {"ours_fp32_graph": SampleOptions(channels_last=False, cuda_graph=cuda),
                "ours_bf16_graph": SampleOptions(channels_last=False, cuda_graph=cuda, amp_dtype=torch.bfloat16)}
    if args.compile and time.monotonic() < deadline:
        variants["ours_bf16_compile_graph"] = SampleOptions(channels_last=True, compile=True, cuda_graph=cuda,
                                                            amp_dtype=torch.bfloat16)
    if args.channels_last:
        variants.update({f"{n}_channels_last": replace(o, channels_last=True)
                         for n, o in list(variants.items()) if not o.compile})
    fns = {"diffusers_fp32": TheirsSampler(theirs, shape, B, k, device, T),
           "diffusers_bf16": TheirsSampler(copy_model(theirs).to(torch.bfloat16), shape, B, k, device, T)}
    for name, o in variants.items():
        fns[name] = OursSampler(ours, diffusion, shape, B, k, device, o)
    log(f"[sample] cifar10 U-Net, batch {B}, {k} of {T} steps per timed call (extrapolated), "
        f"{len(fns)} implementations")
    tm = alternate(fns, args.repeats, warmup=1, device=device, log=log)
    out = {"batch": B, "steps_timed": k, "num_timesteps": T, "variants": {}}
    for name, t in tm.items():
        s = _summary(t, 1.0)
        s[f"seconds_{B}x{T}"] = s["median_s"] * T / k
        last = getattr(fns[name], "last", None)
        s["finite"] = None if last is None else bool(torch.isfinite(last.float()).all())
        out["variants"][name] = s
    key = f"seconds_{B}x{T}"
    ours_best = min((n for n in out["variants"] if n.startswith("ours")), key=lambda n: out["variants"][n][key])
    out["ours_best"] = ours_best
    out[f"ours_best_{key}"] = out["variants"][ours_best][key]
    out["x_vs_diffusers_bf16"] = out["variants"]["diffusers_bf16"][key] / out["variants"][ours_best][key]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny U-Net, batch 2, 2 steps, one repeat, on the CPU unless --device: tests the script")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    p.add_argument("--channels-last", action="store_true",
                   help="also time ours' eager variants in channels_last (they run in NCHW, the CUDA default)")
    p.add_argument("--only", choices=("train", "sample"), default=None, help="one section")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=20, help="training steps per timed call")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=50, help="reverse steps timed per call (extrapolated to 1000)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the optional (compiled) sampling variant once this much time has passed")
    p.add_argument("--out", default=None, help="JSON file (default bench_results/gpu_<time>.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.compile = False
        args.train_batch, args.train_steps, args.sample_batch, args.sample_steps, args.repeats = 2, 1, 2, 2, 1
    if args.sample_steps < 2 or args.repeats < 1 or args.train_steps < 1:
        p.error("need --sample-steps >= 2, --repeats >= 1, --train-steps >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        log("benchmarks/gpu.py: CUDA is not available (use --dry-run to test the script on a CPU)")
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    torch.backends.cudnn.benchmark = True
    import diffusers

    from ddpm.autotune import cpu_signature
    from ddpm.config import get_preset

    cfg = get_preset("cifar10")
    if args.dry_run:
        cfg = _tiny(cfg)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else list(argv),
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else cpu_signature().split(" | ")[0]),
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "dry_run": args.dry_run, "targets": TARGETS}
    log(f"ddpm vs diffusers on {meta['device_name']} ({device}), torch {meta['torch']}, "
        f"diffusers {meta['diffusers']}")
    result: dict = {"meta": meta}
    out = result_path(args.out, "gpu")

    def save() -> None:
        # Written after each section: a run stopped by the time limit keeps what it measured.
        meta["wall_s"] = round(time.monotonic() - t0, 1)
        write_json(out, result)

    if args.only in (None, "train"):
        result["train"] = bench_train(args, device, cfg, deadline)
        save()
    if args.only in (None, "sample"):
        result["sample"] = bench_sample(args, device, cfg, deadline)
    save()
    log("")
    if "train" in result:
        tr = result["train"]
        log(f"train  B={tr['batch']}: ours {tr['ours_best']} {tr['ours_best_steps_per_s']:.1f} steps/s, "
            f"diffusers bf16 {tr['variants']['diffusers_bf16']['steps_per_s']:.1f}, "
            f"fp32 {tr['variants']['diffusers_fp32']['steps_per_s']:.1f} -> {tr['x_vs_diffusers_bf16']:.2f}x")
    if "sample" in result:
        sa = result["sample"]
        key = f"seconds_{sa['batch']}x{sa['num_timesteps']}"
        log(f"sample {sa['batch']} x {sa['num_timesteps']}: ours {sa['ours_best']} {sa[f'ours_best_{key}']:.2f} s, "
            f"diffusers bf16 {sa['variants']['diffusers_bf16'][key]:.2f} s, "
            f"fp32 {sa['variants']['diffusers_fp32'][key]:.2f} s -> {sa['x_vs_diffusers_bf16']:.2f}x")
    log(f"wrote {out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
