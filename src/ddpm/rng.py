"""Per-image random streams, so that image k is the same whatever the batch size.

Every image owns a ``torch.Generator`` seeded with its own seed. Each call to
:meth:`ImageNoise.next` returns the next standard-normal draw of shape [C, H, W] for every
image, stacked into [B, C, H, W]. To keep Python work out of the per-step loop, each generator
draws ``chunk`` steps at once; ``chunk`` depends only on the image size (never on the batch
size), so the stream of image k is a pure function of (seed_k, image shape, device type).
"""

from __future__ import annotations

from typing import Sequence

import torch

# Elements per image drawn in one call. Changing this changes every seeded stream: do not.
_CHUNK_ELEMENTS = 1 << 16
_MAX_CHUNK = 64


def chunk_steps(shape: Sequence[int]) -> int:
    """How many per-image draws of ``shape`` are generated per generator call."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(numel, 1)))


class ImageNoise:
    """Independent N(0, I) streams, one per image.

    Args:
        seeds: one integer seed per image, length B.
        shape: per-image shape, e.g. (C, H, W).
        device: where the generators live and the noise is produced.
        dtype: dtype of the returned noise (drawn in float32, then cast).
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("ImageNoise needs at least one seed")
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk = chunk_steps(self.shape)
        self._gens = []
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(s)
            self._gens.append(g)
        self._buf: torch.Tensor | None = None  # [B, chunk, *shape]
        self._pos = self.chunk

    def __len__(self) -> int:
        return len(self.seeds)

    def _refill(self) -> None:
        draws = [torch.randn((self.chunk, *self.shape), generator=g, device=self.device) for g in self._gens]
        self._buf = torch.stack(draws, 0)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """The next draw for every image: [B, *shape]."""
        if self._pos >= self.chunk:
            self._refill()
        out = self._buf[:, self._pos]
        self._pos += 1
        return out.to(self.dtype)
