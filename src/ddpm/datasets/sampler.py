"""Deterministic, resumable order of training images and their random flips.

The official code repeats and shuffles the training set and flips each image left-right with
probability 0.5 (paper section 3.3 and Appendix B). Here every epoch ``e`` is one permutation of 0..N-1 drawn
from ``numpy.random.default_rng([seed, e])``; from the same generator, right after the
permutation, come the flip bits (``random(N) < 0.5``: one per position of the epoch). Global
batches are consecutive slices of the concatenated epochs, so a batch may span two epochs and
the stream depends only on (N, global batch, seed, flip), never on the number of processes.
``state_dict()`` = {"epoch", "position"} is where the next batch starts; loading it into a
fresh sampler continues with exactly the batches the original would have produced.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class EpochSampler:
    """Infinite stream of (indices int64 [global_batch], flips bool [global_batch])."""

    def __init__(self, num_items: int, global_batch: int, seed: int, flip: bool):
        self.num_items = _positive_int(num_items, "num_items")
        self.global_batch = _positive_int(global_batch, "global_batch")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.flip = bool(flip)
        self.epoch = 0
        self.position = 0
        self._cached = (-1, None, None)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation int64 [N], flips bool [N]) of ``epoch``; a pure function of (seed, epoch)."""
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            perm = rng.permutation(self.num_items).astype(np.int64)
            flips = rng.random(self.num_items) < 0.5 if self.flip else np.zeros(self.num_items, dtype=bool)
            self._cached = (epoch, perm, flips)
        return self._cached[1], self._cached[2]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch: indices int64 [global_batch] and flips bool [global_batch]."""
        idx, flp = [], []
        need = self.global_batch
        while need > 0:
            perm, flips = self.epoch_order(self.epoch)
            take = min(need, self.num_items - self.position)
            idx.append(perm[self.position:self.position + take])
            flp.append(flips[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(idx), np.concatenate(flp)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """JSON-able position of the stream: {"epoch": int, "position": int}."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a sampler with the same arguments."""
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise DataError(f"sampler state {state!r} lacks 'epoch'/'position'; expected a dict from "
                            f"EpochSampler.state_dict()") from None
        for name, v in (("epoch", epoch), ("position", position)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise DataError(f"sampler state '{name}' is {v!r}; expected a non-negative integer")
        if position > self.num_items:
            raise DataError(f"sampler state position {position} is beyond the dataset size {self.num_items}; "
                            f"expected the same dataset as when the state was saved")
        self.epoch, self.position = int(epoch), int(position)
        if self.position == self.num_items:
            self.epoch, self.position = self.epoch + 1, 0


def apply_flips(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Flip image k of uint8 [B, H, W, C] left-right where ``flips[k]``; returns a new array."""
    images = np.asarray(images)
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    if images.ndim != 4 or flips.shape[0] != images.shape[0]:
        raise ValueError(f"expected images [B, H, W, C] and flips [B], got {images.shape} and {flips.shape}")
    out = images.copy()
    out[flips] = images[flips][:, :, ::-1]
    return out
