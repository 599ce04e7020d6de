"""Winograd F(4x4, 3x3) against oneDNN's direct convolution, one 3x3 convolution at a time.

    python benchmarks/winograd_sweep.py [--threads 1]

Prints speed-ups (direct time / Winograd time, best of 5) for C -> C channel convolutions over
channel counts, map sizes and batch sizes, both sides NHWC float32 without autograd. These are
the numbers behind ddpm.winograd.MIN_CHANNELS / MIN_WORK / GROUP_MAX.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ddpm.winograd import Workspace, transform_weight, winograd_conv2d


def _best(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace()
    print("| C -> C | H = W | " + " | ".join(f"B={b}" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    with torch.inference_mode():
        for c in args.channels:
            for h in args.sizes:
                cells = []
                for b in args.batches:
                    x = torch.randn(b, c, h, h).contiguous(memory_format=torch.channels_last)
                    w = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
                    bias = torch.randn(c)
                    u = transform_weight(w)
                    direct = _best(lambda: F.conv2d(x, w, bias, padding=1))
                    wino = _best(lambda: winograd_conv2d(x, u, bias, ws))
                    cells.append(f"{direct / wino:.2f}")
                print(f"| {c} | {h} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
