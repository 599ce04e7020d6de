"""Resumable sample generation: finished chunks on disk, assembled into one file at the end.

A long sampling job (``ddpm sample --n 50000``, the samples of ``ddpm eval fid --ckpt``) writes
every finished *chunk* (a fixed range of image indices ``[c*size, (c+1)*size)``) into a folder
beside its output, ``OUT.parts/``:

    OUT.parts/manifest.json       the arguments the chunks belong to (checkpoint digest, sampler,
                                  steps, seed, n, classes, precision, ...) and the chunk size
    OUT.parts/chunk_000003.npz    the arrays of images 3*size .. 4*size-1 and their sha256

Each chunk file is written atomically (:mod:`ddpm.atomic`) and carries the digest of its
arrays, so after ``kill -9``, SIGINT or SIGTERM the same command finds every finished chunk,
recomputes only the missing or damaged ones and assembles the same arrays an uninterrupted run
writes: image k depends only on its seed (:class:`ddpm.rng.ImageNoise`), never on the batch,
the chunk or the process that drew it. Then OUT is written and ``OUT.parts`` removed.

A different command on the same output (another checkpoint, sampler, seed, ...) is refused in
one line naming the first differing argument (:class:`ArgumentsChanged`), unless
``overwrite``. Under ``torchrun`` rank r of W draws chunks c with c mod W == r; the chunks do
not depend on W, so any number of ranks continues the same job. On CUDA a batch that runs out of
memory is halved and the chunk redrawn (:func:`halving_batches`): the images do not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .atomic import atomic_write_json, atomic_write_npz, remove_stale_temps
from .errors import UserError

PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"
DIGEST_KEY = "__sha256__"
DEFAULT_CHUNK = 1000
FORMAT = "ddpm-sample-chunks/1"

Log = Callable[[str], Any]
MakeChunk = Callable[[int, int, int], Mapping[str, np.ndarray]]


class ArgumentsChanged(UserError):
    """``OUT.parts`` holds unfinished work of a different command."""


def parts_dir(out: str | Path) -> Path:
    """The chunk folder of output ``out``: ``OUT.parts`` beside it."""
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def chunk_path(parts: Path, c: int) -> Path:
    return parts / f"chunk_{c:06d}.npz"


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes (names sorted)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_chunk(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """One chunk file, atomically, with the digest of its arrays under ``__sha256__``."""
    atomic_write_npz(path, **arrays, **{DIGEST_KEY: np.array(array_digest(arrays))})


def read_chunk(path: Path, rows: int) -> dict[str, np.ndarray] | None:
    """The arrays of a chunk file, or None when it is missing, unreadable, has another number of
    rows than ``rows`` or fails its digest (a damaged file: the chunk is drawn again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # missing, truncated, not a zip (zipfile.BadZipFile), bad header: draw it again
        return None
    digest = arrays.pop(DIGEST_KEY, None)
    if digest is None or str(digest) != array_digest(arrays):
        return None
    if not arrays or any(a.shape[:1] != (rows,) for a in arrays.values()):
        return None
    return arrays


@dataclass(frozen=True)
class ChunkPlan:
    """``n`` images in chunks of ``size``: chunk c holds indices [c*size, min((c+1)*size, n))."""

    n: int
    size: int

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.size, min((c + 1) * self.size, self.n)

    def mine(self, rank: int, world_size: int) -> list[int]:
        """The chunks of ``rank``: c mod world_size == rank (independent of what is done)."""
        return list(range(rank, len(self), world_size))


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    for k in list(new) + [k for k in old if k not in new]:
        if old.get(k) != new.get(k):
            return f"{k} {_show(old.get(k))} there, {_show(new.get(k))} here"
    return None


def _show(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a digest
    return json.dumps(v) if not isinstance(v, str) else v


def open_parts(out: Path, identity: Mapping[str, Any], n: int, chunk: int, *, overwrite: bool,
               log: Log) -> ChunkPlan:
    """Create or check ``OUT.parts`` (rank 0 only); the plan of the job.

    ``identity``: the arguments the images depend on, keyed by option name (``--steps``: 20).
    An existing folder of the same arguments is continued with its own chunk size; of other
    arguments it raises :class:`ArgumentsChanged`, or with ``overwrite`` is removed first.
    """
    parts = parts_dir(out)
    ident = json.loads(json.dumps(dict(identity)))  # what JSON gives back, for comparison
    man = parts / MANIFEST
    if parts.is_dir() and not man.is_file():
        if any(parts.glob("chunk_*.npz")):
            raise UserError(f"{parts}: chunk files without {MANIFEST}; remove the folder or add --overwrite")
    if man.is_file():
        try:
            old = json.loads(man.read_text())
            old_ident, old_chunk = old["identity"], int(old["chunk"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{man}: unreadable manifest of unfinished samples; add --overwrite to start again")
        diff = _differs(old_ident, ident)
        if diff is None:
            for p in remove_stale_temps(parts):
                log(f"removed {p} (an unfinished write of a killed run)")
            plan = ChunkPlan(n, old_chunk)
            done = sum(read_chunk(chunk_path(parts, c), _rows(plan, c)) is not None for c in range(len(plan)))
            log(f"continuing {out}: {done} of {len(plan)} chunks of {old_chunk} images already in {parts}")
            return plan
        if not overwrite:
            raise ArgumentsChanged(f"{out}: {parts} holds unfinished samples of another command ({diff}); run "
                                   f"that command again to continue it, or add --overwrite to start again")
        log(f"--overwrite: removing {parts} (unfinished samples of another command: {diff})")
        shutil.rmtree(parts)
    elif parts.is_dir() and overwrite:
        shutil.rmtree(parts)
    plan = ChunkPlan(n, max(1, int(chunk)))
    atomic_write_json(man, {"format": FORMAT, "identity": ident, "chunk": plan.size, "n": n})
    return plan


def _rows(plan: ChunkPlan, c: int) -> int:
    lo, hi = plan.bounds(c)
    return hi - lo


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return tuple({getattr(torch, "OutOfMemoryError", RuntimeError), torch.cuda.OutOfMemoryError})


def halving_batches(make: MakeChunk, batch_size: int, log: Log) -> Callable[[int, int], dict[str, np.ndarray]]:
    """``draw(lo, hi)``: ``make(lo, hi, batch)`` where an out-of-memory error halves ``batch`` (kept
    for the next chunks) and draws the chunk again; at batch 1 the error propagates. The images
    are the same at any batch size (per-image seeds), so this changes only the speed."""
    state = {"batch": int(batch_size)}
    oom = _oom_types()

    def draw(lo: int, hi: int) -> dict[str, np.ndarray]:
        while True:
            try:
                return dict(make(lo, hi, state["batch"]))
            except oom:
                if state["batch"] <= 1:
                    raise
                old, state["batch"] = state["batch"], state["batch"] // 2
                _empty_cache()
                log(f"out of memory at batch {old}: continuing with batch {state['batch']} (same images)")

    draw.state = state  # type: ignore[attr-defined]
    return draw


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`ddpm.training.stop.Aborted` (a KeyboardInterrupt with ``signum``
    15) like SIGINT does, so an atomic write in progress removes its temporary file and the CLI
    exits 143. Main thread only (elsewhere a no-op)."""
    from .training.stop import Aborted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Aborted(signum)

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img")


def run_chunked(out: str | Path, identity: Mapping[str, Any], n: int, make: MakeChunk, *,
                batch_size: int, chunk: int = DEFAULT_CHUNK, overwrite: bool = False, progress: bool = False,
                log: Log = print, write_out: bool = True, desc: str = "sampling") -> dict[str, np.ndarray]:
    """Draw ``n`` images chunk by chunk into ``OUT.parts``, resuming what is there; the assembled
    arrays (every rank gets them).

    Args:
        out: the final file (``.npz``); ``OUT.parts`` is the chunk folder.
        identity: the arguments the images depend on (see :func:`open_parts`).
        make: ``make(lo, hi, batch_size)`` -> arrays with hi - lo rows for images lo..hi-1
            (e.g. ``{"arr_0": uint8 [hi-lo, H, W, C]}``); must depend only on lo..hi.
        batch_size: images per network call (halved on out-of-memory, see :func:`halving_batches`).
        chunk: images per chunk for a new job (a continued job keeps its own).
        write_out: write ``out`` (``np.savez`` of the arrays) before removing the chunks; False
            for callers that write their own result (``ddpm eval fid``).

    Under torchrun (an initialised process group) rank r draws chunks c mod W == r; rank 0
    checks the manifest, assembles and removes the folder. A KeyboardInterrupt (SIGINT, or
    SIGTERM through :func:`term_as_interrupt`) propagates after a line saying how much was kept.
    """
    from . import distributed as D

    out = Path(out)
    rank, world = D.dist_info()
    parts = parts_dir(out)
    plan, err = None, None
    fresh = not (parts / MANIFEST).is_file()
    if rank == 0:
        try:
            plan = open_parts(out, identity, n, chunk, overwrite=overwrite, log=log)
        except UserError as e:
            err = (type(e), str(e))
    plan, err = D.broadcast_object((plan, err))
    if err is not None:
        raise err[0](err[1])
    draw = halving_batches(make, batch_size, log if rank == 0 else (lambda m: None))
    todo = [c for c in plan.mine(rank, world) if read_chunk(chunk_path(parts, c), _rows(plan, c)) is None]
    mine_total = sum(_rows(plan, c) for c in plan.mine(rank, world))
    bar = _progress(progress and rank == 0, mine_total, mine_total - sum(_rows(plan, c) for c in todo), desc)
    try:
        with term_as_interrupt():
            for c in todo:
                lo, hi = plan.bounds(c)
                write_chunk(chunk_path(parts, c), draw(lo, hi))
                if bar is not None:
                    bar.update(hi - lo)
    except UserError:
        # a mistake found by the first chunk (a bad sampler option, a full disk before anything
        # was kept): a new job leaves no trace
        if rank == 0 and fresh and not any(parts.glob("chunk_*.npz")):
            shutil.rmtree(parts, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        if rank == 0:
            kept = sum(chunk_path(parts, c).is_file() for c in range(len(plan)))
            what = f"{kept} of {len(plan)} chunks" if world == 1 else "the finished chunks"
            # on stderr, beside the CLI's own "interrupted" line
            print(f"interrupted: {what} kept in {parts}; run the same command to continue", file=sys.stderr,
                  flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    D.barrier()
    arrays = assemble(parts, plan)
    D.barrier()  # every rank has read the chunks before rank 0 removes them
    if rank == 0:
        if write_out:
            atomic_write_npz(out, **arrays)
            shutil.rmtree(parts, ignore_errors=True)
    return arrays


def sampling_chunks(diffusion, model, shape, seed: int, *, labels: np.ndarray | None = None,
                    model_kwargs: Mapping[str, Any] | None = None, x_T=None, **sample_kwargs) -> MakeChunk:
    """``make(lo, hi, batch)`` for :func:`run_chunked`: images lo..hi-1 drawn by
    :func:`ddpm.sampling.sample` from seeds ``seed + lo .. seed + hi - 1`` as uint8 NHWC ``arr_0``
    (and their class labels int64 ``arr_1`` when ``labels`` [n] is given). ``model_kwargs`` hold
    one row per image of the whole job, as do given start latents ``x_T`` [n, C, H, W] (``ddpm sample
    --x-T``); ``sample_kwargs`` go to ``sample`` as they are."""
    from .images import to_uint8
    from .sampling import sample

    def make(lo: int, hi: int, batch: int) -> dict[str, np.ndarray]:
        kw = None if model_kwargs is None else {k: v[lo:hi] for k, v in model_kwargs.items()}
        x = sample(diffusion, model, shape, list(range(seed + lo, seed + hi)), batch_size=batch, model_kwargs=kw,
                   x_T=None if x_T is None else x_T[lo:hi], **sample_kwargs)
        arrays = {"arr_0": to_uint8(x)}
        if labels is not None:
            arrays["arr_1"] = np.asarray(labels[lo:hi], dtype=np.int64)
        return arrays

    return make


def finish(out: str | Path) -> None:
    """Remove ``OUT.parts`` once the caller has written its own result (``write_out=False``)."""
    shutil.rmtree(parts_dir(out), ignore_errors=True)


def assemble(parts: Path, plan: ChunkPlan) -> dict[str, np.ndarray]:
    """Every chunk's arrays concatenated in index order (UserError if one is missing or damaged)."""
    pieces: list[dict[str, np.ndarray]] = []
    for c in range(len(plan)):
        got = read_chunk(chunk_path(parts, c), _rows(plan, c))
        if got is None:
            raise UserError(f"{chunk_path(parts, c)}: missing or damaged after drawing it; run the command again")
        pieces.append(got)
    keys = sorted(pieces[0])
    if any(sorted(p) != keys for p in pieces):
        raise UserError(f"{parts}: chunks hold different arrays; add --overwrite to start again")
    return {k: np.concatenate([p[k] for p in pieces]) for k in keys}


def file_digest(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return h.hexdigest()
            h.update(b)


def checkpoint_digest(ckpt: str | Path) -> str:
    """What a sampling job's images depend on in the checkpoint: the tensor digest its header
    stores (cheap; ``ddpm.checkpoint`` verifies it on load), else the file's sha256."""
    from .checkpoint import read_meta, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    try:
        d = read_meta(path).get("sha256")
    except UserError:
        d = None
    return str(d) if d else file_digest(path)


__all__ = ["ArgumentsChanged", "ChunkPlan", "DEFAULT_CHUNK", "array_digest", "assemble", "checkpoint_digest",
           "chunk_path", "file_digest", "finish", "halving_batches", "open_parts", "parts_dir", "read_chunk",
           "run_chunked", "sampling_chunks", "term_as_interrupt", "write_chunk"]
