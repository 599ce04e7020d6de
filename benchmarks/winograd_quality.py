"""What Winograd F(4x4, 3x3) costs in quality: digits samples and bits/dim, direct vs Winograd.

    python benchmarks/winograd_quality.py RUN_DIR [--n-samples 500] [--n-test N]

RUN_DIR is a trained digits run folder (EMA weights). The digits U-Net has 32-64 channels, below
the sizes where ``ddpm.winograd`` pays, so by default it is not routed; here the thresholds are
set to zero for the measurement so that *every* 3x3 stride-1 convolution runs through Winograd.
Everything else is paired (same weights, seeds, noise, images): only the convolution algorithm
differs. Reported: the uint8 samples' differences, digits quality (FD, confidence, balance) and
the test-split bits/dim with the paired per-image difference and its standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import result_path, write_json  # noqa: E402


@contextlib.contextmanager
def _everywhere(model):
    from ddpm import winograd as wg

    saved = wg.MIN_CHANNELS, wg.MIN_WORK
    wg.MIN_CHANNELS, wg.MIN_WORK = 1, 0
    try:
        with wg.winograd_convs(model) as n:
            yield n
    finally:
        wg.MIN_CHANNELS, wg.MIN_WORK = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="digits run folder or checkpoint")
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--n-test", type=int, default=None, help="test images for bits/dim (default all; 0 skips)")
    p.add_argument("--out", default=None, help="JSON file (default bench_results/winograd_quality_<time>.json)")
    args = p.parse_args(argv)

    from ddpm.api import load
    from ddpm.data import load_images
    from ddpm.evaluate.digits_quality import digits_quality
    from ddpm.evaluate.nll import evaluate_nll
    from ddpm.images import to_uint8
    from ddpm.sampling import sample
    from ddpm.speed import Speed

    model, diffusion, cfg, _ = load(args.run, device="cpu")
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    seeds = list(range(args.n_samples))
    res: dict = {"run": str(args.run), "n_samples": args.n_samples}
    u8 = {}
    for name in ("direct", "winograd"):
        t0 = time.perf_counter()
        if name == "direct":
            x = sample(diffusion, model, shape, seeds, batch_size=len(seeds), speed=Speed(winograd=False))
        else:
            with _everywhere(model) as n:
                res["convs_routed"] = n
                x = sample(diffusion, model, shape, seeds, batch_size=len(seeds), speed=Speed(winograd=False))
        u8[name] = to_uint8(x)
        q = digits_quality(u8[name])
        res[name] = {"sample_s": round(time.perf_counter() - t0, 1),
                     **{k: q[k] for k in ("fd", "confidence", "balance")}}
        print(f"{name}: FD {q['fd']:.4f}, confidence {q['confidence']:.4f}, balance {q['balance']:.4f}", flush=True)
    d = np.abs(u8["winograd"].astype(np.int16) - u8["direct"].astype(np.int16))
    res["pixels"] = {"mean_abs_diff": float(d.mean()), "frac_differ": float((d > 0).mean()), "max_diff": int(d.max())}
    print(f"uint8 samples: mean |diff| {d.mean():.4f}, {100 * (d > 0).mean():.2f}% of pixels differ, max {d.max()}")

    if args.n_test != 0:
        images = load_images(cfg.data.source, "test", cfg.model.resolution, cfg.model.in_channels, n=args.n_test)
        per = {}
        for name in ("direct", "winograd"):
            ctx = _everywhere(model) if name == "winograd" else contextlib.nullcontext()
            with ctx:
                r = evaluate_nll(model, diffusion, images, batch_size=len(images), seed=0, progress=False)
            per[name] = np.asarray(r.per_image_total_bpd, dtype=np.float64)
            res[name]["bpd"] = float(per[name].mean())
        diff = per["winograd"] - per["direct"]
        res["bpd_diff"] = {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / math.sqrt(len(diff)))}
        print(f"test bits/dim: direct {res['direct']['bpd']:.5f}, winograd {res['winograd']['bpd']:.5f}, "
              f"paired difference {diff.mean():+.2e} ± {res['bpd_diff']['se']:.1e}")
    out = result_path(args.out, "winograd_quality")
    write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
