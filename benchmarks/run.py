"""Side-by-side speed of ddpm and diffusers on the same work (`make bench`).

    python benchmarks/run.py                  # everything, on CUDA if available, else CPU
    python benchmarks/run.py --quick          # a smoke test: fewer repeats and steps
    python benchmarks/run.py --only sample --device cpu --threads 1 --compile --bf16

Sections (see workloads.py for exactly what each side does):

* train   the cifar10 preset's training step (forward, L_simple, backward, clip, Adam, EMA),
          batch 32 on CPU / 128 on GPU: ours (the trainer's parts, several variants) vs
          diffusers' UNet2DModel (google/ddpm-cifar10-32 layout, same weights) + its example loop.
* sample  ancestral sampling throughput, images/s over the full 1000-step chain extrapolated
          from k timed steps, batch 64 on CPU / 256 on GPU: ``ddpm.sampling.sample`` vs
          DDPMPipeline's loop (DDPMScheduler).
* module  the bare network as a researcher imports it: ``ddpm.UNet`` vs diffusers' ``UNet2DModel``
          (same weights) in a plain loop, forward + L_simple + backward + ``torch.optim.Adam``,
          NCHW, no fast path of ours (batch 8 on CPU / 64 on GPU).
* digits  the default preset, ours only: end-to-end training steps/s (``ddpm.train``) and
          samples/s (``ddpm.sample``, full 1000-step chain unless --quick).

Every implementation of a piece of work is timed in the same process, in turns (rotating
order), after warm-up; the table reports medians, minima and ratios baseline/ours (> 1 = ours
is faster) of wall time and of process CPU time. On a shared machine absolute times drift a
lot; the ratios are what to read. With other work on the cores, prefer --threads 1 and the
CPU-time ratio (time spent descheduled is not counted; with 2+ threads OpenMP spin-waits are).
Results: bench_results/bench_<time>.json and .md (git-ignored); the table is also printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Row, rows_from, table, write  # noqa: E402
from timing import alternate, load_average  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in have if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    except OSError:
        pass
    return []


# ---------------------------------------------------------------------------------------------- train
def bench_train(args, device: torch.device) -> list[Row]:
    from workloads import OursOptions, OursTrainStep, TheirsTrainStep, build_models, copy_model, fixed_batch

    from ddpm.config import get_preset
    from ddpm.diffusion import GaussianDiffusion

    cfg = get_preset("cifar10")
    B = args.train_batch or (128 if device.type == "cuda" else 32)
    ours, theirs = build_models(cfg, device, train=True)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    x0 = fixed_batch(cfg, B, device)
    cuda = device.type == "cuda"
    variants = [OursOptions(), OursOptions(channels_last=True)]
    if cuda:
        variants.append(OursOptions(channels_last=True, precision="bf16"))
    if not cuda:  # train.winograd: forward, input and weight gradients by Winograd F(4x4, 3x3)
        variants.append(OursOptions(channels_last=False, winograd=True))
        variants.append(OursOptions(channels_last=True, winograd=True))
        # the trainer's defaults: layout and each conv shape timed once (ddpm.autotune, cached per machine)
        variants.append(OursOptions(channels_last=None, winograd=None))
    if args.fused_adam and not cuda:
        variants.append(OursOptions(channels_last=True, fused_adam=True))
        variants.append(OursOptions(channels_last=True, fused_adam=True, winograd=True))
    if args.compile:
        variants.append(OursOptions(channels_last=True, compile=True, precision="bf16" if cuda else "fp32"))
    if args.bf16 and not cuda:
        variants.append(OursOptions(channels_last=True, precision="bf16"))
    fns, labels = {"theirs": TheirsTrainStep(theirs, x0, device)}, {"theirs": ("diffusers", "fp32")}
    if cuda:
        fns["theirs_bf16"] = TheirsTrainStep(copy_model(theirs), x0, device, amp_dtype=torch.bfloat16)
        labels["theirs_bf16"] = ("diffusers", "bf16 autocast")
    for i, o in enumerate(variants):
        fns[f"ours{i}"] = OursTrainStep(copy_model(ours) if i else ours, diffusion, x0, device, o)
        labels[f"ours{i}"] = ("ddpm", o.label())
    log(f"[train] cifar10 U-Net, batch {B}, {len(fns)} implementations, {args.repeats} repeats")
    tm = alternate(fns, args.repeats, warmup=1 + int(args.compile), device=device, log=log)
    rows = rows_from("train", f"cifar10 step B={B}", tm, 1.0, "steps/s", "theirs", labels)
    if cuda:  # bf16 rows also against diffusers' own bf16
        for r, (name, t) in zip(rows, tm.items()):
            if "bf16" in labels[name][1] and name.startswith("ours"):
                r.notes["x_vs_diffusers_bf16_median"] = tm["theirs_bf16"].median / t.median
    return rows


# ---------------------------------------------------------------------------------------------- sample
def _compile_notes(tm, name: str, eager: str, k: int) -> dict:
    """Compilation cost (first warm-up call minus a steady call) and the number of sampling steps
    after which compiling has paid for itself."""
    t, e = tm[name], tm[eager]
    compile_s = max(t.warmup[0] - t.median, 0.0)
    gain = (e.median - t.median) / k
    return {"compile_s": round(compile_s, 1),
            "break_even_steps": round(compile_s / gain) if gain > 0 else None,
            "pays_for_1000_steps": bool(gain > 0 and compile_s < 1000 * gain)}


def bench_sample(args, device: torch.device) -> list[Row]:
    from workloads import OursSampler, SampleOptions, TheirsSampler, build_models

    from ddpm.config import get_preset
    from ddpm.diffusion import GaussianDiffusion

    cfg = get_preset("cifar10")
    cuda = device.type == "cuda"
    B = args.sample_batch or (256 if cuda else 64)
    # CPU: 6 steps per timed call, so that what a sampling call sets up once (the weights in NHWC,
    # Winograd's transformed weights and scratch memory: ~0.5 s for this network) weighs on the
    # extrapolated 1000-step figure about as little as it does on a real chain (with 2 steps it
    # was a 20% penalty on the Winograd path)
    k = args.sample_steps or ((10 if args.quick else 50) if cuda else 2 if args.quick else 6)
    ours, theirs = build_models(cfg, device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    # ours0/ours1: oneDNN's direct convolution (the same kernels diffusers calls), NCHW / NHWC
    variants = [SampleOptions(channels_last=False, winograd=False), SampleOptions(channels_last=True, winograd=False)]
    if not cuda:  # Winograd F(4x4, 3x3) for every conv with >= 128 channels, and the default:
        # layout and routing timed together at this batch once on this machine (ddpm.netpath)
        variants.append(SampleOptions(channels_last=False, winograd=True))
        variants.append(SampleOptions(channels_last=True, winograd=True))
        variants.append(SampleOptions())
    if cuda:
        variants += [SampleOptions(cuda_graph=True), SampleOptions(cuda_graph=True, amp_dtype=torch.bfloat16)]
    if args.compile:
        variants.append(SampleOptions(channels_last=True, compile=True, cuda_graph=cuda,
                                      amp_dtype=torch.bfloat16 if cuda else None))
    if args.bf16 and not cuda:
        variants.append(SampleOptions(channels_last=True, amp_dtype=torch.bfloat16))
    fns, labels = {"theirs": TheirsSampler(theirs, shape, B, k, device)}, {"theirs": ("diffusers", "fp32 NCHW")}
    for i, o in enumerate(variants):
        fns[f"ours{i}"] = OursSampler(ours, diffusion, shape, B, k, device, o)
        labels[f"ours{i}"] = ("ddpm", o.label())
    log(f"[sample] cifar10 U-Net, batch {B}, {k} of 1000 steps per call, {len(fns)} implementations, "
        f"{args.repeats} repeats")
    tm = alternate(fns, args.repeats, warmup=1, device=device, log=log)
    notes = {}
    for i, o in enumerate(variants):
        if o.compile:
            notes[f"ours{i}"] = _compile_notes(tm, f"ours{i}", "ours1", k)
    return rows_from("sample", f"cifar10 B={B}, {k}/1000 steps timed", tm, B * k / 1000, "img/s (1000 steps)",
                     "theirs", labels, notes)


# ---------------------------------------------------------------------------------------------- module
def bench_module(args, device: torch.device) -> list[Row]:
    from workloads import PlainModuleStep, build_models

    from ddpm.config import get_preset

    cfg = get_preset("cifar10")
    B = args.module_batch or (64 if device.type == "cuda" else 8)
    ours, theirs = build_models(cfg, device, train=True)
    fns = {"theirs": PlainModuleStep(theirs, cfg, B, device, diffusers=True),
           "ours": PlainModuleStep(ours, cfg, B, device)}
    labels = {"theirs": ("diffusers", "UNet2DModel, fp32 NCHW"), "ours": ("ddpm", "UNet, fp32 NCHW")}
    log(f"[module] cifar10 U-Net in a plain loop (fwd, loss, bwd, torch Adam), batch {B}, {args.repeats} repeats")
    tm = alternate(fns, args.repeats, warmup=1, device=device, log=log)
    return rows_from("module", f"cifar10 bare module fwd+bwd+Adam B={B}", tm, 1.0, "steps/s", "theirs", labels)


# ---------------------------------------------------------------------------------------------- digits
class _DigitsTrain:
    """``ddpm.train`` on the digits preset for ``steps`` steps in a fresh folder; the trainer's
    own steps/s (its loop, including the final checkpoint write) is kept."""

    def __init__(self, device: torch.device, steps: int, overrides: list[str]):
        from ddpm.config import apply_overrides, get_preset

        self.device, self.steps_per_s = device, []
        self.cfg = apply_overrides(get_preset("digits"), [f"train.total_steps={steps}", "train.sample_every=0",
                                                          "train.save_every=0", "train.log_every=0", *overrides])

    def __call__(self) -> None:
        from ddpm.training import train

        with tempfile.TemporaryDirectory(prefix="ddpm_bench_") as d:
            res = train(self.cfg, Path(d) / "run", device=str(self.device), progress=False, log=lambda m: None)
        self.steps_per_s.append(res["steps_per_s"])


def bench_digits(args, device: torch.device) -> list[Row]:
    from workloads import OursSampler, SampleOptions

    from ddpm.api import build
    from ddpm.config import get_preset

    rows: list[Row] = []
    cfg = get_preset("digits")
    steps = args.digits_train_steps or (10 if args.quick else 200 if device.type == "cuda" else 30)
    tv = {"default": [], "channels_last": ["train.channels_last=true"]}
    fns = {name: _DigitsTrain(device, steps, ov) for name, ov in tv.items()}
    labels = {name: ("ddpm", f"preset {name}" if name == "default" else f"preset + train.{name}") for name in tv}
    log(f"[digits] training {steps} steps per call (batch {cfg.train.batch_size}), {args.repeats} repeats")
    tm = alternate(fns, args.repeats, warmup=0, device=device, log=log)
    for name, f in fns.items():  # report the trainer's own steps/s (its loop only), not the setup
        tm[name].times = [1.0 / v for v in f.steps_per_s]  # seconds per step, in run order
        tm[name].cpu_times = []  # those covered the whole call, setup included
    rows += rows_from("digits", f"train end-to-end B={cfg.train.batch_size}", tm, 1.0, "steps/s", "default",
                      labels)

    model, diffusion = build(cfg, device)
    model.eval()
    B = args.sample_batch or (256 if device.type == "cuda" else 64)
    T = diffusion.num_timesteps
    k = args.digits_sample_steps or (100 if args.quick or device.type != "cuda" else T)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    # digits are 8x8: sample()'s default layout there is NCHW on the CPU (NHWC measured slower)
    variants = [SampleOptions(channels_last=False), SampleOptions(channels_last=True)]
    if device.type == "cuda":
        variants.append(SampleOptions(cuda_graph=True))
    if args.compile:
        variants.append(SampleOptions(compile=True, cuda_graph=device.type == "cuda"))
    if args.bf16:
        variants.append(SampleOptions(amp_dtype=torch.bfloat16))
    fns2 = {f"ours{i}": OursSampler(model, diffusion, shape, B, k, device, o) for i, o in enumerate(variants)}
    labels2 = {f"ours{i}": ("ddpm", o.label()) for i, o in enumerate(variants)}
    log(f"[digits] sampling batch {B}, {k} of {T} steps per call" + (" (extrapolated)" if k < T else ""))
    tm2 = alternate(fns2, args.repeats, warmup=1, device=device, log=log)
    notes = {f"ours{i}": _compile_notes(tm2, f"ours{i}", "ours1", k) for i, o in enumerate(variants) if o.compile}
    rows += rows_from("digits", f"sample B={B}, {k}/{T} steps timed", tm2, B * k / T, f"img/s ({T} steps)", "ours0",
                      labels2, notes)
    return rows


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps (a smoke test)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--only", choices=("train", "sample", "module", "digits"), default=None, help="run one section")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per implementation (default: 5 on GPU, 3 on CPU; --quick: 1)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants (slow to compile on CPU)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast on the CPU (on GPU it is always timed)")
    p.add_argument("--fused-adam", action="store_true", help="also time the fused CPU Adam kernel")
    p.add_argument("--train-batch", type=int, default=None, help="override the training batch (32 CPU / 128 GPU)")
    p.add_argument("--sample-batch", type=int, default=None, help="override the sampling batch (64 CPU / 256 GPU)")
    p.add_argument("--module-batch", type=int, default=None, help="override the bare-module batch (8 CPU / 64 GPU)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="cifar10 sampling steps timed per call, >= 2 (default: 6 on CPU, 50 on GPU; quick 2 / 10)")
    p.add_argument("--digits-train-steps", type=int, default=None,
                   help="training steps per digits call (default: 30 on CPU, 200 on GPU; quick 10)")
    p.add_argument("--digits-sample-steps", type=int, default=None,
                   help="digits chain length timed per call, extrapolated to T (default: 100 on CPU or quick, "
                        "the full T on GPU)")
    p.add_argument("--out", default="bench_results", help="folder for the JSON and table")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.sample_steps is not None and args.sample_steps < 2:
        p.error("--sample-steps must be >= 2 (a respaced chain needs two steps)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda: CUDA is not available")
        return 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5 if device.type == "cuda" else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    import ddpm

    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else list(argv),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": _cpu_name(), "cpu_flags": _cpu_flags(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "ddpm": getattr(ddpm, "__version__", None), "python": platform.python_version(),
        "load_average_start": load_average(),
    }
    log(f"ddpm vs diffusers on {device} ({meta['gpu'] or meta['cpu']}), {meta['torch_threads']} threads, "
        f"load average {meta['load_average_start']}")
    la = meta["load_average_start"]
    if la and device.type == "cpu" and la[0] > (os.cpu_count() or 1):
        log("warning: the CPU is busy with other work; absolute times are inflated, read the ratios "
            "(and with more than one thread, consider --threads 1: OpenMP threads wait for each other)")
    rows: list[Row] = []
    t0 = time.perf_counter()
    for name, fn in (("train", bench_train), ("sample", bench_sample), ("module", bench_module),
                     ("digits", bench_digits)):
        if args.only in (None, name):
            rows += fn(args, device)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["load_average_end"] = load_average()
    js, md = write(args.out, rows, meta)
    print()
    print(table(rows))
    print(f"\nwrote {js} and {md} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
