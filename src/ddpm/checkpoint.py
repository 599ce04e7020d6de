"""The checkpoint file: one safetensors file, verified on load, written atomically.

Layout. Tensors are grouped by a prefix: ``ema/<param>`` (the weights used for sampling and
evaluation), ``model/<param>`` (raw training weights), ``optim/...`` and ``rng/...`` (trainer
state). Everything that is not a tensor (the resolved config, the step, package version, the
optimizer's hyper-parameters, the data position) is JSON in the safetensors header under the
key ``ddpm``. Nothing is ever unpickled, so loading cannot run code.

Integrity. The header also stores ``sha256``: a digest over every tensor's name, dtype, shape
and bytes, in sorted key order. :func:`load_checkpoint` recomputes it. The ``ddpm`` JSON itself
is covered by a second digest, ``ddpm_sha256`` (a separate safetensors metadata entry), checked
by :func:`read_meta`: a flipped digit in the step or the config keeps the JSON valid and would
otherwise load silently. Truncation (the file is shorter than its header says), an empty file and
pickles are recognised before safetensors parses anything, so each gets its own message.

Atomicity. :func:`save_checkpoint` writes through :mod:`ddpm.atomic`: a temporary file in the
same folder, fsynced, renamed over the target, folder fsynced. A crash at any moment leaves either the old
file or the new one, never a torn one; a failed write (disk full) removes the temporary file and
raises :class:`CheckpointError` with the old file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .atomic import atomic_write_bytes  # noqa: F401 (also re-exported: the one atomic writer)
from .errors import CheckpointError, DiskFullError

FORMAT = "ddpm-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "ddpm"
_META_DIGEST_KEY = "ddpm_sha256"
# safetensors refuses headers above 100 MB; a larger length field means "not safetensors".
_MAX_HEADER = 100_000_000


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

    cpu = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            # safetensors refuses tensors that share memory (e.g. the same weights saved as both
            # ema/ and model/, as at step 0 or for converted weights): store a copy instead.
            t = t.clone()
        seen.add(ptr)
        cpu[k] = t
    header = dict(meta)
    header["format"] = FORMAT
    header["format_version"] = FORMAT_VERSION
    header["sha256"] = tensor_digest(cpu)
    text = json.dumps(header)
    try:
        payload = st_save(cpu, metadata={_META_KEY: text, _META_DIGEST_KEY: _text_digest(text)})
        atomic_write_bytes(path, payload)
    except DiskFullError as e:
        raise CheckpointError(f"{e}; the previous checkpoint (if any) is intact") from None
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              f"the previous checkpoint (if any) is intact") from None


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sniff(head: bytes) -> str:
    """What a file that is not safetensors probably is, for the error message."""
    if head[:1] == b"\x80" or head[:2] in (b"(d", b"}q", b"]q", b"cc"):
        return ("it looks like a Python pickle, which is never loaded because unpickling can run code; "
                "convert it with `ddpm convert`")
    if head[:4] == b"PK\x03\x04":
        return ("it looks like a torch.save archive (a pickle), which is never loaded because unpickling "
                "can run code; convert it with `ddpm convert`")
    return "not a safetensors file"


def _check_layout(path: Path) -> None:
    """Reject empty, truncated and non-safetensors files with a message that says which.

    A safetensors file is an 8-byte little-endian header length n, n bytes of JSON whose
    tensors' ``data_offsets`` are relative to byte 8 + n, then the tensor bytes.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes): not a checkpoint, or a save that never completed")
    with open(path, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8].ljust(8, b"\0"), "little")
        looks_safetensors = head[8:9] == b"{" and n <= _MAX_HEADER
        if size < 9:
            raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes; a safetensors file starts with "
                                  f"an 8-byte length and a JSON header)")
        if not looks_safetensors:
            raise CheckpointError(f"{path}: not a ddpm checkpoint ({_sniff(head)})")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint: the header needs {8 + n} bytes, "
                                  f"the file has {size}")
        f.seek(8)
        try:
            entries = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
        except Exception:
            return  # malformed header: safetensors reports it below
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated checkpoint: the header describes {8 + n + end} bytes, "
                              f"the file has {size} (a partial copy or an interrupted write)")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint, without reading (or verifying) its tensors.

    The header's own digest is verified (cheap), so a changed step or config is caught here.
    """
    path = Path(path)
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_layout(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a malformed header
        raise CheckpointError(f"{path}: corrupt or not a checkpoint (not a readable safetensors file: {e})") from None
    raw = header.get(_META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a ddpm checkpoint (no '{_META_KEY}' header; "
                              f"for diffusers weights use `ddpm convert from-diffusers`)")
    if header.get(_META_DIGEST_KEY) != _text_digest(raw):
        raise CheckpointError(f"{path}: corrupt checkpoint header (header checksum "
                              f"{'missing' if _META_DIGEST_KEY not in header else 'mismatch'}: flipped bytes)")
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
