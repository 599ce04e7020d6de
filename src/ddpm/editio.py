"""The images, labels and grids of ``ddpm edit`` and ``ddpm encode`` (shared, below both commands).

``--images SRC`` is one of: ``test`` / ``train`` (that split of the checkpoint's own training
data), a folder of images, one image file (PNG, JPEG, WebP), or a ``.npz``/``.npy`` of uint8
[N, H, W, C] / [N, H, W]. Images are taken at their own size and must match the model's
resolution and channel count; anything else is a one-line :class:`ddpm.errors.DataError` saying
which and how to resize, unless ``resize`` (``--resize``): then every image is converted to the
model's channels, centre-cropped and area-resized exactly as training data are
(:mod:`ddpm.datasets.imageops`), and the command says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import ConfigError, DataError

__all__ = ["read_images", "labels_for", "comparison_grid", "read_latents"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _describe(h: int, w: int, c: int) -> str:
    return f"{w}x{h} {'grey' if c == 1 else 'RGB'} ({c} channel{'s' if c != 1 else ''})"


def read_images(src: str, data_source: str, resolution: int, channels: int, resize: bool = False,
                n: Optional[int] = None, log: Callable[[str], None] = print
                ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(uint8 [N, resolution, resolution, channels], int64 labels [N] or None) from ``--images SRC``.

    ``data_source``: the checkpoint's ``data.source`` (for ``test``/``train``); ``n``: keep the
    first n images. Raises DataError for a missing or unreadable source and for images of another
    size or channel count than the model's when ``resize`` is off.
    """
    from .data import open_dataset, read_samples
    from .datasets.imageops import decode_file, decode_native, fit_array

    text = str(src)
    if text in ("test", "train"):
        ds = open_dataset(data_source, text, resolution, channels)
        idx = np.arange(len(ds) if n is None else min(n, len(ds)))
        labels = getattr(ds, "labels", None)
        return ds.take(idx), None if labels is None else np.asarray(labels)[idx]
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise DataError(f"--images {src}: not found; expected test, train, an image folder, an image file "
                        f"(.png, .jpg, .webp) or a .npz/.npy of uint8 images")
    labels = None
    if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
        u8 = (decode_file(path, resolution, channels) if resize else decode_native(path))[None]
    elif path.is_dir() and resize:
        ds = open_dataset(str(path), "test", resolution, channels)
        u8, labels = ds.take(np.arange(len(ds))), getattr(ds, "labels", None)
    else:
        u8 = np.asarray(read_samples(str(path)))
        if u8.ndim == 3:
            u8 = u8[..., None]
        if path.suffix.lower() == ".npz":
            from .datasets.arrays import load_labels

            labels = load_labels(path, len(u8))
        if resize:
            u8 = np.stack([fit_array(im, resolution, channels) for im in u8])
    if n is not None:
        u8 = u8[:n]
        labels = None if labels is None else labels[:n]
    if u8.dtype != np.uint8 or u8.ndim != 4 or len(u8) == 0:
        raise DataError(f"--images {src}: expected uint8 images [N, H, W, C]; got {u8.dtype} {list(u8.shape)}")
    h, w, c = u8.shape[1:]
    if (h, w, c) != (resolution, resolution, channels):
        raise DataError(f"--images {src}: images are {_describe(h, w, c)}, but the model takes "
                        f"{_describe(resolution, resolution, channels)}; pass --resize (centre crop, area resize"
                        f"{', colour conversion' if c != channels else ''}) or convert them first, e.g. "
                        f"ddpm data prepare {src} OUT.npy --resolution {resolution} --channels {channels}")
    if resize:
        log(f"--resize: {len(u8)} image(s) from {src} converted to the model's "
            f"{_describe(resolution, resolution, channels)} (centre crop, area resize)")
    return np.array(u8, dtype=np.uint8, order="C"), labels  # a writable copy (datasets may hand out read-only views)


def labels_for(num_classes: int, class_spec: Optional[str], guidance: Optional[float], n: int,
               data_labels: Optional[np.ndarray], src: str) -> tuple[Optional[dict], Optional[float], Optional[np.ndarray]]:
    """(model_kwargs, guidance, labels) for an edit of n images.

    An unconditional model takes neither ``--class`` nor ``--guidance``. A class-conditional one
    uses ``--class`` (a class, a list cycled, or ``all``), else the images' own labels (the
    digits' and CIFAR-10's, an image folder's subfolders, an .npz's label array), else it asks
    for ``--class``. W defaults to 1 (the plain conditional model).
    """
    from .conditioning import check_labels, guided_call, parse_classes, sampling_labels

    if num_classes <= 0:
        sampling_labels(num_classes, class_spec, guidance, n)  # raises for --class/--guidance
        return None, None, None
    if class_spec is not None:
        labels = parse_classes(class_spec, num_classes, n)
    elif data_labels is not None:
        labels = check_labels(data_labels, num_classes, f"--images {src}")
    else:
        raise ConfigError(f"--images {src} carries no class labels and the model is class-conditional "
                          f"(model.num_classes={num_classes}); pass --class (e.g. --class 3, --class 0,1,2)")
    _, w = sampling_labels(num_classes, "all", guidance, n)
    kwargs, g = guided_call(labels, w, num_classes)
    return kwargs, g, labels


def comparison_grid(rows: list[np.ndarray], names: list[str], path, max_cols: int = 16, title: str | None = None,
                    cell_inches: float = 0.6) -> None:
    """A labelled PNG: one row per entry of ``rows`` (uint8 [N, H, W, C], same N), the first
    ``max_cols`` images side by side (e.g. input, masked input, result)."""
    import torch

    from .evaluate.figures import save_labelled_grid
    from .images import to_model

    k = min(max_cols, len(rows[0]))
    x = torch.stack([to_model(r[:k]) for r in rows])
    save_labelled_grid(x, path, row_labels=names, title=title, cell_inches=cell_inches)


def read_latents(path: str, shape: tuple[int, int, int]):
    """(float32 tensor [N, C, H, W], {"steps": K or None, "spacing": str or None}) from ``--x-T``.

    ``path``: an .npz written by ``ddpm encode`` (``arr_0`` plus its ``steps``/``spacing``) or any
    .npz/.npy of float [N, C, H, W] with C, H, W the model's; DataError otherwise.
    """
    import torch

    p = Path(os.path.expanduser(str(path)))
    if p.suffix.lower() not in (".npz", ".npy") or not p.is_file():
        raise DataError(f"--x-T {path}: expected an existing .npz (from ddpm encode) or .npy of latents [N, "
                        f"{', '.join(map(str, shape))}]")
    meta: dict = {"steps": None, "spacing": None}
    try:
        if p.suffix.lower() == ".npy":
            z = np.load(p, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as f:
                key = "arr_0" if "arr_0" in f.files else (f.files[0] if f.files else None)
                if key is None:
                    raise DataError(f"--x-T {path}: the .npz holds no array; expected latents under arr_0")
                z = f[key]
                if "steps" in f.files:
                    meta["steps"] = int(f["steps"]) or None
                if "spacing" in f.files:
                    meta["spacing"] = str(f["spacing"])
    except (OSError, ValueError) as e:
        raise DataError(f"--x-T {path}: cannot read it ({e}); expected latents written by ddpm encode") from None
    z = np.asarray(z)
    if z.dtype.kind != "f" or z.ndim != 4 or tuple(z.shape[1:]) != tuple(shape) or len(z) == 0:
        raise DataError(f"--x-T {path}: holds {z.dtype} {list(z.shape)}; expected float latents "
                        f"[N, {', '.join(map(str, shape))}] for this model")
    if not np.isfinite(z).all():
        raise DataError(f"--x-T {path}: latents contain NaN or infinity")
    return torch.from_numpy(np.array(z, dtype=np.float32)), meta


def latents_note(meta: dict, steps: Optional[int], spacing: str, sampler: str, clip: bool, T: int) -> Optional[str]:
    """A one-line hint when ``ddpm sample --x-T`` decodes ``ddpm encode`` latents on another chain
    than they were encoded on (steps, spacing), or not as the exact inverse (DDIM, clipping off)."""
    if meta.get("spacing") is None:
        return None
    K = meta.get("steps") or T
    same = (steps or T) == K and (spacing == meta["spacing"] or K == T) and sampler == "ddim" and not clip
    if same:
        return None
    return (f"note: these latents were encoded with {K} DDIM steps ({meta['spacing']}); decode them exactly with "
            f"--sampler ddim --steps {K} --spacing {meta['spacing']} --clip off")
