"""Split evaluation work over ``torch.distributed`` ranks and gather the results in order.

Every evaluation that runs on many images (bits/dim, FID samples) gives rank ``r`` of ``W``
a contiguous block of the global indices 0..N-1 and ties all randomness of image ``k`` to
``seed + k``. The result of image ``k`` then depends neither on the number of ranks nor on the
batch size, and gathering the blocks in rank order restores the original order.
Without an initialised process group everything runs as rank 0 of 1.
"""

from __future__ import annotations

import numpy as np

from ddpm.distributed import all_gather_object as all_gather_objects  # noqa: F401 (the shared helper)
from ddpm.distributed import dist_info


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Global indices (int64) handled by ``rank``: a contiguous block; block sizes differ by <= 1.

    Rank r gets ``[r*n//W, (r+1)*n//W)``, so concatenating the blocks of ranks 0..W-1 gives
    ``arange(n)`` exactly once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return np.arange(lo, hi, dtype=np.int64)


def rank_seeds(n: int, seed: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Per-image seeds ``seed + k`` for the global indices k of this rank's shard of ``n`` images.

    ``rank``/``world_size`` default to the current process group (rank 0 of 1 without one).
    Used to generate FID samples on several ranks: the union over ranks is ``seed + 0..n-1``,
    the same images a single process would draw.
    """
    if rank is None or world_size is None:
        r, w = dist_info()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    return [int(seed) + int(k) for k in shard_indices(n, rank, world_size)]
