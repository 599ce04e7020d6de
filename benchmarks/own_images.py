"""Own-images numbers (issue 17): loader throughput folder vs `ddpm data prepare`, and `tiny` step rate.

    python benchmarks/own_images.py [--images 512] [--steps 20] [--threads 1]

1. Loader: a folder of 64x64 RGB PNGs (the embedded digits, upscaled bilinearly to 64x64 and
   tinted, so they compress like drawings rather than noise), read at 64x64 through the training
   batch source (batch 64, flips) from the folder and from its prepared .npy. Images/s by wall
   clock and by process CPU time (the steadier number on a shared machine).
2. `tiny` at 32x32 (3 channels, batch 32): steps/s of the real trainer on this CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int) -> None:
    from PIL import Image

    from ddpm.data import load_images

    digits = load_images("digits", "train", 64, 1, n=n)[:, :, :, 0]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        tint = rng.uniform(0.4, 1.0, 3)
        rgb = (digits[k % len(digits), :, :, None] * tint).astype(np.uint8)
        Image.fromarray(rgb).save(root / f"{k:05d}.png")


def loader_rate(source: str, batches: int) -> tuple[float, float]:
    from ddpm.data import open_dataset
    from ddpm.training.batches import BatchSource

    ds = open_dataset(source, "train", 64, 3)
    src = BatchSource(ds, 64, seed=0, flip=True)
    src.next()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        src.next()
    w, c = time.perf_counter() - w0, time.process_time() - c0
    return 64 * batches / w, 64 * batches / c


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f}; torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png64"
        make_folder(folder, args.images)
        from ddpm.prepare import prepare

        t0 = time.perf_counter()
        prepare(str(folder), Path(tmp) / "png64.npy", 64, 3)
        print(f"prepare: {args.images} images in {time.perf_counter() - t0:.2f} s")
        batches = max(1, args.images // 64)
        fw, fc = loader_rate(str(folder), batches)
        pw, pc = loader_rate(str(Path(tmp) / "png64.npy"), batches * 20)
        print(f"loader 64x64 PNG folder: {fw:,.0f} images/s wall, {fc:,.0f} images/s CPU")
        print(f"loader prepared .npy:    {pw:,.0f} images/s wall, {pc:,.0f} images/s CPU")
        print(f"ratio prepared/folder:   {pw / fw:.1f}x wall, {pc / fc:.1f}x CPU")

        from ddpm.sizes import config_for
        from ddpm.training.loop import train

        cfg = config_for(32, 3, "tiny", "digits")
        cfg = replace(cfg, train=replace(cfg.train, total_steps=args.steps, log_every=0, sample_every=0,
                                         save_every=0))
        c0 = time.process_time()
        r = train(cfg, Path(tmp) / "run", progress=False, log=lambda m: None)
        cpu = time.process_time() - c0
        print(f"tiny32 (batch 32, {r['step']} steps incl. the first): {r['steps_per_s']:.2f} steps/s wall, "
              f"{cpu / r['step']:.2f} CPU s/step")


if __name__ == "__main__":
    main()
