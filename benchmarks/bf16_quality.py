"""What bf16 autocast costs in quality: test bits/dim and digits sample quality, fp32 vs bf16.

    python benchmarks/bf16_quality.py RUN_DIR [--n-test N] [--n-samples 500] [--device cpu]

RUN_DIR is a trained digits run folder (or one of its checkpoints); its EMA weights are used,
as for every evaluation. For each precision, the same images, noise seeds and sample seeds are
used, so the differences are paired (only the network's arithmetic differs):

* bits/dim of the digits TEST split: the full T-term bound (``ddpm.evaluate.nll.evaluate_nll``);
  the per-image difference bf16 - fp32 is reported with its standard error;
* digits quality (``ddpm.evaluate.digits_quality.digits_quality``) of ``--n-samples`` samples
  (Algorithm 2, seeds 0..N-1): Fréchet distance, confidence, balance.

bf16 runs the network under ``torch.autocast(bfloat16)`` (weights, sampler and bound math stay
fp32). On a CPU without bf16 instructions (AVX512-BF16 / AMX) the bf16 convolutions take a slow
fallback (~8x slower than fp32): use --n-test / --n-samples to bound the run time there.
The JSON result goes to --out (default bench_results/bf16_quality_<time>.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import result_path, write_json  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _log(msg: str) -> None:
    print(msg, flush=True)


def evaluate(run: str, precisions: list[str], n_test: int | None, n_samples: int, batch_size: int, device: str,
             seed: int, progress: bool) -> dict:
    """Bits/dim and digits quality per precision, plus the paired bf16 - fp32 differences."""
    from ddpm.api import load
    from ddpm.data import load_images
    from ddpm.evaluate.digits_quality import digits_quality
    from ddpm.evaluate.fid import generate_samples
    from ddpm.evaluate.nll import evaluate_nll
    from ddpm.fast import FastModel, channels_last

    loaded = load(run, device=device)
    model, diffusion, cfg = loaded.model, loaded.diffusion, loaded.config
    if (cfg.model.resolution, cfg.model.in_channels) != (8, 1) or cfg.data.source != "digits":
        _log(f"note: {run} is not a digits run (source {cfg.data.source!r}, {cfg.model.resolution}px); "
             "digits quality needs 8x8 samples")
    test = load_images("digits", "test", cfg.model.resolution, cfg.model.in_channels)
    if n_test is not None:
        test = test[:n_test]
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    out: dict = {"run": str(run), "step": loaded.meta.get("step"), "n_test": int(len(test)),
                 "n_samples": int(n_samples), "num_timesteps": diffusion.num_timesteps, "seed": seed,
                 "device": str(device), "threads": torch.get_num_threads(), "results": {}}
    per_image = {}
    for name in precisions:
        amp = PRECISIONS[name]
        res: dict = {}
        t0 = time.perf_counter()
        # channels_last for the bits/dim loop too (the sampler does it by itself)
        with channels_last(model):
            nll = evaluate_nll(FastModel(model, device), diffusion, test, batch_size=batch_size, seed=seed,
                               device=device, amp_dtype=amp, progress=progress)
        res["bits_per_dim"] = nll.summary()
        res["bits_per_dim_s"] = round(time.perf_counter() - t0, 1)
        per_image[name] = nll.per_image_total_bpd
        _log(f"{name}: test bits/dim {nll.total_bpd:.4f} ± {nll.total_bpd_stderr:.4f} over {nll.n} images "
             f"({res['bits_per_dim_s']} s)")
        if n_samples >= 2:
            t0 = time.perf_counter()
            u8 = generate_samples(diffusion, model, n_samples, shape, seed=seed, batch_size=batch_size, device=device,
                                  amp_dtype=amp, progress=progress, gather=False, rank=0, world_size=1)
            res["digits_quality"] = digits_quality(u8)
            res["sampling_s"] = round(time.perf_counter() - t0, 1)
            res["samples_u8_mean"] = float(u8.mean())
            q = res["digits_quality"]
            _log(f"{name}: digits quality of {n_samples} samples: FD {q['fd']:.3f}, confidence "
                 f"{q['confidence']:.3f}, balance {q['balance']:.3f} ({res['sampling_s']} s)")
            res["_samples"] = u8
        out["results"][name] = res
    if "fp32" in per_image and "bf16" in per_image:
        d = per_image["bf16"] - per_image["fp32"]
        diff = {"bits_per_dim_mean": float(d.mean()),
                "bits_per_dim_stderr": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None,
                "bits_per_dim_max_abs": float(np.abs(d).max())}
        r32, r16 = out["results"]["fp32"], out["results"]["bf16"]
        if "_samples" in r32 and "_samples" in r16:
            a, b = r32["_samples"].astype(np.int64), r16["_samples"].astype(np.int64)
            diff["samples_mean_abs_u8"] = float(np.abs(a - b).mean())
            diff["samples_identical_fraction"] = float((a == b).all(axis=(1, 2, 3)).mean())
            for key in ("fd", "confidence", "balance"):
                diff[f"digits_{key}"] = r16["digits_quality"][key] - r32["digits_quality"][key]
        out["bf16_minus_fp32"] = diff
        _log(f"bf16 - fp32: bits/dim {diff['bits_per_dim_mean']:+.4f} ± {diff['bits_per_dim_stderr'] or 0:.4f} "
             f"(paired), samples differ by {diff.get('samples_mean_abs_u8', float('nan')):.2f}/255 on average")
    for res in out["results"].values():
        res.pop("_samples", None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="trained digits run folder or checkpoint file")
    p.add_argument("--n-test", type=int, default=None, help="first N test images (default: the whole split)")
    p.add_argument("--n-samples", type=int, default=500, help="samples for digits quality (0: skip)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seeds of the bound and of the samples")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=None, help="JSON file (default bench_results/bf16_quality_<time>.json)")
    args = p.parse_args(argv)
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = [s for s in precisions if s not in PRECISIONS]
    if bad or not precisions:
        p.error(f"--precisions: unknown {bad}; expected fp32 and/or bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ddpm.errors import UserError

    try:
        res = evaluate(args.run, precisions, args.n_test, args.n_samples, args.batch_size, args.device, args.seed,
                       args.progress)
    except UserError as e:
        print(f"bf16_quality: error: {e}", file=sys.stderr)
        return 2
    out = result_path(args.out, "bf16_quality")
    write_json(out, res)
    _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
