"""``ddpm data prepare``: decode a dataset once into a memory-mapped uint8 .npy for fast training."""

from __future__ import annotations

import argparse

from ..cliutil import check_suffix as _check_suffix
from ..errors import UserError
from .args import POS, Formatter, Parser

HELP = "prepare a dataset once for fast training"


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("data", help=HELP, formatter_class=Formatter)
    dsub = d.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    dsub.required = True
    dp = dsub.add_parser("prepare", help="decode, crop and resize every image once into OUT.npy (+ OUT.json)",
                         formatter_class=Formatter,
                         description="Decode, centre-crop and area-resize every image of SRC once, exactly as "
                                     "training from SRC would, into a memory-mapped uint8 OUT.npy [N,H,W,C] and "
                                     "OUT.json (provenance, class names from subfolders, sha256). Train with "
                                     "--data OUT.npy.")
    dp.add_argument("src", metavar="SRC",
                    help="image folder (one subfolder per class keeps labels), or any --data source")
    dp.add_argument("out", metavar="OUT.npy", help="array file to write (OUT.json and OUT.labels.npy beside it)")
    dp.add_argument("--resolution", type=POS, required=True, metavar="N", help="output size NxN in pixels")
    dp.add_argument("--channels", type=int, default=None, choices=(1, 3),
                    help="1 (grey) or 3 (RGB) (default: 3 if any image is in a colour mode, else 1)")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return d


def run(args: argparse.Namespace) -> None:
    """``ddpm data prepare SRC OUT.npy --resolution N [--channels C]`` (ddpm.datasets.prepared)."""
    from ..datasets.prepared import labels_path, sidecar
    from ..prepare import prepare
    from ..datasets.survey import survey

    out = _check_suffix(args.out, ".npy", "OUT")
    for p in (out, sidecar(out), labels_path(out)):
        if p.exists():
            raise UserError(f"OUT {out}: '{p}' already exists; remove it or choose another OUT (nothing was written)")
    channels = args.channels if args.channels is not None else survey(args.src).channels
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="img", desc="prepare", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    try:
        meta = prepare(args.src, out, args.resolution, channels, log=print, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    names = meta["class_names"]
    print(f"wrote {out}: {meta['count']:,} images, uint8 [{meta['count']}, {meta['resolution']}, "
          f"{meta['resolution']}, {meta['channels']}]"
          + (f", {len(names)} classes from subfolders ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
             if names else "")
          + f"; description {sidecar(out)}; train with --data {out}")
