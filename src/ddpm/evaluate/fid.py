"""FID, Inception Score and KID (paper section 4).

The statistics (Fréchet distance, IS, KID) are computed here in float64 NumPy. The Inception
network is the TF-2015-12-05-compatible Inception v3 port shipped by the optional package
``torch-fidelity`` (``pip install "ddpm[fid]"``); it reads uint8 images [B, 3, H, W] and resizes
them to 299x299 itself. Only that network module is used, so torch-fidelity works even where its
``torchvision`` dependency cannot be imported (e.g. a CPU-only torch build: then install it with
``pip install --no-deps torch-fidelity``). Nothing is ever downloaded: the weights file must be on
disk (see :func:`resolve_inception_weights`).

Protocol (paper section 4): FID and IS on 50,000 samples, FID against the **training** split without
augmentation, IS as the mean ± std over 10 splits. Samples are quantised to uint8 with
:func:`ddpm.images.to_uint8` (clip to [-1, 1], round) before the network sees them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ddpm.errors import DataError, UserError
from ddpm.evaluate.cache import default_cache_dir, load_npz, save_npz
from ddpm.evaluate.shard import rank_seeds, all_gather_objects

try:  # scipy comes with scikit-learn, a core dependency; keep a fallback all the same.
    import scipy.linalg as _scipy_linalg
except ImportError:  # pragma: no cover - exercised by monkeypatching _scipy_linalg in tests
    _scipy_linalg = None

# The exact file torch-fidelity (0.3, 0.4) downloads for its "inception-v3-compat" extractor.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DDPM_INCEPTION_WEIGHTS"
INSTALL_HINT = ('install the optional FID extra: pip install "ddpm[fid]" '
                "(with a CPU-only torch build: pip install --no-deps torch-fidelity)")

# Number of reference features kept in the cache for KID (float32, 2048 dims: 16 MB).
KID_REFERENCE_FEATURES = 2000


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (ddof=1, as TTUR's ``np.cov(rowvar=False)``) of [N, D] features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape [N>=2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) for symmetric PSD S1, S2, via tr(sqrt(S1^1/2 S2 S1^1/2)).

    S1 S2 is similar to the symmetric PSD matrix S1^1/2 S2 S1^1/2, so both have the same
    (non-negative) eigenvalues; working with the symmetric form keeps everything real.
    Tiny negative eigenvalues from round-off are clipped to 0.
    """
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) as TTUR/pytorch-fid compute it (with their 1e-6 offset retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = _scipy_linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = _scipy_linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        return _trace_sqrt_product_eigh(sigma1, sigma2)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            # Numerically broken sqrtm: the symmetric formula is exact in exact arithmetic.
            return _trace_sqrt_product_eigh(sigma1, sigma2)
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^1/2), in float64. Uses ``scipy.linalg.sqrtm``
    (matching TTUR / pytorch-fid) when SciPy is present, else an eigen-decomposition of the
    symmetric similar matrix S1^1/2 S2 S1^1/2.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if _scipy_linalg is not None:
        tr_covmean = _trace_sqrt_product_scipy(s1, s2)
    else:
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def kid(feats_a: np.ndarray, feats_b: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with a polynomial kernel, over random subsets.

    k(x, y) = (gamma·x·y + coef0)^degree with gamma = 1/D by default (Bińkowski et al. 2018;
    torch-fidelity's defaults). Each of ``num_subsets`` subsets draws ``m = min(subset_size,
    N_a, N_b)`` rows of each set without replacement (seeded). Returns (mean, std) over subsets.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need [N, D] features with equal D, got {a.shape} and {b.shape}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for s in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx = (gamma * x @ x.T + coef0) ** degree
        kyy = (gamma * y @ y.T + coef0) ** degree
        kxy = (gamma * x @ y.T + coef0) ** degree
        # Unbiased: drop the diagonal of the within-set kernels.
        vals[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                   + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2.0 * kxy.mean())
    return float(vals.mean()), float(vals.std())


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, kind: str = "auto") -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) ‖ p(y))) as mean ± std over ``splits`` consecutive parts.

    Args:
        logits_or_probs: [N, K] class logits or probabilities.
        splits: number of parts (OpenAI improved-GAN code: 10; the official in-repo monitor: 1).
        kind: "logits", "probs", or "auto" (probabilities if every row is non-negative and sums
            to 1 within 1e-5, else logits).
    Returns:
        (mean, std) over the splits, std with ddof=0 as in the OpenAI code.
    """
    x = np.asarray(logits_or_probs, np.float64)
    if x.ndim != 2:
        raise ValueError(f"need [N, K] logits or probabilities, got {x.shape}")
    if kind == "auto":
        kind = "probs" if (x.min() >= 0 and np.allclose(x.sum(1), 1.0, atol=1e-5)) else "logits"
    if kind == "logits":
        z = x - x.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(logp)
    elif kind == "probs":
        p = x / x.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            logp = np.log(p)
    else:
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in 1..{n}, got {splits}")
    scores = []
    for k in range(splits):
        sl = slice(k * n // splits, (k + 1) * n // splits)
        pk, logpk = p[sl], logp[sl]
        py = pk.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(pk > 0, pk * (logpk - np.log(py)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------

def load_samples(samples: Any) -> np.ndarray:
    """Samples as uint8 [N, H, W, C].

    Accepts a uint8 NHWC array; a float tensor/array [N, C, H, W] in [-1, 1] (quantised with
    :func:`ddpm.images.to_uint8`: clip, round); or a path read by :func:`ddpm.data.read_samples`
    (an ``.npz``/``.npy`` of uint8 images or a folder of PNG/JPEG/WebP images).
    """
    from ddpm.images import to_uint8

    if isinstance(samples, (str, os.PathLike)):
        from ddpm.data import read_samples

        samples = read_samples(str(samples))
    if isinstance(samples, torch.Tensor) and samples.dtype != torch.uint8:
        return to_uint8(samples)
    arr = np.asarray(samples)
    if arr.dtype == np.uint8:
        if arr.ndim == 3:  # [N, H, W] grey
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise DataError(f"samples: expected uint8 [N, H, W, C] with C in (1, 3), got {arr.shape}")
        return arr
    if np.issubdtype(arr.dtype, np.floating) and arr.ndim == 4 and arr.shape[1] in (1, 3):
        return to_uint8(torch.from_numpy(arr))
    raise DataError(f"samples: expected uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1], got {arr.dtype} {arr.shape}")


# ---------------------------------------------------------------------------------------------
# The Inception network (torch-fidelity)
# ---------------------------------------------------------------------------------------------

def _inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 class, importing as little of it as possible.

    ``import torch_fidelity`` imports torchvision (for its other extractors and datasets), which
    fails beside a torch build torchvision was not built for. The Inception module itself only
    needs torch, so if the package import fails we load that module under a bare package stub.
    """
    try:
        mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return mod.FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity" or importlib.util.find_spec("torch_fidelity") is None:
            raise UserError(f"FID/IS/KID need the package torch-fidelity, which is not installed: {INSTALL_HINT}") from None
        broken = e
    except Exception as e:  # torchvision present but broken (e.g. "operator torchvision::nms does not exist")
        broken = e
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID/IS/KID need the package torch-fidelity: {INSTALL_HINT}") from None
    saved = sys.modules.pop("torch_fidelity", None)
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stub
    try:
        sys.modules.pop("torch_fidelity.feature_extractor_inceptionv3", None)
        mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return mod.FeatureExtractorInceptionV3
    except Exception as e:
        raise UserError(f"torch-fidelity is installed but its Inception network cannot be imported "
                        f"({type(broken).__name__}: {broken}; then {type(e).__name__}: {e})") from None
    finally:
        # Do not leave the stub behind as if it were the real package.
        if sys.modules.get("torch_fidelity") is stub:
            del sys.modules["torch_fidelity"]
        if saved is not None:
            sys.modules["torch_fidelity"] = saved


def resolve_inception_weights(inception_weights: str | os.PathLike | None = None) -> Path:
    """Path of the Inception weights file; never downloads.

    Looked up in order: the argument, ``$DDPM_INCEPTION_WEIGHTS``, torch hub's checkpoint cache
    (``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
    torch-fidelity itself stores it). Raises :class:`UserError` naming the URL and where to put it.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    for label, cand in (("inception_weights", inception_weights), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if cand:
            p = Path(cand).expanduser()
            if not p.is_file():
                raise UserError(f"{label}={p}: Inception weights file not found; download {INCEPTION_URL} there")
            return p
    if hub.is_file():
        return hub
    raise UserError(f"Inception weights not found: download {INCEPTION_URL} and put it at {hub} "
                    f"or point ${INCEPTION_ENV} (or --inception-weights) to it")


class InceptionExtractor:
    """uint8 [B, 3, H, W] -> (pool_3 features [B, 2048], unbiased logits [B, 1008]), float32 numpy.

    ``name`` identifies the network in cache keys. The pool features feed FID/KID and the
    logits (without the final bias, as torch-fidelity's ISC) feed the Inception Score.
    """

    name = "inception-v3-compat-2015-12-05"

    def __init__(self, inception_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        cls = _inception_class()
        path = resolve_inception_weights(inception_weights)
        self.device = torch.device(device)
        self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                       feature_extractor_weights_path=str(path)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        pool, logits = self.net(images.to(self.device))
        return pool.float().cpu().numpy(), logits.float().cpu().numpy()


Extractor = Callable[[torch.Tensor], "tuple[np.ndarray, np.ndarray]"]


def extract_features(images_u8: np.ndarray, extractor: Extractor, batch_size: int = 100,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run ``extractor`` over uint8 [N, H, W, C] images in batches -> (pool [N, D], logits [N, K]).

    Grey images (C = 1) are repeated to 3 channels; the extractor gets uint8 [B, 3, H, W].
    """
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, C], got {images_u8.dtype} {images_u8.shape}")
    pools, logits = [], []
    it = range(0, images_u8.shape[0], batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="inception", unit="batch")
    for i in it:
        x = torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch_size])).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        p, l = extractor(x.contiguous())
        pools.append(np.asarray(p, np.float32))
        logits.append(np.asarray(l, np.float32))
    return np.concatenate(pools), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# Reference statistics (cached) and the top-level call
# ---------------------------------------------------------------------------------------------

_SPLITS = ("train", "test", "val", "validation")


def parse_reference(reference: str, split: str | None = None) -> tuple[str, str]:
    """``"SOURCE:SPLIT"`` or ``"SOURCE"`` plus ``split`` (default ``train``, the paper's FID
    reference) -> (source, split)."""
    source, sep, named = str(reference).rpartition(":")
    if sep and source and named in _SPLITS:
        if split is not None and split != named:
            raise UserError(f"reference '{reference}' names split '{named}' but split '{split}' was given")
        return source, named
    return str(reference), split or "train"


def reference_cache_path(cache_dir: Path, source: str, split: str, n: int | None, resolution: int,
                         channels: int, extractor_name: str) -> Path:
    """Cache file for one (source, split, n, resolution, channels, extractor) combination."""
    key = json.dumps([source, split, n, resolution, channels, extractor_name])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(source).name or source}_{split}_{resolution}")[:60]
    return cache_dir / "fid" / f"ref_{slug}_{digest}.npz"


def reference_statistics(reference: str, resolution: int, channels: int, extractor: Extractor, *,
                         split: str | None = None, cache_dir: str | os.PathLike | None = None,
                         n_reference: int | None = None, batch_size: int = 100,
                         progress: bool = False) -> dict[str, Any]:
    """mu [D], sigma [D, D] and up to 2000 features (for KID) of the reference images.

    ``reference`` is a ``.npz`` file holding ``mu`` and ``sigma`` (optionally ``kid_features``),
    or ``"SOURCE:SPLIT"`` / ``"SOURCE"`` with ``split`` (default ``train``) read with
    ``ddpm.data.load_images(source, split, resolution, channels, n=n_reference)`` (no augmentation). The latter is computed once and cached under
    ``cache_dir/fid/`` keyed by (source, split, n, resolution, channels, extractor name).
    """
    ref = Path(str(reference))
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise UserError(f"reference {ref}: statistics file not found")
        z = load_npz(ref)
        if "mu" not in z or "sigma" not in z:
            raise DataError(f"reference {ref}: expected arrays 'mu' and 'sigma', found {sorted(z)}")
        return {"mu": z["mu"], "sigma": z["sigma"], "kid_features": z.get("kid_features"),
                "n": int(z["n"]) if "n" in z else None, "cached": True}
    source, split = parse_reference(reference, split)
    name = getattr(extractor, "name", type(extractor).__name__)
    path = reference_cache_path(default_cache_dir(cache_dir), source, split, n_reference, resolution, channels, name)
    if path.is_file():
        z = load_npz(path)
        return {"mu": z["mu"], "sigma": z["sigma"], "kid_features": z["kid_features"], "n": int(z["n"]),
                "cached": True, "path": str(path)}
    from ddpm.data import load_images

    images = load_images(source, split, resolution, channels, n=n_reference)
    pool, _ = extract_features(images, extractor, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(pool)
    # A fixed, seeded subset for KID so the cache stays small.
    keep = np.sort(np.random.default_rng(0).permutation(len(pool))[:KID_REFERENCE_FEATURES])
    kid_feats = pool[keep].astype(np.float32)
    save_npz(path, mu=mu, sigma=sigma, kid_features=kid_feats, n=np.int64(len(pool)),
             key=np.array(json.dumps({"source": source, "split": split, "n": n_reference,
                                      "resolution": resolution, "channels": channels, "extractor": name})))
    return {"mu": mu, "sigma": sigma, "kid_features": kid_feats, "n": len(pool), "cached": False, "path": str(path)}


def compute_fid(samples: Any, reference: str = "cifar10:train", *, split: str | None = None,
                cache_dir: str | os.PathLike | None = None,
                inception_weights: str | os.PathLike | None = None, batch_size: int = 100,
                device: str | torch.device = "cpu", n_reference: int | None = None,
                extractor: Extractor | None = None, is_splits: int = 10, with_kid: bool = True,
                progress: bool = False) -> dict[str, Any]:
    """FID (and IS, KID) of ``samples`` against ``reference``.

    Args:
        samples: uint8 [N, H, W, C], float [N, C, H, W] in [-1, 1], a ``.npz`` or an image
            folder (see :func:`load_samples`). Floats are quantised to uint8 first.
        reference: a dataset source as ``ddpm.data`` reads it, optionally ``"SOURCE:SPLIT"``
            (statistics computed once and cached), or a stats ``.npz`` (``mu``, ``sigma``).
        split: the reference split when ``reference`` names none (default ``train``: the
            paper's FID is against the training set, paper section 4).
        cache_dir: cache folder (default ``$DDPM_CACHE_DIR`` or ``~/.cache/ddpm``).
        inception_weights: local Inception weights file (else ``$DDPM_INCEPTION_WEIGHTS`` or
            torch hub's cache); never downloaded.
        n_reference: use only the first n reference images (None: the whole split).
        extractor: replaces the Inception network (tests, other feature spaces): a callable
            uint8 [B, 3, H, W] tensor -> (features [B, D], logits [B, K]) with a ``name``.
        is_splits: splits for the Inception Score (10 as in the paper's IS code).
        with_kid: also compute KID against the cached reference feature subset.
    Returns:
        dict with fid, is_mean, is_std, kid_mean, kid_std (None without KID), n_samples,
        n_reference, reference, extractor. Call it on one rank (e.g. after gathering samples).
    """
    images = load_samples(samples)
    if extractor is None:
        extractor = InceptionExtractor(inception_weights, device)
    n, h, w, c = images.shape
    if h != w:
        raise DataError(f"samples: expected square images, got {h}x{w}")
    ref = reference_statistics(reference, h, c, extractor, split=split, cache_dir=cache_dir, n_reference=n_reference,
                               batch_size=batch_size, progress=progress)
    pool, logits = extract_features(images, extractor, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(pool)
    out: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "n_samples": int(n), "n_reference": ref["n"], "reference": str(reference),
        "extractor": getattr(extractor, "name", type(extractor).__name__),
    }
    out["is_mean"], out["is_std"] = inception_score(logits, splits=min(is_splits, n))
    out["kid_mean"] = out["kid_std"] = None
    if with_kid and ref.get("kid_features") is not None:
        out["kid_mean"], out["kid_std"] = kid(pool, ref["kid_features"])
    return out


# ---------------------------------------------------------------------------------------------
# Sample generation, sharded over ranks
# ---------------------------------------------------------------------------------------------

def generate_samples(diffusion, model, n: int, image_shape: Sequence[int], *, seed: int = 0,
                     batch_size: int = 256, device: str | torch.device = "cpu", amp_dtype=None,
                     progress: bool = False, gather: bool = True, rank: int | None = None,
                     world_size: int | None = None, num_classes: int = 0,
                     guidance: float | None = None, resume_at: str | os.PathLike | None = None,
                     identity: dict | None = None, overwrite: bool = False, chunk: int | None = None,
                     log: Callable[[str], Any] = print) -> np.ndarray:
    """Draw ``n`` samples (Algorithm 2) split over ranks; uint8 [N, H, W, C] in seed order.

    Image k uses seed ``seed + k`` whatever the number of ranks (:func:`rank_seeds`), so the set
    is the one a single process draws. ``image_shape`` is (C, H, W). ``rank``/``world_size``
    default to the process group. With ``gather`` (needs a process group when world_size > 1)
    every rank receives all N images; otherwise each rank returns only its shard. A batch that
    runs out of device memory is halved (the same images).

    A class-conditional model (``num_classes`` C > 0) draws balanced classes: image k asks for
    class k mod C (whatever the rank), at classifier-free guidance ``guidance`` (None or 1: the
    plain conditional model).

    ``resume_at``: a path OUT whose ``OUT.parts/`` keeps finished chunks (:mod:`ddpm.chunks`), so
    that a killed run continues where it stopped (``identity``: the arguments the samples belong
    to; ``overwrite``: start again when they differ; ``chunk``: images per chunk). Every rank
    then gets all N images; the caller removes the chunks with :func:`ddpm.chunks.finish` once
    its result is written. Under a process group, rank r draws chunks c mod W == r.
    """
    from ddpm import chunks

    y_all = None if num_classes <= 0 else np.arange(n, dtype=np.int64) % num_classes
    w = None if num_classes <= 0 or guidance is None or guidance == 1 else float(guidance)
    make_all = chunks.sampling_chunks(diffusion, model, tuple(image_shape), seed,
                                      model_kwargs=None if y_all is None else {"y": torch.as_tensor(y_all)},
                                      device=device, amp_dtype=amp_dtype, guidance=w,
                                      progress=progress and resume_at is None)
    if resume_at is not None:
        ident = {"--n": n, "--seed": seed, "--classes": num_classes, "--guidance": w, **(identity or {})}
        return chunks.run_chunked(resume_at, ident, n, make_all, batch_size=batch_size,
                                  chunk=chunk or chunks.DEFAULT_CHUNK, overwrite=overwrite, progress=progress,
                                  log=log, write_out=False, desc="FID samples")["arr_0"]
    seeds = rank_seeds(n, seed, rank, world_size)
    if seeds:
        lo = seeds[0] - seed  # this rank's contiguous block of image indices
        draw = chunks.halving_batches(make_all, batch_size, log)
        local = draw(lo, lo + len(seeds))["arr_0"]
    else:
        c, h, w = image_shape
        local = np.zeros((0, h, w, c), np.uint8)
    if not gather:
        return local
    return np.concatenate(all_gather_objects(local))
