"""CIFAR-10 from the official python archive, read without ever executing its pickles.

``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py/`` folder) holds Python 2
pickles: ``data_batch_1`` .. ``data_batch_5`` (train, 5 x 10,000 images) and ``test_batch``
(10,000), each a dict whose ``data`` entry is a uint8 array [N, 3072] in CHW order
(1024 red, 1024 green, 1024 blue values, rows top to bottom), and ``labels``, N class indices
0..9 (``CLASS_NAMES`` order). The paper's models are unconditional and ignore them; the
dataset keeps them as ``labels`` for class-conditional models.

A pickle can run any callable it names. :class:`SafeUnpickler` therefore resolves only the few
globals numpy needs to rebuild an array (``_reconstruct``, ``ndarray``, ``dtype``,
``_frombuffer``) and ``_codecs.encode`` restricted to latin-1 (how Python 3 protocol-2 pickles
store bytes); any other global is refused with a :class:`DataError` before it is imported.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import ArrayDataset, ImageDataset, one_line
from .imageops import fit_array

TRAIN_MEMBERS = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_MEMBERS = ("test_batch",)
FOLDER_NAME = "cifar-10-batches-py"
# A real batch pickle is 31,035,704 bytes (10,000 images). Anything far larger is refused before
# it is read into memory (a tar member can declare, and a gzip stream can inflate to, any size).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
_EXPECTED = "expected the CIFAR-10 python version (cifar-10-python.tar.gz or its cifar-10-batches-py folder)"
# batches.meta's label_names, in label order.
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it (str -> bytes via latin-1), nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1")


def _numpy_globals() -> dict:
    try:  # numpy >= 2 keeps these in numpy._core; old pickles still say numpy.core
        from numpy._core import multiarray as ma, numeric as nu
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma, numeric as nu
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = nu._frombuffer
    for mod in ("builtins", "__builtin__"):
        for name, obj in (("dict", dict), ("list", list), ("tuple", tuple), ("bytes", bytes),
                          ("bytearray", bytearray), ("str", str)):
            allowed[(mod, name)] = obj
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dicts, lists, bytes and str."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refers to '{module}.{name}', which is not allowed "
                                         f"(only numpy arrays, dicts, lists, bytes and str are accepted)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("uses persistent ids, which are not allowed")


def safe_load(data: bytes, what: str) -> object:
    """Unpickle ``data`` with :class:`SafeUnpickler`; any failure is a DataError naming ``what``."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"cannot read '{what}': the pickle {one_line(exc)}; {_EXPECTED}") from None


def _batch_images(obj: object, what: str) -> np.ndarray:
    """A CIFAR batch dict -> uint8 [N, 32, 32, 3]; the layout is checked, not assumed."""
    if not isinstance(obj, dict):
        raise DataError(f"'{what}' holds a {type(obj).__name__}, not a CIFAR-10 batch dict; {_EXPECTED}")
    data = obj.get(b"data", obj.get("data"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"'{what}' entry 'data' is a {got}; expected a uint8 array [N, 3072] (32x32x3 CHW); "
                        f"{_EXPECTED}")
    labels = obj.get(b"labels", obj.get("labels"))
    if labels is not None and len(labels) != data.shape[0]:
        raise DataError(f"'{what}' has {data.shape[0]} images but {len(labels)} labels; {_EXPECTED}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _check_size(what: str, size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise DataError(f"'{what}' is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit for one batch "
                        f"(a real CIFAR-10 batch is about 31 MB); {_EXPECTED}")


def _read_archive(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """The raw bytes of the ``wanted`` members of a tar archive, found by base name."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    _check_size(f"{path}: {base}", member.size)
                    f = tar.extractfile(member)
                    found[base] = f.read() if f is not None else b""
    except tarfile.ReadError as exc:
        raise DataError(f"'{path}' is not a readable tar archive ({one_line(exc)}); {_EXPECTED}") from None
    except Exception as exc:  # truncated or corrupt compressed stream (EOFError, zlib.error, ...)
        raise DataError(f"'{path}' is corrupt or truncated ({one_line(exc) or type(exc).__name__}); "
                        f"{_EXPECTED}") from None
    return found


def _read_folder(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    found = {}
    for name in wanted:
        f = path / name
        if f.is_file():
            _check_size(str(f), f.stat().st_size)
            try:
                found[name] = f.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read '{f}': {one_line(exc)}") from None
    return found


def is_cifar_folder(path: Path) -> bool:
    """A folder that looks like (or directly contains) ``cifar-10-batches-py``."""
    return (path.name == FOLDER_NAME or (path / FOLDER_NAME).is_dir()
            or any((path / m).is_file() for m in TRAIN_MEMBERS + TEST_MEMBERS))


def load_cifar(path: str | os.PathLike, split: str) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: train = data_batch_1..5 in order, test = test_batch."""
    return load_cifar_with_labels(path, split)[0]


def _batch_labels(obj: dict, what: str) -> np.ndarray | None:
    """int64 [N] labels of a batch dict already checked by ``_batch_images`` (None if absent)."""
    labels = obj.get(b"labels", obj.get("labels"))
    if labels is None:
        return None
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"'{what}' entry 'labels' is not a list of integers; {_EXPECTED}") from None
    if y.size and (y.min() < 0 or y.max() >= len(CLASS_NAMES)):
        raise DataError(f"'{what}' has labels outside 0..{len(CLASS_NAMES) - 1} (found {int(y.min())}..{int(y.max())}); "
                        f"{_EXPECTED}")
    return y


def load_cifar_with_labels(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 [N, 32, 32, 3], int64 [N] labels or None if a batch lacks them), as :func:`load_cifar`."""
    path = Path(path)
    wanted = TRAIN_MEMBERS if split == "train" else TEST_MEMBERS
    if path.is_dir():
        if (path / FOLDER_NAME).is_dir() and path.name != FOLDER_NAME:
            path = path / FOLDER_NAME
        raw = _read_folder(path, wanted)
    else:
        raw = _read_archive(path, wanted)
    missing = [m for m in wanted if m not in raw]
    if missing:
        raise DataError(f"'{path}' lacks {', '.join(missing)} (the CIFAR-10 {split} split); {_EXPECTED}")
    images, labels = [], []
    for m in wanted:
        what = f"{path}: {m}"
        obj = safe_load(raw[m], what)
        images.append(_batch_images(obj, what))
        labels.append(_batch_labels(obj, what))
    y = None if any(v is None for v in labels) else np.concatenate(labels)
    return np.concatenate(images), y


class CifarDataset(ArrayDataset):
    """CIFAR-10 (train 50,000 / test 10,000 for the real archive), uint8 [32, 32, 3].

    At resolution 32 with 3 channels the images come back exactly as stored. Otherwise each
    image goes through the image-folder conversion (``L`` via luma for 1 channel; area resize
    for a smaller resolution); a resolution above 32 is a DataError (images are never enlarged).
    """

    def __init__(self, path: str | os.PathLike, split: str, resolution: int, channels: int, source: str, **kw):
        if resolution > 32:
            raise DataError(f"CIFAR-10 images are 32x32, smaller than the resolution {resolution} "
                            f"(expected a resolution <= 32; images are never enlarged)")
        images, self.labels = load_cifar_with_labels(path, split)
        super().__init__(images, "cifar10", source, channels, **kw)
        self.class_names = CLASS_NAMES if self.labels is not None else None
        self.resolution = int(resolution)
        self.repeat_gray = False
        self._raw = resolution == 32 and channels == 3

    def __getitem__(self, i: int) -> np.ndarray:
        x = self.array[self._index(i)]
        return x.copy() if self._raw else fit_array(x, self.resolution, self.channels)

    def take(self, indices) -> np.ndarray:
        return ArrayDataset.take(self, indices) if self._raw else ImageDataset.take(self, indices)
