"""Recipes measured, not guessed (issue 23): train the same data with the options on and off and
score the samples at EQUAL STEPS (the shared machine's load does not change them).

    python benchmarks/recipes.py folder  --out DIR         # the 32x32 grey digits folder
    python benchmarks/recipes.py train   --data digits|FOLDER --arm NAME --steps N [--score-at 250,500] --out DIR
    python benchmarks/recipes.py score   RUN_DIR [--n 500] [--steps-at 500,1000] [--seed-sets 0,1000,2000] [--json FILE]

Scorer: the digits Fréchet distance of ``ddpm eval quality`` (ddpm.evaluate.digits_quality: an
MLP's 64-unit features, real TEST split as reference). Samples: ``--n`` images of seeds 0..n-1
(or S..S+n-1 for each S of ``--seed-sets``) with the full ancestral chain (what ``ddpm eval
quality --ckpt`` draws), from the EMA weights.
A model of the 32x32 folder is scored by shrinking its samples back to 8x8 with the least-squares
inverse of the enlargement (``ddpm.evaluate.digits_quality.shrink_enlarged``: the folder's real
images come back within one grey level and score ~2.1, as the 8x8 ones); a 4x4 block mean is
reported beside it (``fd_box_shrink``) but is no inverse: the real images themselves score ~28 so.

Arms (``--arm``): ``paper`` (the config as it is: for ``--data digits`` the digits preset, for a
folder ``ddpm train --data FOLDER``'s defaults), ``recipe`` (min_snr:5, EMA ramp, cosine LR),
and the single options ``min_snr``, ``ema_ramp``, ``cosine``, ``linear``; more ``--set key=value``
overrides apply after the arm's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ARMS = {
    "paper": ["train.loss_weighting=none", "train.lr_schedule=constant", "train.ema_warmup=none"],
    "recipe": ["train.loss_weighting=min_snr:5", "train.lr_schedule=cosine", "train.ema_warmup=ramp"],
    "min_snr": ["train.loss_weighting=min_snr:5", "train.lr_schedule=constant", "train.ema_warmup=none"],
    "ema_ramp": ["train.loss_weighting=none", "train.lr_schedule=constant", "train.ema_warmup=ramp"],
    "cosine": ["train.loss_weighting=none", "train.lr_schedule=cosine", "train.ema_warmup=none"],
    "linear": ["train.loss_weighting=none", "train.lr_schedule=linear", "train.ema_warmup=none"],
}


def make_digits_folder(root: Path, resolution: int = 32) -> int:
    """All 1,797 scikit-learn digits (train then test split), enlarged to ``resolution`` and
    written as grey PNGs ``00000.png`` ...; returns the count."""
    from PIL import Image

    from ddpm.data import load_images

    images = np.concatenate([load_images("digits", s, resolution, 1) for s in ("train", "test")])
    root.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        Image.fromarray(im[:, :, 0], mode="L").save(root / f"{k:05d}.png")
    return len(images)


def shrink_box(u8: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R, C] -> uint8 [N, 8, 8, C] by the mean of each (R/8)x(R/8) block (for contrast:
    no inverse of the enlargement, the real images score ~28 this way)."""
    n, r, _, c = u8.shape
    if r == 8:
        return u8
    f = r // 8
    x = u8.reshape(n, 8, f, 8, f, c).astype(np.float64).mean(axis=(2, 4))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def base_config(data: str):
    from ddpm.config import get_preset

    if data == "digits":
        return get_preset("digits")
    from ddpm.commands.train import _config_from_data

    return _config_from_data(data, None, None, "cpu")


def train_arm(data: str, arm: str, steps: int, score_at: list[int], out: Path, extra: list[str]) -> Path:
    from ddpm.config import apply_overrides
    from ddpm.training import train

    cfg = apply_overrides(base_config(data), ARMS[arm] + extra)
    tc = cfg.train
    cfg = replace(cfg, train=replace(tc, total_steps=steps, sample_every=0, save_every=0, keep_last=50,
                                     save_every_minutes=0.0))
    cfg = cfg.validate()
    run_dir = out / f"{Path(data).name}_{arm}_{steps}"
    # checkpoints at every scored step (save_every = their gcd); one run, so a decaying LR sees
    # the run's whole length
    marks = sorted(set([s for s in score_at if 0 < s < steps] + [steps]))
    import math

    g = 0
    for m in marks:
        g = math.gcd(g, m)
    cfg = replace(cfg, train=replace(cfg.train, save_every=g))
    train(cfg, run_dir, resume="auto", device="cpu", progress=False, log=print)
    return run_dir


def score_checkpoint(ckpt: Path, n: int, batch: int = 250, sampler: str = "ancestral", steps: int | None = None,
                     seed: int = 0) -> dict:
    import torch

    from ddpm.api import load
    from ddpm.evaluate.digits_quality import digits_quality, shrink_enlarged
    from ddpm.images import to_uint8
    from ddpm.sampling import sample

    model, diffusion, cfg, _ = load(ckpt, device="cpu")
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    with torch.no_grad():
        x = sample(diffusion, model, shape, list(range(seed, seed + n)), batch_size=batch, device="cpu",
                   sampler=sampler, steps=steps)
    u8 = to_uint8(x)
    res = digits_quality(shrink_enlarged(u8))
    out = {"fd": res["fd"], "confidence": res["confidence"], "balance": res["balance"],
           "resolution": cfg.model.resolution, "n": n, "seed": seed}
    if cfg.model.resolution > 8:
        out["fd_box_shrink"] = digits_quality(shrink_box(u8))["fd"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folder")
    f.add_argument("--out", required=True)
    f.add_argument("--resolution", type=int, default=32)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--arm", choices=list(ARMS), required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--score-at", default="")
    t.add_argument("--out", required=True)
    t.add_argument("--set", action="append", default=[])
    s = sub.add_parser("score")
    s.add_argument("run")
    s.add_argument("--n", type=int, default=500)
    s.add_argument("--steps-at", default="")
    s.add_argument("--json", default=None)
    s.add_argument("--sampler", default="ancestral")
    s.add_argument("--sampler-steps", type=int, default=None, help="network calls (default: the full chain)")
    s.add_argument("--seed-sets", default="0",
                   help="first seeds of the sample sets, e.g. 0,1000,2000: each set is seeds S..S+n-1, and "
                        "with more than one the mean and standard deviation follow (the measure's spread)")
    s.add_argument("--real-folder", default=None, help="also score this folder's images shrunk to 8x8")
    args = p.parse_args(argv)
    if args.cmd == "folder":
        print(f"wrote {make_digits_folder(Path(args.out), args.resolution)} images to {args.out}")
        return
    if args.cmd == "train":
        marks = [int(x) for x in args.score_at.split(",") if x.strip()]
        print(train_arm(args.data, args.arm, args.steps, marks, Path(args.out), args.set))
        return
    from ddpm.checkpoint import list_checkpoints, read_meta
    from ddpm.training.state import step_of

    run = Path(args.run)
    want = {int(x) for x in args.steps_at.split(",") if x.strip()}
    seed_sets = [int(x) for x in args.seed_sets.split(",") if x.strip()]
    rows = []
    for ck in list_checkpoints(run / "checkpoints"):
        step = step_of(ck)
        if want and step not in want:
            continue
        cfg = read_meta(ck)["config"]["train"]
        row = {"run": str(run), "step": step, **{k: cfg.get(k) for k in ("loss_weighting", "lr_schedule",
                                                                          "ema_warmup", "batch_size", "lr",
                                                                          "total_steps")}}
        fds = []
        for seed in seed_sets:
            rows.append({**row, **score_checkpoint(ck, args.n, sampler=args.sampler, steps=args.sampler_steps,
                                                   seed=seed)})
            fds.append(rows[-1]["fd"])
            print(json.dumps(rows[-1]), flush=True)
        if len(fds) > 1:
            print(f"{ck.name}: FD mean {np.mean(fds):.3f}, sd {np.std(fds, ddof=1):.3f} over {len(fds)} seed sets",
                  flush=True)
    if args.real_folder:
        from ddpm.data import load_images
        from ddpm.evaluate.digits_quality import digits_quality, shrink_enlarged

        real = load_images(args.real_folder, "train", 32, 1, n=args.n)
        res = digits_quality(shrink_enlarged(real))
        rows.append({"run": "real folder images shrunk to 8x8", "fd": res["fd"], "confidence": res["confidence"],
                     "fd_box_shrink": digits_quality(shrink_box(real))["fd"]})
        print(json.dumps(rows[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
