"""``make demo``: train the default digits preset, sample, evaluate, write the report page, print a summary.

Every step goes through the same ``ddpm`` command line a user types, so the demo also
shows the commands. Re-running it resumes the finished run instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .cli import main as ddpm_main


def _run(argv: list[str]) -> float:
    print(f"\n$ ddpm {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = ddpm_main(argv)
    if rc != 0:
        raise SystemExit(rc)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm.demo", description=__doc__)
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: demo)")
    p.add_argument("--n", type=int, default=500, help="number of samples (default: 500)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config overrides passed to `ddpm train`")
    args = p.parse_args(argv)
    out = Path(args.out)
    run = out / "run"
    times: dict[str, float] = {}
    train_argv = ["train", "--preset", "digits", "--out", str(run), "--resume", "auto"]
    for kv in args.overrides:
        train_argv += ["--set", kv]
    times["train"] = _run(train_argv)
    times["sample"] = _run(["sample", "--ckpt", str(run), "--n", str(args.n), "--batch-size", str(args.n),
                            "--out", str(out / "samples.npz"), "--grid", str(out / "samples.png"),
                            "--progressive", "--chains", "--interpolate"])
    times["nll"] = _run(["eval", "nll", "--ckpt", str(run), "--split", "test", "--batch-size", "300",
                         "--out", str(out / "nll.json")])
    times["rd"] = _run(["eval", "rd", "--from", str(out / "nll.json"), "--out", str(out / "rd.json")])
    times["quality"] = _run(["eval", "quality", "--samples", str(out / "samples.npz"),
                             "--out", str(out / "quality.json")])
    from . import samplers

    few = [s for s in ("ddim", "dpm++2m", "unipc") if s in samplers.names()]  # a short quality-vs-NFE table
    times["steps"] = _run(["eval", "steps", "--ckpt", str(run), "--samplers", ",".join(few), "--nfe", "10,20",
                           "--n", str(min(args.n, 200)), "--batch-size", "200", "--out", str(out / "steps.json")])
    # The run's page (ddpm report): status, curves, sample grids, and the results above.
    times["report"] = _run(["report", str(run), "--results", str(out), "--out", str(out / "report.html")])

    nll = json.loads((out / "nll.json").read_text())
    q = json.loads((out / "quality.json").read_text())
    print("\n" + "=" * 72)
    print("ddpm demo summary (digits preset)")
    print(f"  samples          {out / 'samples.npz'} ({args.n} images, uint8 NHWC, key arr_0)")
    print(f"  sample grid      {out / 'samples.png'}")
    print(f"  figures          {out / 'samples_progressive.png'}  {out / 'samples_chains.png'}  "
          f"{out / 'samples_interpolation.png'}  {out / 'rd.png'}")
    print(f"  test bits/dim    {nll['total_bpd']:.4f} ± {nll['total_bpd_stderr']:.4f}  "
          f"(L0 {nll['decoder_bpd']:.4f}, rate {nll['rate_bpd']:.4f}, prior {nll['prior_bpd']:.2e})")
    real = q["reference"]["train_vs_test"]
    print(f"  sample quality   Fréchet distance {q['fd']:.3f}, confidence {q['confidence']:.3f}, balance "
          f"{q['balance']:.3f}  (real train digits: {real['fd']:.3f}, {real['confidence']:.3f}, {real['balance']:.3f})")
    steps = json.loads((out / "steps.json").read_text())["rows"]
    print(f"  few-step sampling digits Fréchet distance by network calls ({steps[0]['n']} images; "
          f"the full {len(nll['terms_bpd'])}-step chain above: {q['fd']:.3f} on {args.n})")
    for name in dict.fromkeys(r["sampler"] for r in steps):
        cells = "  ".join(f"NFE {r['nfe']}: {r['quality']:.3f} ({r['seconds_per_image'] * 1e3:.1f} ms/image)"
                          for r in steps if r["sampler"] == name)
        print(f"    {name:<10} {cells}")
    print(f"  report page      {out / 'report.html'}  (open it in a browser; ddpm report {run} --serve serves it)")
    print("  wall time        " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
