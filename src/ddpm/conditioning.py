"""Class labels for class-conditional models and classifier-free guidance (torch-light helpers).

Not in the DDPM paper (its models are unconditional). Classifier-free guidance (Ho & Salimans
2022, "Classifier-Free Diffusion Guidance", eq. 6) trains one network on labels y in 0..C-1 and,
with probability ``p_uncond`` per image, on the *null* label C; sampling then mixes the two
predictions::

    eps = eps(x, t, null) + W * (eps(x, t, y) - eps(x, t, null))

W = 1 is the plain conditional model, W = 0 the unconditional one, W > 1 trades diversity for
fidelity. Ho & Salimans write the same rule as (1 + w) eps_c - w eps_u, so their w = W - 1
(their w = 0 is our W = 1). The combination itself lives in :func:`ddpm.sample` (``guidance=W``).

This module holds what the trainer, the data and the command line share:

* :func:`dataset_labels` - a dataset's labels checked against ``model.num_classes``;
* :func:`drop_labels` - label dropout for one global batch, from a seeded generator;
* :func:`parse_classes` / :func:`sampling_labels` - ``--class 3 | 0,1,2 | all`` -> per-image labels;
* :func:`guided_call` - labels and W -> ``model_kwargs`` and ``guidance`` for :func:`ddpm.sample`;
* :func:`class_grid` - samples laid out one row per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's label parsing stays torch-free
    import torch

__all__ = ["dataset_labels", "check_labels", "drop_labels", "parse_classes", "sampling_labels", "guided_call",
           "class_grid"]


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """int64 [N] ``labels`` if all lie in 0..num_classes-1, else a one-line DataError naming ``what``."""
    y = np.asarray(labels).reshape(-1)
    if y.size and y.dtype.kind not in "iu":
        raise DataError(f"{what}: class labels are {y.dtype.name}; expected integers 0..{num_classes - 1}")
    y = y.astype(np.int64)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
        raise DataError(f"{what}: class label {bad} is outside 0..{num_classes - 1} (model.num_classes="
                        f"{num_classes}); expected labels below model.num_classes")
    return y


def dataset_labels(dataset: Any, num_classes: int, source: Optional[str] = None) -> np.ndarray:
    """The labels of ``dataset`` (int64 [len]) for a model with ``num_classes`` classes.

    Raises:
        DataError: the data carries no labels (naming the file), or a label is out of range.
    """
    what = f"data source '{source if source is not None else getattr(dataset, 'source', '?')}'"
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DataError(f"{what} has no class labels, but model.num_classes={num_classes}; expected digits, "
                        f"CIFAR-10, an image folder with one subfolder per class, or an .npz with a label array "
                        f"(arr_1, labels or y); or set model.num_classes=0 for an unconditional model")
    if len(labels) != len(dataset):
        raise DataError(f"{what} has {len(labels)} labels for {len(dataset)} images; expected one per image")
    return check_labels(labels, num_classes, what)


def drop_labels(y: "torch.Tensor", p_uncond: float, num_classes: int, generator: "torch.Generator",
                offset: int = 0, total: Optional[int] = None) -> "torch.Tensor":
    """Label dropout for classifier-free guidance: each label becomes the null label C w.p. ``p_uncond``.

    Args:
        y: int64 [b] labels: images ``offset .. offset + b - 1`` of a global batch of ``total``
            (default b) images, e.g. one rank's slice.
        p_uncond: dropout probability in [0, 1].
        num_classes: C; the null label is C.
        generator: a generator seeded per step (the uniforms are drawn on its device). It draws ``total`` uniforms (one per image of
            the global batch) and this slice uses its own, so every rank count and every
            micro-batch split drops the same images. The draw happens even for p = 0.
    Returns:
        int64 [b] on y's device.
    """
    import torch

    total = int(y.shape[0]) if total is None else int(total)
    u = torch.rand(total, generator=generator, device=generator.device, dtype=torch.float64)[offset:offset + y.shape[0]]
    return torch.where(u.to(y.device) < float(p_uncond), torch.full_like(y, int(num_classes)), y)


def parse_classes(spec: str, num_classes: int, n: int, option: str = "--class") -> np.ndarray:
    """Per-image labels int64 [n] from ``spec``.

    ``"3"``: every image class 3; ``"0,1,2"``: the list cycled (image k gets list[k mod len]);
    ``"all"``: balanced, image k gets k mod C. Raises ConfigError naming ``option`` for a label
    outside 0..C-1 or text that is none of these.
    """
    text = str(spec).strip().lower()
    if num_classes <= 0:
        raise ConfigError(f"{option} needs a class-conditional model; this checkpoint is unconditional "
                          f"(model.num_classes=0)")
    if text == "all":
        return np.arange(n, dtype=np.int64) % num_classes
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} {spec!r}: expected a class index, a comma-separated list of them, or 'all'")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"{option} {bad[0]}: this model has {num_classes} classes; expected a class in "
                          f"0..{num_classes - 1} (or 'all')")
    return np.asarray(values, dtype=np.int64)[np.arange(n) % len(values)]


def sampling_labels(num_classes: int, class_spec: Optional[str], guidance: Optional[float], n: int,
                    what: str = "this checkpoint") -> tuple[Optional[np.ndarray], Optional[float]]:
    """(labels int64 [n] or None, W or None) for ``ddpm sample --class SPEC --guidance W``.

    An unconditional model (``num_classes`` 0) takes neither option (ConfigError naming them).
    A conditional one defaults to ``--class all`` (balanced) and W = 1 (plain conditional).
    """
    if num_classes <= 0:
        given = [o for o, v in (("--class", class_spec), ("--guidance", guidance)) if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} need a class-conditional model; {what} is unconditional "
                              f"(model.num_classes=0)")
        return None, None
    labels = parse_classes("all" if class_spec is None else class_spec, num_classes, n)
    w = 1.0 if guidance is None else float(guidance)
    if not np.isfinite(w):
        raise ConfigError(f"--guidance {guidance}: expected a finite number (1 = conditional, 0 = unconditional)")
    return labels, w


def guided_call(labels: Optional[np.ndarray], guidance: Optional[float], num_classes: int
                ) -> tuple[Optional[dict], Optional[float]]:
    """(model_kwargs, guidance) for :func:`ddpm.sample` that give eps_u + W (eps_c - eps_u).

    W = 1 needs only the conditional branch and W = 0 only the unconditional one (null labels),
    so both run one network call per step instead of a batched pair: identical in exact
    arithmetic, half the work.
    """
    if labels is None:
        return None, None
    import torch

    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    w = 1.0 if guidance is None else float(guidance)
    if w == 1.0:
        return {"y": y}, None
    if w == 0.0:
        return {"y": torch.full_like(y, int(num_classes))}, None
    return {"y": y}, w


def class_grid(images: np.ndarray, labels: np.ndarray, max_cells: int = 64, max_cols: int = 16
               ) -> tuple[np.ndarray, int]:
    """uint8 [R * cols, H, W, C] cells and ``cols``: one row per class present (ascending), its
    first images in order, blank (white) cells where a class has fewer. At most ``max_cells``
    cells unless there are more classes than that allows one each."""
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    counts = [int((labels == c).sum()) for c in classes]
    cols = max(1, min(max(counts), max_cols, max_cells // len(classes)))
    cells = np.full((len(classes) * cols,) + images.shape[1:], 255, dtype=np.uint8)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:cols]
        cells[r * cols:r * cols + len(idx)] = images[idx]
    return cells, cols
