"""One prepared GPU measurement (benchmarks/gpu.sh runs it; <= 8 minutes on one H100/H200).

    python benchmarks/gpu.py [--out bench_results/gpu.json] [--no-compile]
    python benchmarks/gpu.py --dry-run      # the same code path on the CPU with tiny U-Nets (a test)

Measures, on the cifar10 preset's U-Net (35.7M parameters), against diffusers on the same weights
(workloads.py says exactly what each side does), in this order (the JSON is written after each
section, so a run stopped by the time limit keeps what it measured; past --budget-s the profile,
the 256x256 section and the compiled sampling variant are skipped):

* checks  (gpu_step.py) the captured step against the eager one (max differences, bit-identical?,
          within the derived bound?) and the trainer's data path + step under
          ``torch.cuda.set_sync_debug_mode("error")`` (no host sync between log reads).
* train   training steps/s at batch 128 and peak memory: ours in bf16 autocast with fused Adam
          (the step without host round trips), eager (NCHW), replayed from one CUDA graph of the
          whole step, and (unless --no-compile) ``torch.compile``-d (channels_last) without and
          with the step graph, against diffusers' example loop in bf16 autocast and in fp32.
* profile (gpu_step.py) torch.profiler over the compiled step, launched eagerly and replayed,
          and over eager fp32 sampling, ours and diffusers': wall vs GPU-busy time per call and
          the top kernels.
* big     (gpu_step.py) the 256x256 preset (celebahq256): steps/s at batch 64 and the time for
          128 samples (extrapolated), beside the paper's TPU v3-8 figures (2.2 steps/s, 300 s).
* sample  seconds for 256 samples x 1000 ancestral steps, extrapolated from k timed steps of a
          k-step chain (the same per-step work; setup included): ours eager and replayed from
          CUDA graphs in fp32 and bf16 (NCHW), and (unless --no-compile) compiled with CUDA graphs
          in bf16, against diffusers' DDPMPipeline loop in fp32 and with the model in bf16.

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

from gpu_step import bench_256, check_graph_vs_eager, check_no_host_sync, peak_memory, profile_steps  # noqa: E402
from report import result_path, write_json  # noqa: E402
from timing import alternate  # noqa: E402

# The targets on one H100 (paper: TPU v3-8, 21 steps/s and 17 s for 256 x 1000).
SECTIONS = ("checks", "train", "sample", "big", "profile")
TARGETS = {"train_steps_per_s": 60.0, "train_steps_per_s_moonshot": 100.0, "sample_256x1000_s": 6.0,
           "x_vs_diffusers_bf16": 1.5, "eager_fp32_sample_vs_diffusers_fp32": 1.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def _tiny(cfg):
    """--dry-run: the preset's network made small (same code paths, seconds on a CPU): 16x16
    images for the cifar10 U-Net, 32x32 for the 256x256 one."""
    res = 16 if cfg.model.resolution <= 32 else 32
    model = replace(cfg.model, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(res // 2,), resolution=res)
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
    variants = {"ours_bf16_fused": OursOptions(channels_last=False, precision="bf16", fused_adam=cuda),
                "ours_bf16_fused_graph": OursOptions(channels_last=False, precision="bf16", fused_adam=True,
                                                     cuda_graph=True)}
    if args.compile:
        variants["ours_bf16_fused_compile"] = OursOptions(channels_last=True, precision="bf16", fused_adam=cuda,
                                                          compile=True)
        variants["ours_bf16_fused_compile_graph"] = OursOptions(channels_last=True, precision="bf16", fused_adam=True,
                                                                compile=True, cuda_graph=True)
    fns = {"diffusers_bf16": TheirsTrainStep(copy_model(theirs), x0, device, amp_dtype=torch.bfloat16),
           "diffusers_fp32": TheirsTrainStep(theirs, x0, device)}
    if args.channels_last:
        variants.update({f"{k}_channels_last": replace(o, channels_last=True)
                         for k, o in list(variants.items()) if not o.compile})
    for i, (name, o) in enumerate(variants.items()):
        fns[name] = OursTrainStep(copy_model(ours) if i else ours, diffusion, x0, device, o)
    n = args.train_steps
    log(f"[train] cifar10 U-Net, batch {args.train_batch}, {n} steps per timed call, {len(fns)} implementations")
    timed = {k: peak_memory(_Repeat(f, n), device) for k, f in fns.items()}
    tm = alternate(timed, args.repeats, warmup=2 if args.compile else 1, device=device, log=log)
    out = {"batch": args.train_batch, "steps_per_call": n, "variants": {}}
    for name, t in tm.items():
        s = _summary(t, n)
        s["steps_per_s"] = 1.0 / s["median_s"]
        loss = getattr(fns[name], "last_loss", None)
        s["last_loss"] = None if loss is None else float(loss)
        s["peak_memory_gib"] = None if timed[name].peak_bytes is None else round(timed[name].peak_bytes / 2 ** 30, 3)
        out["variants"][name] = s
    ours_best = max((k for k in out["variants"] if k.startswith("ours")),
                    key=lambda k: out["variants"][k]["steps_per_s"])
    ref = out["variants"]["diffusers_bf16"]["steps_per_s"]
    out["ours_best"] = ours_best
    out["ours_best_steps_per_s"] = out["variants"][ours_best]["steps_per_s"]
    out["x_vs_diffusers_bf16"] = out["ours_best_steps_per_s"] / ref
    if time.monotonic() > deadline:
        log("[train] over the time budget: the compiled sampling variant will be skipped")
    return out, fns


def bench_sample(args, device, cfg, deadline: float) -> dict:
    from workloads import OursSampler, SampleOptions, TheirsSampler, build_models, copy_model

    from ddpm.diffusion import GaussianDiffusion

    ours, theirs = build_models(cfg, device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    B, k, T = args.sample_batch, args.sample_steps, diffusion.num_timesteps
    cuda = device.type == "cuda"
    # eager variants in sample()'s default layout (NCHW on CUDA), compiled ones in channels_last
    variants = {"ours_fp32_eager": SampleOptions(channels_last=False),
                "ours_bf16_eager": SampleOptions(channels_last=False, amp_dtype=torch.bfloat16),
                "ours_fp32_graph": SampleOptions(channels_last=False, cuda_graph=cuda),
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
    # issue 21: eager fp32 sampling no slower than diffusers' fp32 pipeline (> 1 means faster)
    out["eager_fp32_x_vs_diffusers_fp32"] = out["variants"]["diffusers_fp32"][key] / out["variants"]["ours_fp32_eager"][key]
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
    p.add_argument("--only", choices=SECTIONS, action="append", default=None,
                   help="run only these sections (repeatable); default all: " + ", ".join(SECTIONS))
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=20, help="training steps per timed call")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=50, help="reverse steps timed per call (extrapolated to 1000)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--check-batch", type=int, default=32, help="batch of the correctness checks")
    p.add_argument("--check-steps", type=int, default=3, help="steps of the correctness checks")
    p.add_argument("--big-batch", type=int, default=64, help="256x256 training batch")
    p.add_argument("--big-train-steps", type=int, default=5, help="256x256 training steps per timed call")
    p.add_argument("--big-sample-batch", type=int, default=128)
    p.add_argument("--big-sample-steps", type=int, default=10, help="256x256 reverse steps timed per call")
    p.add_argument("--big-repeats", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=5, help="training steps per profiled call")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the optional (compiled) sampling variant once this much time has passed")
    p.add_argument("--out", default=None, help="JSON file (default bench_results/gpu_<time>.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.compile = False
        args.train_batch, args.train_steps, args.sample_batch, args.sample_steps, args.repeats = 2, 1, 2, 2, 1
        args.budget_s = float("inf")  # a dry run checks every section
        args.check_batch, args.check_steps, args.big_batch, args.big_train_steps = 2, 2, 2, 1
        args.big_sample_batch, args.big_sample_steps, args.big_repeats, args.profile_steps = 2, 2, 1, 1
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

    sections = args.only or list(SECTIONS)
    fns: dict = {}

    def run(name: str, fn) -> None:
        """One section; on a GPU a failure is recorded and the next section still runs (a
        prepared run is rare), in a dry run it fails the script."""
        if name not in sections:
            return
        if name in ("big", "profile") and time.monotonic() > deadline:
            log(f"[{name}] skipped: past --budget-s {args.budget_s:.0f} s")
            result[name] = {"skipped": f"past the time budget ({args.budget_s:.0f} s)"}
            save()
            return
        t1 = time.monotonic()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001
            if args.dry_run:
                raise
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if isinstance(result[name], dict):
            result[name]["section_s"] = round(time.monotonic() - t1, 1)
        save()

    def train():
        out, made = bench_train(args, device, cfg, deadline)
        fns.update(made)
        return out

    def profile():
        keep = [k for k in ("ours_bf16_fused_compile", "ours_bf16_fused_compile_graph", "ours_bf16_fused",
                            "ours_bf16_fused_graph") if k in fns]
        if not args.compile:
            keep = keep[-2:]
        work = {k: _Repeat(fns[k], args.profile_steps) for k in keep[:2]}
        # eager fp32 sampling beside diffusers' (issue 21: no slower than diffusers; 1.2x slower before)
        from workloads import OursSampler, SampleOptions, TheirsSampler, build_models

        from ddpm.diffusion import GaussianDiffusion

        ours, theirs = build_models(cfg, device)
        d = GaussianDiffusion.from_config(cfg.diffusion)
        shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        B, k = args.sample_batch, max(2, args.profile_steps)  # a chain needs >= 2 steps
        work["sample_ours_fp32_eager"] = OursSampler(ours, d, shape, B, k, device, SampleOptions(channels_last=False))
        work["sample_diffusers_fp32"] = TheirsSampler(theirs, shape, B, k, device, d.num_timesteps)
        return profile_steps(work, device, calls=2)

    big_cfg = get_preset("celebahq256")
    if args.dry_run:
        big_cfg = _tiny(big_cfg)
    timer = lambda f, r: alternate(f, r, warmup=1, device=device, log=log)  # noqa: E731
    run("checks", lambda: {"graph_vs_eager": check_graph_vs_eager(cfg, device, args.check_batch, args.check_steps),
                           "no_host_sync": check_no_host_sync(cfg, device, args.check_batch, args.check_steps + 2)})
    run("train", train)
    run("profile", profile)
    fns.clear()  # free the training variants' memory before the 256x256 network
    # the 256x256 figures were never measured; sampling's were (only its eager variants are new)
    run("big", lambda: bench_256(args, device, big_cfg, timer))
    run("sample", lambda: bench_sample(args, device, cfg, deadline))
    log("")
    for line in summary_lines(result):
        log(line)
    log(f"wrote {out} ({meta['wall_s']} s)")
    return 0


def summary_lines(result: dict) -> list[str]:
    """The run's figures in a few lines (sections that failed or were skipped say so)."""
    lines = []
    for name in SECTIONS:
        r = result.get(name)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            lines.append(f"{name}: {r.get('error') or r.get('skipped')}")
            continue
        if name == "checks":
            g, h = r["graph_vs_eager"], r["no_host_sync"]
            lines.append(f"checks: graph == eager within bound {g['within_bound']} (bit-identical {g['bit_identical']}); "
                         f"no host sync: eager {h['eager']['ok']}, graph {h['graph']['ok']}")
        elif name == "train":
            v = r["variants"]
            lines.append(f"train  B={r['batch']}: ours {r['ours_best']} {r['ours_best_steps_per_s']:.1f} steps/s "
                         f"(target {TARGETS['train_steps_per_s']:.0f}), diffusers bf16 "
                         f"{v['diffusers_bf16']['steps_per_s']:.1f}, fp32 {v['diffusers_fp32']['steps_per_s']:.1f} "
                         f"-> {r['x_vs_diffusers_bf16']:.2f}x; "
                         + ", ".join(f"{k} {x['steps_per_s']:.1f}" for k, x in v.items() if k.startswith("ours")))
        elif name == "sample":
            key = f"seconds_{r['batch']}x{r['num_timesteps']}"
            v = r["variants"]
            lines.append(f"sample {r['batch']} x {r['num_timesteps']}: ours {r['ours_best']} {r[f'ours_best_{key}']:.2f} s "
                         f"(target {TARGETS['sample_256x1000_s']:.0f}), diffusers bf16 {v['diffusers_bf16'][key]:.2f} s, "
                         f"fp32 {v['diffusers_fp32'][key]:.2f} s -> {r['x_vs_diffusers_bf16']:.2f}x; eager fp32 "
                         f"{v['ours_fp32_eager'][key]:.2f} s ({r['eager_fp32_x_vs_diffusers_fp32']:.2f}x diffusers fp32)")
        elif name == "big":
            tv, sv = r["train"]["variants"], r["sample"]["variants"]
            key = f"seconds_{r['sample']['batch']}x{r['sample']['num_timesteps']}"
            lines.append(f"256x256 ({r['preset']}): training B={r['train']['batch']} "
                         + ", ".join(f"{k} " + (f"{x['steps_per_s']:.2f} steps/s ({x['peak_memory_gib']} GiB)"
                                                 if "error" not in x else x["error"]) for k, x in tv.items())
                         + f"; {r['sample']['batch']} samples (extrapolated) "
                         + ", ".join(f"{k} " + (f"{x[key]:.1f} s" if "error" not in x else x["error"])
                                     for k, x in sv.items())
                         + f" (paper TPU: {r['paper_tpu_v3_8']['train_steps_per_s_batch64']} steps/s, "
                           f"{r['paper_tpu_v3_8']['sample_128_s']:.0f} s)")
        elif name == "profile":
            lines.append("profile: " + "; ".join(
                f"{k} wall {x['wall_s_per_call'] * 1e3:.1f} ms, GPU busy {x['gpu_busy_s_per_call'] * 1e3:.1f} ms"
                for k, x in r.items() if isinstance(x, dict)))
    return lines


if __name__ == "__main__":
    sys.exit(main())
