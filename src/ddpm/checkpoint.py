"""The checkpoint file: one safetensors file, verified on load, written atomically.

Layout. Tensors are grouped by a prefix: ``ema/<param>`` (the weights used for sampling and
evaluation), ``model/<param>`` (raw training weights), ``optim/...`` and ``rng/...`` (trainer
state). Everything that is not a tensor (the resolved config, the step, package version, the
optimizer's hyper-parameters, the data position) is JSON in the safetensors header under the
key ``ddpm``. Nothing is ever unpickled, so loading cannot run code.

Integrity. The header also stores ``sha256``: a digest over every tensor's name, dtype, shape
and bytes, in sorted key order. :func:`load_checkpoint` recomputes it, so truncation or flipped
bytes anywhere in the file are reported as such instead of producing silent garbage.

Atomicity. :func:`save_checkpoint` writes to a temporary file in the same folder, fsyncs it,
renames it over the target and fsyncs the folder. A crash at any moment leaves either the old
file or the new one, never a torn one; a failed write (disk full) removes the temporary file and
raises :class:`CheckpointError` with the old file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointError

FORMAT = "ddpm-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "ddpm"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape(-1): a 0-dim tensor (e.g. Adam's "step") cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors and JSON-able ``meta`` to ``path`` atomically.

    Args:
        path: target file (conventionally ``*.safetensors``).
        tensors: name -> tensor (any device; copied to CPU, made contiguous).
        meta: JSON-serialisable dict; must contain ``config`` for files ``ddpm.load`` reads.
    Raises:
        CheckpointError: the write failed (e.g. disk full); the previous file at ``path`` is intact.
    """
    from safetensors.torch import save as st_save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = dict(meta)
    header["format"] = FORMAT
    header["format_version"] = FORMAT_VERSION
    header["sha256"] = tensor_digest(cpu)
    try:
        payload = st_save(cpu, metadata={_META_KEY: json.dumps(header)})
        atomic_write_bytes(path, payload)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              f"the previous checkpoint (if any) is intact") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint, without reading (or verifying) its tensors."""
    path = Path(path)
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:  # safetensors raises several types for a malformed header
        raise CheckpointError(f"{path}: not a ddpm checkpoint (not a readable safetensors file: {e})") from None
    if raw is None:
        raise CheckpointError(f"{path}: not a ddpm checkpoint (no '{_META_KEY}' header; "
                              f"for diffusers weights use `ddpm convert from-diffusers`)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt checkpoint header (invalid JSON)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm checkpoint (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['format_version']} is newer than "
                              f"this package supports ({FORMAT_VERSION}); upgrade ddpm")
    return meta


def load_checkpoint(path: str | os.PathLike, prefixes: Iterable[str] | None = None,
                    device: str | torch.device = "cpu", verify: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint.

    Args:
        path: the ``.safetensors`` file.
        prefixes: keep only tensors whose names start with one of these (e.g. ``["ema/"]``).
            The checksum always covers the whole file.
        device: where to put the returned tensors.
        verify: recompute the sha256 over all tensors and compare with the header.
    Returns:
        (tensors, meta).
    Raises:
        CheckpointError: missing, not ours, truncated or corrupt (checksum mismatch).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    if verify and tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt (flipped bytes or a partial write)")
    if prefixes is not None:
        pre = tuple(prefixes)
        tensors = {k: v for k, v in tensors.items() if k.startswith(pre)}
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{"ema/a.b": t}`` -> ``{"a.b": t}`` for the given prefix (``"ema/"``)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_prefix`; strips DDP's ``module.`` and compile's ``_orig_mod.``."""
    out = {}
    for k, v in state.items():
        for junk in ("module.", "_orig_mod."):
            k = k.replace(junk, "")
        out[prefix + k] = v
    return out


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder -> its latest complete checkpoint file.

    A run folder holds ``checkpoints/ckpt_<step>.safetensors`` and a ``checkpoints/latest``
    pointer (a text file with the file name). Without a readable pointer, the newest file by
    step is used.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint or run folder not found: {p}")
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = ck / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if name and (ck / name).is_file():
            return ck / name
    files = list_checkpoints(ck)
    if not files:
        raise CheckpointError(f"no checkpoint found in {p} (expected checkpoints/ckpt_<step>.safetensors)")
    return files[-1]


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """``ckpt_<step>.safetensors`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    out = []
    for f in folder.glob("ckpt_*.safetensors"):
        stem = f.stem[len("ckpt_"):]
        if stem.isdigit():
            out.append((int(stem), f))
    return [f for _, f in sorted(out)]


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:09d}.safetensors"
