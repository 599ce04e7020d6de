"""Training batches in a resumable, world-size-independent order.

Every rank runs the same :class:`ddpm.data.EpochSampler` over the whole dataset, producing the
same *global* batch of indices (and flip flags) per step, and keeps its own contiguous slice
``[rank·b, (rank+1)·b)`` with ``b = batch_size / world_size``. The sampler's state after the
last consumed batch goes into each checkpoint, so a resumed run sees exactly the batches the
uninterrupted run would have seen.

With ``num_workers > 0`` a ``DataLoader`` decodes batches ahead of time in worker processes. It
is fed by a second sampler that runs ahead; the checkpointed state comes from the first, which
advances exactly once per consumed batch.

With the data on the device (:meth:`BatchSource.put_on_device`, ``train.data_on_device``) the
whole training set is kept there as uint8 [N, H, W, C] once; a step then sends only its
indices and flip bits (asynchronously, from pinned memory) and gathers and flips on the device.
The batches are the same bytes either way.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def _gather(dataset, indices: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, C] for ``indices`` (uses the dataset's batch ``take`` when it has one)."""
    take = getattr(dataset, "take", None)
    if take is not None:
        return take(indices)
    return np.stack([np.asarray(dataset[int(i)]) for i in indices], 0)


class _LocalBatches(Dataset):
    """Map-style view whose 'index' is (indices, flips) of one local batch -> uint8 tensor [n, H, W, C]."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.base = int(getattr(dataset, "skipped", 0))  # the main process's count, copied into workers

    def __len__(self) -> int:  # not used for sampling; DataLoader only needs __getitem__
        return len(self.dataset)

    def __getitem__(self, item) -> tuple[torch.Tensor, int, int]:
        """(uint8 batch, worker id, bad images this worker skipped so far: see BatchSource.skipped_images)."""
        from torch.utils.data import get_worker_info

        from ..data import apply_flips

        indices, flips = item
        batch = torch.from_numpy(np.ascontiguousarray(apply_flips(_gather(self.dataset, indices), flips)))
        info = get_worker_info()
        return batch, (info.id if info is not None else -1), int(getattr(self.dataset, "skipped", 0)) - self.base


class _LocalStream:
    """Infinite iterable of this rank's (indices, flips) from a global-batch sampler."""

    def __init__(self, sampler, lo: int, hi: int):
        self.sampler, self.lo, self.hi = sampler, lo, hi

    def __iter__(self):
        while True:
            indices, flips = self.sampler.next()
            yield np.asarray(indices)[self.lo:self.hi], np.asarray(flips)[self.lo:self.hi]


def _identity(x):
    return x


def _ignore_sigint(worker_id: int) -> None:
    """Decoding workers leave Ctrl-C to the trainer: a terminal sends SIGINT to the whole process
    group, and a worker that died of it would break the trainer's graceful stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchSource:
    """This rank's uint8 [b, H, W, C] batches, one per optimiser step.

    Args:
        dataset: a dataset from :func:`ddpm.data.open_dataset`.
        global_batch: ``train.batch_size``.
        seed: ``train.seed`` (the data order depends on it alone).
        flip: ``data.random_flip``.
        rank, world_size: this process's slice of every global batch.
        num_workers: decoding processes (0: decode in this process, in step).
        pin_memory: for a CUDA device.
        labels: int64 [len(dataset)] class labels (class-conditional runs) or None; after each
            :meth:`next`, ``last_labels`` holds the batch's labels (int64 tensor [b]) or None.
    """

    def __init__(self, dataset, global_batch: int, seed: int, flip: bool, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False, labels: np.ndarray | None = None):
        from ..data import EpochSampler

        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.last_labels: torch.Tensor | None = None
        self.dataset = dataset
        self.local = global_batch // world_size
        self.lo, self.hi = rank * self.local, (rank + 1) * self.local
        self.sampler = EpochSampler(len(dataset), global_batch, seed, flip)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self._make = lambda: EpochSampler(len(dataset), global_batch, seed, flip)
        self._iter = None
        self.images: torch.Tensor | None = None  # uint8 [N, H, W, C] on the device (put_on_device)
        self._worker_skips: dict[int, int] = {}

    def put_on_device(self, device: torch.device) -> int:
        """Decode the whole dataset once into uint8 [N, H, W, C] on ``device``; :meth:`next` then
        gathers there. Returns the bytes it takes."""
        self.images = torch.from_numpy(np.ascontiguousarray(_gather(self.dataset, np.arange(len(self.dataset)))))
        self.images = self.images.to(device)
        self._iter = None
        return self.images.numel() * self.images.element_size()

    @property
    def skipped_images(self) -> int:
        """Bad images skipped so far (``data.skip_bad_images``), in this process and its workers."""
        return int(getattr(self.dataset, "skipped", 0)) + sum(self._worker_skips.values())

    def _fingerprint(self) -> dict:
        """What identifies the data beyond its length: a prepared array's recorded sha256."""
        meta = getattr(self.dataset, "meta", None)
        sha = meta.get("sha256") if isinstance(meta, dict) else None
        return {"data_sha256": str(sha), "data_count": len(self.dataset)} if sha else {}

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        now = self._fingerprint()
        if isinstance(state, dict) and "data_sha256" in state and now and (
                state["data_sha256"], state.get("data_count")) != (now["data_sha256"], now["data_count"]):
            from ..errors import DataError

            src = getattr(self.dataset, "source", "the data")
            raise DataError(f"--data {src}: the prepared array changed since the checkpoint was written ("
                            f"{state.get('data_count')} images, sha256 {str(state['data_sha256'])[:12]} there; "
                            f"{now['data_count']} images, sha256 {now['data_sha256'][:12]} now); resume with the "
                            f"data the run was trained on, or start a new run with another --out")
        self.sampler.load_state_dict(state)
        self._iter = None

    def _start_workers(self) -> None:
        feed = self._make()
        feed.load_state_dict(self.sampler.state_dict())
        loader = DataLoader(_LocalBatches(self.dataset), sampler=_LocalStream(feed, self.lo, self.hi),
                            batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, prefetch_factor=4, worker_init_fn=_ignore_sigint,
                            # Worker seeds from a private generator: drawing them from the global
                            # RNG would shift dropout's stream (and break exact resume).
                            generator=torch.Generator().manual_seed(0))
        self._iter = iter(loader)

    def next(self) -> torch.Tensor:
        """uint8 tensor [b, H, W, C] of this rank's part of the next global batch (on the device
        after :meth:`put_on_device`, else on the CPU)."""
        if self.images is not None:
            indices, flips = self.sampler.next()
            idx, fl = np.asarray(indices)[self.lo:self.hi], np.asarray(flips)[self.lo:self.hi]
            self._note_labels(idx)
            dev = self.images.device
            i = to_device_async(torch.from_numpy(np.ascontiguousarray(idx)), dev)
            f = to_device_async(torch.from_numpy(np.ascontiguousarray(fl)), dev)
            x = self.images.index_select(0, i)
            return torch.where(f[:, None, None, None], x.flip(2), x)  # left-right: the W axis
        if self.num_workers == 0:
            from ..data import apply_flips

            before = self.sampler.state_dict()
            indices, flips = self.sampler.next()
            idx, fl = np.asarray(indices)[self.lo:self.hi], np.asarray(flips)[self.lo:self.hi]
            try:
                images = _gather(self.dataset, idx)
            except BaseException:  # e.g. a file deleted under the run: the batch stays unconsumed
                self.sampler.load_state_dict(before)
                raise
            self._note_labels(idx)
            return torch.from_numpy(np.ascontiguousarray(apply_flips(images, fl)))
        if self._iter is None:
            self._start_workers()
        batch, worker, skips = next(self._iter)
        self._worker_skips[worker] = skips
        indices, _ = self.sampler.next()  # the checkpointed position follows consumption, not prefetch
        self._note_labels(np.asarray(indices)[self.lo:self.hi])  # the consumed batch's own indices
        return batch

    def _note_labels(self, idx: np.ndarray) -> None:
        self.last_labels = None if self.labels is None else torch.from_numpy(self.labels[idx])

    def close(self) -> None:
        self._iter = None


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory with
    ``non_blocking=True``, so the host does not wait for the device's queue to drain (a copy
    from pageable memory would)."""
    if x.device == device or device.type == "cpu":
        return x.to(device)
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def data_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """``train.data_on_device=auto``: on CUDA when the uint8 images take <= 2 GiB and <= 10% of
    the device's memory (room for the model, its activations and the optimiser); never on the
    CPU, where the images are in host memory already."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return nbytes <= min(2 << 30, total // 10)
