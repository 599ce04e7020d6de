"""Offline sample quality for the embedded 8x8 digits, where Inception cannot judge.

A small MLP classifier (64 -> 128 -> 64 -> 10, ReLU) is trained, seeded, on the real digits
TRAIN split (a few seconds on CPU) and cached as an ``.npz`` (no pickle) keyed by
:data:`CLASSIFIER_VERSION` and a hash of the training data. Its 64-unit penultimate layer plays
the role of Inception's pool_3 features:

- ``fd``: Fréchet distance between those features of the samples and of the real TEST split
  (the "FID" of this feature space). It is biased upwards for small sample sets, like FID:
  compare numbers computed from similar sample counts (see :func:`digits_reference`).
- ``confidence``: mean max class probability. The classifier is trained with outlier exposure
  (noise, sparse and constant images pushed to the uniform prediction), so non-digits score
  near 0.1 instead of an MLP's usual over-confidence.
- ``class_histogram`` (10 counts of the argmax class), ``class_entropy`` (bits, at most
  log2(10)) and ``balance`` = entropy / log2(10) in [0, 1]: mode coverage.
- for labelled samples (a class-conditional model's, requested class y per image):
  ``agreement``, the fraction whose argmax class is y, overall and per requested class
  (``agreement_per_class``): how well the model follows its label (classifier-free guidance
  trades it against diversity, i.e. the Fréchet distance).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np
import torch

from ddpm.errors import DataError
from ddpm.evaluate.cache import default_cache_dir, load_npz, save_npz
from ddpm.evaluate.fid import feature_statistics, frechet_distance, load_samples

# Change whenever the architecture, training recipe or features change: old caches are then ignored.
CLASSIFIER_VERSION = "digits-mlp-v1"
HIDDEN = (128, 64)
EPOCHS = 60
BATCH = 100
LR = 3e-3
WEIGHT_DECAY = 1e-4
OUTLIER_WEIGHT = 1.0
SEED = 0
NUM_CLASSES = 10


def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from ddpm.data import digits_labels, load_images

    return load_images("digits", split, 8, 1), np.asarray(digits_labels(split), np.int64)


def _flat(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, 1] -> float64 [N, 64] in [0, 1]."""
    return images_u8.reshape(images_u8.shape[0], -1).astype(np.float64) / 255.0


def _data_hash(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _outliers(g: torch.Generator, n: int) -> torch.Tensor:
    """Non-digit inputs in [0, 1]^64: uniform noise, sparse noise, constant images (a third each on average)."""
    kind = torch.randint(0, 3, (n, 1), generator=g)
    uniform = torch.rand(n, 64, generator=g)
    sparse = (torch.rand(n, 64, generator=g) < 0.3).float() * torch.rand(n, 64, generator=g)
    const = torch.rand(n, 1, generator=g).expand(n, 64)
    return torch.where(kind == 0, uniform, torch.where(kind == 1, sparse, const))


def _fit(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(SEED)
    dims = (64, *HIDDEN, NUM_CLASSES)
    layers: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        bound = 1.0 / math.sqrt(dims[i])  # PyTorch's default init range, drawn from our generator
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), BATCH):
            b = perm[s:s + BATCH]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            loss = loss - OUTLIER_WEIGHT * torch.log_softmax(net(_outliers(g, len(b))), 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def train_classifier(images_u8: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Train the MLP (seeded, single thread, so it is the same on every run) -> float32 weights.

    Loss per mini-batch: cross-entropy on the digits + OUTLIER_WEIGHT x cross-entropy to the
    uniform distribution on as many generated non-digit images (outlier exposure).
    """
    x = torch.tensor(_flat(images_u8), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # fork_rng: building nn.Linear draws from the global generator; leave the caller's state alone.
        with torch.random.fork_rng(devices=[]):
            net = _fit(x, y)
    finally:
        torch.set_num_threads(threads)
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    out = {}
    for i, lin in enumerate(lins):
        out[f"w{i}"] = lin.weight.detach().numpy().T.copy()  # [in, out]
        out[f"b{i}"] = lin.bias.detach().numpy().copy()
    return out


def _forward(weights: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, 64] -> (penultimate features [N, 64], class probabilities [N, 10])."""
    n_layers = len(HIDDEN) + 1
    h = x
    for i in range(n_layers - 1):
        h = np.maximum(h @ weights[f"w{i}"].astype(np.float64) + weights[f"b{i}"], 0.0)
    logits = h @ weights[f"w{n_layers - 1}"].astype(np.float64) + weights[f"b{n_layers - 1}"]
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    return h, p / p.sum(1, keepdims=True)


def load_classifier(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The cached classifier (trained and cached on first use) with the TEST-split statistics.

    Returns a dict of arrays: ``w0, b0, ...`` (weights), ``test_mu`` [64], ``test_sigma``
    [64, 64], ``test_accuracy``, ``train_accuracy``, ``version``, ``data_sha256``, plus
    ``trained`` (True when this call trained it) and ``path``.
    """
    path = default_cache_dir(cache_dir) / "digits" / f"classifier_{CLASSIFIER_VERSION}.npz"
    train_x, train_y = _load_split("train")
    sha = _data_hash(train_x, train_y)
    if path.is_file():
        try:
            z = load_npz(path)
            if str(z["version"]) == CLASSIFIER_VERSION and str(z["data_sha256"]) == sha:
                z["trained"], z["path"] = False, str(path)
                return z
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: retrain and overwrite
    weights = train_classifier(train_x, train_y)
    test_x, test_y = _load_split("test")
    feats, probs = _forward(weights, _flat(test_x))
    _, train_probs = _forward(weights, _flat(train_x))
    mu, sigma = feature_statistics(feats)
    z = dict(weights, test_mu=mu, test_sigma=sigma,
             test_accuracy=np.float64((probs.argmax(1) == test_y).mean()),
             train_accuracy=np.float64((train_probs.argmax(1) == train_y).mean()),
             version=np.array(CLASSIFIER_VERSION), data_sha256=np.array(sha))
    save_npz(path, **z)
    z["trained"], z["path"] = True, str(path)
    return z


def shrink_enlarged(u8: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R, C] samples of a model trained on the digits enlarged to R (a multiple of 8)
    -> uint8 [N, 8, 8, C]: the least-squares inverse of the enlargement (the 8x8 image whose
    bilinear enlargement, as :mod:`ddpm.datasets.digits` makes it, is closest to the sample).

    A plain block mean is no inverse: the real digits enlarged to 32x32 and box-shrunk score a
    Fréchet distance of ~28 against ~2.1 unresized, this inverse gives the originals back within
    one grey level (the operator's condition number is ~3 at 32x32)."""
    n, r = u8.shape[0], u8.shape[1]
    if r == 8:
        return u8
    if r % 8 or u8.shape[2] != r:
        raise DataError(f"digits quality shrinks square samples of a multiple of 8 pixels, got {u8.shape[1:3]}")
    from PIL import Image

    A = np.empty((r * r, 64))
    for j in range(64):  # the enlargement is linear: its matrix, column by column
        e = np.zeros((8, 8), np.float32)
        e.flat[j] = 1.0
        A[:, j] = np.asarray(Image.fromarray(e).resize((r, r), Image.BILINEAR), np.float64).ravel()
    pinv = np.linalg.pinv(A)
    x = u8.astype(np.float64).transpose(0, 3, 1, 2).reshape(-1, r * r) @ pinv.T
    out = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(n, u8.shape[3], 8, 8)
    return out.transpose(0, 2, 3, 1)


def _as_digits(samples: Any) -> np.ndarray:
    u8 = load_samples(samples)
    if u8.shape[1:3] != (8, 8):
        raise DataError(f"digits quality needs 8x8 samples, got {u8.shape[1]}x{u8.shape[2]} "
                        "(sample a model trained on the digits at resolution 8)")
    if u8.shape[3] == 3:  # digits trained with channels=3 hold the grey value in R, G and B
        u8 = np.round(u8.astype(np.float64).mean(axis=3, keepdims=True)).astype(np.uint8)
    return u8


def digits_quality(samples: Any, cache_dir: str | os.PathLike | None = None,
                   labels: np.ndarray | None = None) -> dict[str, Any]:
    """Quality of 8x8 digit samples.

    Args:
        samples: uint8 [N, 8, 8, 1] (or C = 3 grey), float [N, C, 8, 8] in [-1, 1], a ``.npz``
            or an image folder (see :func:`ddpm.evaluate.fid.load_samples`). N >= 2.
        cache_dir: where the classifier is cached (default ``$DDPM_CACHE_DIR`` or ``~/.cache/ddpm``).
        labels: int64 [N] requested classes 0..9 of labelled samples, or None.
    Returns:
        dict with ``fd`` (Fréchet distance to the real TEST split in the classifier's feature
        space), ``confidence`` (mean max probability), ``class_histogram`` (10 ints),
        ``class_entropy`` (bits), ``balance`` (entropy / log2 10), ``n``; with ``labels`` also
        ``agreement`` (fraction classified as their requested class) and
        ``agreement_per_class`` (10 entries, None for a class with no samples).
    """
    u8 = _as_digits(samples)
    if u8.shape[0] < 2:
        raise DataError(f"digits quality needs at least 2 samples, got {u8.shape[0]}")
    if labels is not None:
        from ddpm.conditioning import check_labels

        labels = check_labels(labels, NUM_CLASSES, "digits quality sample labels")
        if len(labels) != u8.shape[0]:
            raise DataError(f"digits quality: {len(labels)} labels for {u8.shape[0]} samples; expected one per sample")
    clf = load_classifier(cache_dir)
    feats, probs = _forward(clf, _flat(u8))
    mu, sigma = feature_statistics(feats)
    hist = np.bincount(probs.argmax(1), minlength=NUM_CLASSES)
    freq = hist / hist.sum()
    entropy = float(-(freq[freq > 0] * np.log2(freq[freq > 0])).sum())
    out = {
        "fd": frechet_distance(mu, sigma, clf["test_mu"], clf["test_sigma"]),
        "confidence": float(probs.max(1).mean()),
        "class_histogram": [int(c) for c in hist],
        "class_entropy": entropy,
        "balance": entropy / math.log2(NUM_CLASSES),
        "n": int(u8.shape[0]),
    }
    if labels is not None:
        hit = probs.argmax(1) == labels
        out["agreement"] = float(hit.mean())
        out["agreement_per_class"] = [float(hit[labels == c].mean()) if (labels == c).any() else None
                                      for c in range(NUM_CLASSES)]
    return out


def digits_reference(cache_dir: str | os.PathLike | None = None, n_noise: int = 1000) -> dict[str, Any]:
    """Reference points for reading :func:`digits_quality` numbers.

    Returns a dict: ``test_accuracy`` / ``train_accuracy`` of the classifier; ``train_vs_test``
    (the real TRAIN split, 1,500 images, scored like samples: what a perfect model would get);
    ``test_vs_test`` (the TEST split against itself: fd 0 by construction, confidence and
    balance of real digits); ``noise_vs_test`` (``n_noise`` uniform-noise images, seed 0: what a
    useless model gets).
    """
    clf = load_classifier(cache_dir)
    train_x, _ = _load_split("train")
    test_x, _ = _load_split("test")
    noise = np.random.default_rng(0).integers(0, 256, size=(n_noise, 8, 8, 1), dtype=np.uint8)
    return {
        "classifier_version": CLASSIFIER_VERSION,
        "test_accuracy": float(clf["test_accuracy"]),
        "train_accuracy": float(clf["train_accuracy"]),
        "train_vs_test": digits_quality(train_x, cache_dir),
        "test_vs_test": digits_quality(test_x, cache_dir),
        "noise_vs_test": digits_quality(noise, cache_dir),
    }
