"""Editing real digits without a human judge: inpainting agreement and DDIM round-trip RMSE.

    python benchmarks/editing.py RUN_DIR [--n 297] [--repaint-steps K] [--steps-list 20,50,200]
        [--parts replacement-full,replacement,repaint,invert] [--figure PNG] [--out JSON]

RUN_DIR is a trained ``digits`` run (``make demo``) or one of its checkpoints (EMA weights).
On the first ``--n`` images of the digits TEST split (297 = all of it):

* inpainting (:func:`ddpm.editing.inpaint`, seeds 0..n-1) with the bottom half and with the
  right half generated, for the replacement method (R = 1) and RePaint's default jump J = 10,
  R = 10 resamplings (``--repaint J,R``) on a chain of ``--repaint-steps`` kept steps (default
  the full T; R = 1 also on the full chain when that is shorter); each result is scored by the
  classifier of ``ddpm eval quality`` (:mod:`ddpm.evaluate.digits_quality`, trained on the TRAIN
  split): the share classified as the image's true label, beside the same classifier on the
  original images (ceiling) and on the input with the region filled with grey 128 (floor);
* DDIM inversion (:func:`ddpm.editing.ddim_invert`, then :func:`ddpm.editing.ddim_decode`, eta 0,
  clipping off) at K kept steps (trailing spacing): RMSE of the uint8 round trip against the
  uint8 input, in grey levels (0..255), and its largest per-pixel error.

Results are written after every measurement (a partial JSON survives an interrupted run), to
``--out`` (default bench_results/editing_<time>.json). ``--figure`` writes a PNG: per region, rows
input / masked input (grey) / R = 1 / RePaint for the first 10 test digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import result_path, write_json  # noqa: E402

REGIONS = ("bottom", "right")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _agreement(u8: np.ndarray, labels: np.ndarray) -> float:
    from ddpm.evaluate.digits_quality import digits_quality

    return float(digits_quality(u8, labels=labels)["agreement"])


def _grey_fill(u8: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """uint8 images with the generated region (gen [N, 1, H, W] of 0/1) set to grey 128."""
    out = u8.copy()
    out[gen.transpose(0, 2, 3, 1).astype(bool).repeat(u8.shape[3], axis=3)] = 128
    return out


def run(args) -> dict:
    from ddpm.api import load
    from ddpm.data import digits_labels, load_images
    from ddpm.editing import ddim_decode, ddim_invert, inpaint
    from ddpm.editing.inpaint import count_calls
    from ddpm.editing.masks import region_mask
    from ddpm.images import to_model, to_uint8

    loaded = load(args.run)
    model, diffusion, cfg = loaded.model, loaded.diffusion, loaded.config
    u8 = load_images("digits", "test", cfg.model.resolution, cfg.model.in_channels, n=args.n)
    labels = np.asarray(digits_labels("test"), np.int64)[:len(u8)]
    x0 = to_model(u8)
    N, T = len(u8), diffusion.num_timesteps
    args.repaint_steps = args.repaint_steps or T
    J, R = args.repaint
    out_path = result_path(args.out, "editing")
    res: dict = {"run": str(args.run), "step": loaded.meta.get("step"), "n": N, "num_timesteps": T,
                 "threads": torch.get_num_threads(), "classifier": "ddpm eval quality (digits-mlp-v1)",
                 "ceiling_original": _agreement(u8, labels), "inpaint": {}, "invert": {}}
    _log(f"{N} test digits; classifier on the originals: {res['ceiling_original']:.3f}")
    common = dict(batch_size=args.batch_size, progress=not args.no_progress)
    shown = {}
    for region in REGIONS:
        gen = np.broadcast_to(region_mask(region, *u8.shape[1:3])[None, None], (N, 1, *u8.shape[1:3]))
        floor = _agreement(_grey_fill(u8, gen), labels)
        res["inpaint"][region] = {"floor_grey": floor}
        shown[region] = [u8[:10], _grey_fill(u8[:10], gen[:10])]
        _log(f"{region}: grey-filled floor {floor:.3f}")
    write_json(out_path, res)
    # (name, R, J, kept steps K): the replacement method on the full chain and on RePaint's chain
    plans = []
    if "replacement-full" in args.parts and args.repaint_steps != T:
        plans += [("replacement", 1, 1, T)]
    if "replacement" in args.parts:
        plans += [("replacement", 1, 1, args.repaint_steps)]
    if "repaint" in args.parts:
        plans += [("repaint", R, J, args.repaint_steps)]
    for (name, r_, j_, K), region in [(p, r) for p in plans for r in REGIONS]:
        gen = torch.from_numpy(region_mask(region, *u8.shape[1:3]))[None, None]
        t0 = time.perf_counter()
        x = inpaint(diffusion, model, x0, gen, range(N), resample=r_, jump=j_, steps=None if K == T else K, **common)
        secs = time.perf_counter() - t0
        got = to_uint8(x)
        acc = _agreement(got, labels)
        res["inpaint"][region][f"{name}_R{r_}_J{j_}_K{K}"] = {
            "agreement": acc, "network_calls_per_image": count_calls(K, j_, r_), "seconds_under_load": round(secs)}
        if K == args.repaint_steps:
            shown[region].append(got[:10])
        _log(f"{region} {name} (R={r_}, J={j_}, {K}-step chain, {count_calls(K, j_, r_)} calls): agreement "
             f"{acc:.3f} ({secs:.0f} s)")
        write_json(out_path, res)
        if args.figure and all(len(v) == 4 for v in shown.values()):
            _figure(shown, args.figure)
    if "invert" not in args.parts:
        args.steps_list = []
    for K in args.steps_list:
        t0 = time.perf_counter()
        steps = None if K == T else K
        z = ddim_invert(diffusion, model, x0, steps=steps, **common)
        rec = to_uint8(ddim_decode(diffusion, model, z, steps=steps, **common))
        diff = rec.astype(np.float64) - u8.astype(np.float64)
        res["invert"][str(K)] = {"rmse_grey_levels": float(np.sqrt((diff ** 2).mean())),
                                 "max_abs_grey_levels": float(np.abs(diff).max()),
                                 "latent_std": float(z.std()), "seconds_under_load": round(time.perf_counter() - t0)}
        _log(f"DDIM round trip K={K}: RMSE {res['invert'][str(K)]['rmse_grey_levels']:.2f} grey levels, "
             f"max {res['invert'][str(K)]['max_abs_grey_levels']:.0f}, latent std {float(z.std()):.3f}")
        write_json(out_path, res)
    _log(f"wrote {out_path}")
    return res


def _figure(shown: dict, path: str) -> None:
    """Rows: for each region (bottom, then right) input, grey-masked input, R = 1, RePaint (10 digits)."""
    from ddpm.editio import comparison_grid

    rows = [r for region in REGIONS for r in shown[region]]
    labels = [f"{region[0].upper()}: {name}" for region in REGIONS for name in ("input", "masked", "R=1", "RePaint")]
    width = min(len(r) for r in rows)
    comparison_grid([r[:width] for r in rows], labels, path, cell_inches=0.9)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a digits run folder or checkpoint")
    p.add_argument("--n", type=int, default=297, help="test digits (297 = the whole test split)")
    p.add_argument("--repaint", default="10,10", help="RePaint's J,R (jump, resamplings)")
    p.add_argument("--steps-list", default="20,50,200", help="K values of the DDIM round trip")
    p.add_argument("--repaint-steps", type=int, default=None, help="kept steps of RePaint's chain (default: all T)")
    p.add_argument("--parts", default="replacement-full,replacement,repaint,invert",
                   help="which measurements to run: replacement-full (R = 1 on the full chain, when "
                        "--repaint-steps is shorter), replacement (R = 1 on RePaint's chain), repaint, invert")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--figure", default=None, help="PNG of inputs and completions")
    p.add_argument("--out", default=None, help="JSON result (default bench_results/editing_<time>.json)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.repaint = tuple(int(v) for v in args.repaint.split(","))
    args.steps_list = [int(v) for v in args.steps_list.split(",")]
    args.parts = set(args.parts.split(","))
    run(args)


if __name__ == "__main__":
    main()
