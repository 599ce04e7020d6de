"""Exact bits/dim of a dataset: the full variational bound, all T terms (paper Eq. 5, Table 1).

For every image the bound is one Monte-Carlo sample of x_t per timestep, T network calls:
total = L_T (prior) + Σ_{i>=1} L_i (KL terms) + L_0 (discretized decoder), in bits/dim
(:meth:`GaussianDiffusion.calc_bpd_loop`). Image k draws its noise from seed ``seed + k``, so
its result depends neither on the batch size nor on the number of ranks. Evaluating the EMA
weights (as the paper does) is the caller's business: pass the EMA model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.evaluate.shard import all_gather_objects, dist_info, shard_indices


@dataclass
class NLLResult:
    """Bits/dim of a set of N images under a T-step model.

    Attributes:
        n: number of images.
        total_bpd: mean over images of the total bound (the reported NLL, "≤ 3.75").
        total_bpd_stderr: std(per-image totals, ddof=1) / sqrt(n) (NaN when n < 2).
        prior_bpd: mean L_T = KL(q(x_T|x0) ‖ N(0, I)).
        decoder_bpd: mean L_0 = -log p(x0|x1) (``terms[:, 0]``), the "distortion" codelength.
        rate_bpd: prior_bpd + Σ_{i>=1} mean terms[i], so total = rate + decoder.
        per_image_total_bpd: float64 [N], in the input order.
        terms_bpd: float64 [T], mean over images of term i (i = paper's t - 1).
        mse: float64 [T], mean over images of meanflat((x̂0 - x0)²) on the [-1, 1] scale, x̂0
            predicted from x_{i+1} (clipped when ``clip_denoised``).
        meta: settings of the run (seed, clip_denoised, ...).
    """

    n: int
    total_bpd: float
    total_bpd_stderr: float
    prior_bpd: float
    decoder_bpd: float
    rate_bpd: float
    per_image_total_bpd: np.ndarray
    terms_bpd: np.ndarray
    mse: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_timesteps(self) -> int:
        return int(self.terms_bpd.shape[0])

    def summary(self) -> dict[str, Any]:
        """The scalar numbers only."""
        def f(x):
            return None if x is None or not math.isfinite(x) else float(x)
        return {"n": self.n, "num_timesteps": self.num_timesteps, "total_bpd": f(self.total_bpd),
                "total_bpd_stderr": f(self.total_bpd_stderr), "prior_bpd": f(self.prior_bpd),
                "decoder_bpd": f(self.decoder_bpd), "rate_bpd": f(self.rate_bpd)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: the summary, ``meta``, and the arrays as lists."""
        d = self.summary()
        d["meta"] = dict(self.meta)
        d["terms_bpd"] = [float(v) for v in self.terms_bpd]
        d["mse"] = [float(v) for v in self.mse]
        d["per_image_total_bpd"] = [float(v) for v in self.per_image_total_bpd]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path`` atomically (folders created)."""
        from ddpm.atomic import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NLLResult":
        nan = float("nan")
        return cls(n=int(d["n"]), total_bpd=float(d["total_bpd"]),
                   total_bpd_stderr=nan if d.get("total_bpd_stderr") is None else float(d["total_bpd_stderr"]),
                   prior_bpd=float(d["prior_bpd"]), decoder_bpd=float(d["decoder_bpd"]),
                   rate_bpd=float(d["rate_bpd"]),
                   per_image_total_bpd=np.asarray(d.get("per_image_total_bpd", []), np.float64),
                   terms_bpd=np.asarray(d["terms_bpd"], np.float64), mse=np.asarray(d["mse"], np.float64),
                   meta=dict(d.get("meta", {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NLLResult":
        """Read a file written by :meth:`save`."""
        from ddpm.errors import DataError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a bits/dim result file ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off during evaluation (the official eval uses dropout 0); restore afterwards."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _np64(x) -> np.ndarray:
    return torch.as_tensor(x).detach().double().cpu().numpy()


def nll_shard(model, diffusion, images_u8: np.ndarray, *, rank: int = 0, world_size: int = 1,
              batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu",
              clip_denoised: bool = True, amp_dtype: torch.dtype | None = None,
              progress: bool = False, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Bits/dim of this rank's contiguous shard of ``images_u8`` (uint8 [N, H, W, C]); ``labels``
    (int64 [N], class-conditional models) are passed to the network as ``y``.

    Returns a dict: ``indices`` int64 [n_r] (global), per-image ``total``, ``prior``,
    ``decoder`` float64 [n_r], and ``terms_sum``, ``mse_sum`` float64 [T] (sums over the shard).
    """
    from ddpm.images import to_model

    idx = shard_indices(len(images_u8), rank, world_size)
    totals, priors, decoders = [], [], []
    terms_sum = mse_sum = None
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"bits/dim (rank {rank})", unit="batch")
    with _eval_mode(model), torch.no_grad():
        for s in starts:
            b = idx[s:s + batch_size]
            x0 = to_model(images_u8[b], device=device)
            kw = None if labels is None else {"y": torch.as_tensor(np.asarray(labels)[b], device=device)}
            out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip_denoised,
                                          seeds=[int(seed) + int(k) for k in b], progress=False,
                                          amp_dtype=amp_dtype, model_kwargs=kw)
            terms, mse = _np64(out["terms_bpd"]), _np64(out["mse"])
            totals.append(_np64(out["total_bpd"]))
            priors.append(_np64(out["prior_bpd"]))
            decoders.append(terms[:, 0])
            terms_sum = terms.sum(0) if terms_sum is None else terms_sum + terms.sum(0)
            mse_sum = mse.sum(0) if mse_sum is None else mse_sum + mse.sum(0)
    empty = np.zeros(0, np.float64)
    return {"indices": idx, "total": np.concatenate(totals) if totals else empty,
            "prior": np.concatenate(priors) if priors else empty,
            "decoder": np.concatenate(decoders) if decoders else empty,
            "terms_sum": terms_sum, "mse_sum": mse_sum}


def merge_shards(shards: list[dict[str, Any]], meta: dict | None = None) -> NLLResult:
    """Combine :func:`nll_shard` outputs (any order) into one :class:`NLLResult` in global order."""
    idx = np.concatenate([s["indices"] for s in shards])
    n = idx.size
    if n == 0:
        raise ValueError("no images were evaluated")
    if not np.array_equal(np.sort(idx), np.arange(n)):
        raise ValueError("shards do not cover the indices 0..N-1 exactly once")
    order = np.argsort(idx, kind="stable")
    total = np.concatenate([s["total"] for s in shards])[order]
    prior = np.concatenate([s["prior"] for s in shards])[order]
    terms = sum(s["terms_sum"] for s in shards if s["terms_sum"] is not None) / n
    mse = sum(s["mse_sum"] for s in shards if s["mse_sum"] is not None) / n
    prior_mean = float(prior.mean())
    return NLLResult(
        n=n,
        total_bpd=float(total.mean()),
        total_bpd_stderr=float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        prior_bpd=prior_mean,
        decoder_bpd=float(terms[0]),
        rate_bpd=prior_mean + float(terms[1:].sum()),
        per_image_total_bpd=total,
        terms_bpd=np.asarray(terms, np.float64),
        mse=np.asarray(mse, np.float64),
        meta=dict(meta or {}),
    )


def evaluate_nll(model, diffusion, images_u8: np.ndarray, *, batch_size: int = 64, seed: int = 0,
                 device: str | torch.device = "cpu", clip_denoised: bool = True,
                 amp_dtype: torch.dtype | None = None, progress: bool = True,
                 labels: np.ndarray | None = None) -> NLLResult:
    """Bits/dim of every image in ``images_u8`` (uint8 [N, H, W, C]) with all T VLB terms.

    Args:
        model: callable ``model(x [B, C, H, W], t int64 [B]) -> out``; put in eval mode while
            running. Pass the EMA weights to reproduce the paper.
        diffusion: a ``GaussianDiffusion`` (its ``calc_bpd_loop`` does the work).
        batch_size: images per forward pass (results do not depend on it).
        seed: image k (global index) draws its noise from seed ``seed + k``.
        clip_denoised: clip x̂0 to [-1, 1] (the official evaluation does; paper section 4.2, Table 1).
        amp_dtype: e.g. ``torch.bfloat16`` to run the network under autocast (the VLB math
            stays in float32).
        labels: int64 [N] class labels for a class-conditional model: the result is then the
            class-conditional bits/dim -log2 p(x | y) / D.
    Returns:
        :class:`NLLResult`. With ``torch.distributed`` initialised, each rank evaluates a
        contiguous shard and every rank receives the merged result in the original order.
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images_u8.dtype} {images_u8.shape}")
    rank, world = dist_info()
    shard = nll_shard(model, diffusion, images_u8, rank=rank, world_size=world, batch_size=batch_size, seed=seed,
                      device=device, clip_denoised=clip_denoised, amp_dtype=amp_dtype,
                      progress=progress and rank == 0, labels=labels)
    shards = all_gather_objects(shard)
    meta = {"seed": int(seed), "clip_denoised": bool(clip_denoised), "world_size": world,
            "class_conditional": labels is not None,
            "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", "")}
    return merge_shards(shards, meta)
