"""The training-step sections of benchmarks/gpu.py (issue 21): correctness checks of the step
without host round trips and of the captured step, the 256x256 preset, and a profile.

* ``check_graph_vs_eager``: the same k steps (same weights, batches, step indices and dropout
  stream) eagerly and replayed from the captured graph; max differences of weights, EMA and Adam
  moments, whether they are bit-identical (expected: the replay runs the very kernels) and the
  bound they must stay within (derived in :func:`adam_drift_bound`).
* ``check_no_host_sync``: k steps of the trainer's data path (the training set on the device,
  gathered and flipped there) and step, eager and replayed, under
  ``torch.cuda.set_sync_debug_mode("error")`` (on the CPU, ``ddpm.training.hostsync``'s checker):
  any host synchronisation between two log reads raises and is recorded.
* ``bench_256``: the 256x256 preset (celebahq256, 114M parameters): training steps/s at batch 64
  (bf16, eager and replayed) with peak memory, and 128 samples x 1000 steps, extrapolated from
  ``k`` timed steps of a k-step chain (said so in the JSON), beside the paper's TPU v3-8 figures.
* ``profile_steps``: torch.profiler over the compiled step (eager launches and replayed graph):
  wall time per step, summed kernel time (GPU busy) and the top kernels.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

PAPER_256 = {"train_steps_per_s_batch64": 2.2, "sample_128_s": 300.0}  # Ho et al. 2020, Appendix B (TPU v3-8)


def log(msg: str) -> None:
    print(msg, flush=True)


def adam_drift_bound(steps: int, lr: float, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """How far two runs of ``steps`` Adam updates from the same state can drift apart per weight
    when their gradients differ only by rounding, without knowing the gradients.

    Adam's update at step t is -lr·m̂_t/(sqrt(v̂_t)+eps) with m̂_t = Σ a_i g_i and v̂_t = Σ b_i g_i²
    (a_i = (1-β1)β1^(t-i)/(1-β1^t), b_i = (1-β2)β2^(t-i)/(1-β2^t)); by Cauchy-Schwarz
    |m̂_t| <= sqrt(Σ a_i²/b_i)·sqrt(v̂_t), so each update is at most c_t·lr in size and two runs'
    updates differ by at most 2·c_t·lr. Summed over the steps (ignoring that the weights the
    gradients are taken at differ too, which the sum of update sizes already covers)."""
    total = 0.0
    for t in range(1, steps + 1):
        a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
        total += 2 * lr * math.sqrt(sum(x * x / y for x, y in zip(a, b)))
    return total


def _state(step_fn) -> dict[str, torch.Tensor]:
    parts = step_fn.parts
    out = {f"model/{i}": p.detach().float() for i, p in enumerate(parts.params)}
    out.update({f"ema/{i}": e.detach().float() for i, e in enumerate(parts.ema.module.parameters())})
    for i, p in enumerate(parts.params):
        for k, v in parts.optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and k != "step":
                out[f"optim/{i}/{k}"] = v.float()
    return out


def check_graph_vs_eager(cfg, device: torch.device, batch: int, steps: int, precision: str = "bf16") -> dict:
    """The captured step against the eager one (see module doc)."""
    from workloads import LR, OursOptions, OursTrainStep, build_models, fixed_batch

    from ddpm.diffusion import GaussianDiffusion

    ours = build_models(cfg, device, train=True)[0]
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    x0 = fixed_batch(cfg, batch, device)
    cuda = device.type == "cuda"
    fns = {}
    for name, graph in (("eager", False), ("graph", True)):
        fns[name] = OursTrainStep(copy.deepcopy(ours), diffusion, x0, device,
                                  OursOptions(channels_last=False, precision=precision, fused_adam=True, cuda_graph=graph))
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
    losses = {}
    for name, fn in fns.items():
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], device)
        seen = []
        for _ in range(steps):
            fn()
            seen.append(fn.last_loss.double().reshape(1))
        losses[name] = torch.cat(seen).tolist()
    a, b = _state(fns["eager"]), _state(fns["graph"])
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    bound = adam_drift_bound(steps, LR)
    worst = {g: max(v for k, v in diffs.items() if k.startswith(g)) for g in ("model", "ema", "optim")}
    out = {"batch": batch, "steps": steps, "precision": precision, "losses": losses,
           "bit_identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": worst,
           "model_bound": bound, "within_bound": worst["model"] <= bound + 1e-6 and worst["ema"] <= bound + 1e-6}
    log(f"[check] graph vs eager, {steps} steps at batch {batch} ({precision}): bit-identical "
        f"{out['bit_identical']}; max |diff| weights {worst['model']:.3g}, EMA {worst['ema']:.3g} "
        f"(bound {bound:.3g}) -> {'ok' if out['within_bound'] else 'FAILED'}")
    return out


class _RandomImages:
    """Stand-in dataset: n random uint8 [H, W, C] images (the bytes do not matter for the check)."""

    def __init__(self, n: int, res: int, channels: int):
        self.data = np.random.default_rng(0).integers(0, 256, (n, res, res, channels), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices):
        return self.data[indices]


def check_no_host_sync(cfg, device: torch.device, batch: int, steps: int) -> dict:
    """``steps`` trainer steps (data on the device + step), eager and replayed, with any host
    synchronisation raising; the records are read once afterwards, as the trainer does."""
    from workloads import OursOptions, OursTrainStep, build_models

    from ddpm.diffusion import GaussianDiffusion
    from ddpm.images import to_model
    from ddpm.training.batches import BatchSource

    cuda = device.type == "cuda"
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    ours = build_models(cfg, device, train=True)[0]
    out = {"batch": batch, "steps": steps, "mode": "torch.cuda.set_sync_debug_mode('error')" if cuda
           else "ddpm.training.hostsync.forbid_host_sync"}
    for name, graph in (("eager", False), ("graph", True)):
        src = BatchSource(_RandomImages(4 * batch, cfg.model.resolution, cfg.model.in_channels), batch, seed=0, flip=True)
        src.put_on_device(device)
        fn = OursTrainStep(copy.deepcopy(ours), diffusion, to_model(src.next()), device,
                           OursOptions(channels_last=False, precision="bf16", fused_adam=True, cuda_graph=graph))
        for _ in range(2):  # warm-up (and, for the graph, capture) outside the check
            fn()
        records = []
        try:
            with _sync_check(cuda):
                for _ in range(steps):
                    fn.x0 = to_model(src.next())
                    fn()
                    records.append(fn.last_loss.reshape(1))
            finite = bool(torch.isfinite(torch.cat(records)).all())
            out[name] = {"ok": True, "losses_finite": finite}
        except Exception as e:  # noqa: BLE001 - recorded: the check failed
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        log(f"[check] no host sync, {name} step with data on the device, {steps} steps: "
            + ("ok" if out[name]["ok"] else f"FAILED ({out[name]['error']})"))
    return out


class _sync_check:
    """CUDA: set_sync_debug_mode("error") for the block; CPU: the package's checker."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.old = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        else:
            from ddpm.training.hostsync import forbid_host_sync

            self.ctx = forbid_host_sync()
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self.old)
        else:
            self.ctx.__exit__(*exc)
        return False


def peak_memory(fn, device: torch.device):
    """``fn`` wrapped so that ``.peak_bytes`` holds the largest peak of allocated device memory
    over its calls (CUDA; None elsewhere)."""

    class Peak:
        peak_bytes = None

        def __call__(self):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            if device.type == "cuda":
                self.peak_bytes = max(self.peak_bytes or 0, torch.cuda.max_memory_allocated(device))

    p = Peak()
    p.inner = fn
    return p


def bench_256(args, device: torch.device, cfg, timer) -> dict:
    """celebahq256's network: training steps/s at batch ``args.big_batch`` and 128 samples x 1000
    steps extrapolated from ``args.big_sample_steps`` (see module doc)."""
    from workloads import OursOptions, OursSampler, OursTrainStep, SampleOptions, fixed_batch

    from ddpm.diffusion import GaussianDiffusion
    from ddpm.nets.unet import UNet

    torch.manual_seed(0)
    model = UNet.from_config(cfg.model, cfg.out_channels).to(device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    cuda = device.type == "cuda"
    x0 = fixed_batch(cfg, args.big_batch, device)
    n = args.big_train_steps
    log(f"[256] {cfg.preset} U-Net ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), training at batch "
        f"{args.big_batch}, {n} steps per timed call, one variant at a time (their memory would not fit twice)")
    out = {"preset": cfg.preset, "paper_tpu_v3_8": PAPER_256, "train": {"batch": args.big_batch, "variants": {}}}
    for name, graph in (("ours_bf16_fused", False), ("ours_bf16_fused_graph", True)):
        try:
            fn = OursTrainStep(copy.deepcopy(model).train(), diffusion, x0, device,
                               OursOptions(channels_last=False, precision="bf16", fused_adam=cuda or None,
                                           cuda_graph=graph))
            timed = peak_memory(lambda fn=fn: [fn() for _ in range(n)], device)
            t = timer({name: timed}, args.big_repeats)[name]
            out["train"]["variants"][name] = {"steps_per_s": n / t.median, "median_s_per_step": t.median / n,
                                              "warmup_s": [round(w, 3) for w in t.warmup],
                                              "peak_memory_gib": _gib(timed.peak_bytes)}
        except torch.cuda.OutOfMemoryError as e:
            out["train"]["variants"][name] = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
            log(f"[256] {name}: out of memory")
        fn = timed = None
        if cuda:
            torch.cuda.empty_cache()
    B, k, T = args.big_sample_batch, args.big_sample_steps, diffusion.num_timesteps
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    model.eval()
    fns = {"ours_bf16_graph": OursSampler(model, diffusion, shape, B, k, device,
                                          SampleOptions(channels_last=False, cuda_graph=cuda, amp_dtype=torch.bfloat16)),
           "ours_fp32_graph": OursSampler(model, diffusion, shape, B, k, device,
                                          SampleOptions(channels_last=False, cuda_graph=cuda))}
    fns = {name: peak_memory(fn, device) for name, fn in fns.items()}
    log(f"[256] sampling {B} images, {k} of {T} steps per timed call (extrapolated to {T})")
    out["sample"] = {"batch": B, "steps_timed": k, "num_timesteps": T, "extrapolated": True, "variants": {}}
    for name, fn in fns.items():
        try:
            t = timer({name: fn}, args.big_repeats)[name]
            out["sample"]["variants"][name] = {f"seconds_{B}x{T}": t.median * T / k, "median_s_per_call": t.median,
                                               "peak_memory_gib": _gib(fn.peak_bytes)}
        except torch.cuda.OutOfMemoryError as e:
            out["sample"]["variants"][name] = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
            log(f"[256] {name}: out of memory")
        if cuda:
            torch.cuda.empty_cache()
    return out


def profile_steps(fns: dict, device: torch.device, calls: int) -> dict:
    """torch.profiler over each of ``fns`` (each a callable running a few steps)."""
    from gpu_profile import profile

    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        r = profile(fn, device, calls)
        out[name] = r
        busy = r["gpu_busy_s_per_call"]
        log(f"[profile] {name}: wall {r['wall_s_per_call'] * 1e3:.1f} ms/call, GPU busy {busy * 1e3:.1f} ms/call"
            + (f" ({100 * r['busy_fraction']:.0f}%)" if r["busy_fraction"] is not None else "")
            + "; top: " + "; ".join(f"{k['name'][:40]} {k['ms_per_call']:.2f} ms" for k in r["top_kernels"][:5])
            + f" [{time.perf_counter() - t0:.1f} s]")
    return out


def _gib(nbytes) -> float | None:
    return None if nbytes is None else round(nbytes / 2 ** 30, 3)
