"""Bad data: every fault is a one-line DataError naming the file, or (skip_bad) skipped and counted.

The fuzz tests feed random and mutated files to the image-folder and array readers: the only
acceptable outcomes are a correct result or a DataError, never another exception.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ddpm.data import load_images, open_dataset
from ddpm.errors import DataError, UserError

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)


def encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, fmt, **kw)
    return buf.getvalue()


PNG, JPEG, WEBP = encoded("PNG"), encoded("JPEG", quality=90), encoded("WEBP", quality=80)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (valid CRCs) and whose IDAT is empty."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def raises_one_line(fn, *names: str) -> str:
    """Run ``fn``; it must raise DataError (a UserError) with a one-line message naming ``names``."""
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "\n" not in msg and msg.strip() == msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


# ---------------------------------------------------------------------------------------------- image folders

BAD_AT_OPEN = {
    "zero_byte.png": b"",
    "text.png": b"just some text, not an image\n",
    "huge.png": png_header_only(100_000, 100_000),  # Pillow's own bomb limit
    "big.png": png_header_only(9000, 9000),  # over our 8192x8192 limit, under Pillow's
    "gif_named.jpg": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",  # a format we do not decode
    "small.png": None,  # written by write_bad: a valid 16x16 image, read at resolution 24
}


def write_bad(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name == "small.png":
        Image.fromarray(PIXELS[:16, :16]).save(path)
    else:
        path.write_bytes(BAD_AT_OPEN[name])
    return path


@pytest.mark.parametrize("name", sorted(BAD_AT_OPEN))
def test_bad_file_found_when_opening(tmp_path, name):
    (tmp_path / "a_good.png").write_bytes(PNG)
    (tmp_path / "z_good.jpg").write_bytes(JPEG)
    write_bad(tmp_path, name)
    msg = raises_one_line(lambda: open_dataset(str(tmp_path), "train", 24, 3), name)
    if name == "small.png":
        assert "16x16" in msg and "24" in msg
    if name in ("big.png", "huge.png"):
        assert "large" in msg or "limit" in msg
    logged: list[str] = []
    ds = open_dataset(str(tmp_path), "train", 24, 3, skip_bad=True, log=logged.append)
    assert len(ds) == 2 and ds.skipped == 1
    assert len(logged) == 1 and name in logged[0] and "\n" not in logged[0]
    np.testing.assert_array_equal(ds[0], PIXELS)
    with pytest.warns(UserWarning, match=name):  # without log=, skips are warnings
        open_dataset(str(tmp_path), "train", 24, 3, skip_bad=True)


def test_truncated_jpeg_found_when_decoding(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.jpg").write_bytes(JPEG[: len(JPEG) // 2])  # header intact, pixel data cut
    other = np.ascontiguousarray(PIXELS[::-1])
    Image.fromarray(other).save(tmp_path / "c.png")
    ds = open_dataset(str(tmp_path), "train", 24, 3)
    assert len(ds) == 3  # the header alone looks fine
    raises_one_line(lambda: ds[1], "b.jpg", "truncated")
    raises_one_line(lambda: load_images(str(tmp_path), "train", 24, 3), "b.jpg")
    logged: list[str] = []
    ds = open_dataset(str(tmp_path), "train", 24, 3, skip_bad=True, log=logged.append)
    np.testing.assert_array_equal(ds[1], other)  # replaced by the next readable file
    np.testing.assert_array_equal(ds[1], other)
    assert ds.skipped == 1 and len(logged) == 1 and "b.jpg" in logged[0]  # decoded and counted once
    x = load_images(str(tmp_path), "train", 24, 3, skip_bad=True, log=logged.append)
    np.testing.assert_array_equal(x, np.stack([PIXELS, other, other]))
    # the replacement wraps around: a bad last file is replaced by the first
    (tmp_path / "d.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    ds = open_dataset(str(tmp_path), "train", 24, 3, skip_bad=True, log=logged.append)
    np.testing.assert_array_equal(ds[3], PIXELS)


@pytest.mark.parametrize("exc", [ValueError("bad value"), struct.error("unpack"), MemoryError(),
                                 SyntaxError("broken PNG file"), IndexError("tile")])
def test_any_decoder_exception_becomes_data_error(tmp_path, monkeypatch, exc):
    from PIL import ImageFile

    (tmp_path / "a.png").write_bytes(PNG)

    def fail(self):
        raise exc

    ds = open_dataset(str(tmp_path), "train", 24, 3)
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    raises_one_line(lambda: ds[0], "a.png")


def test_empty_and_all_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_one_line(lambda: open_dataset(str(empty)), str(empty), "no .png")
    (empty / "readme.txt").write_text("no images here")
    (empty / "sub").mkdir()
    raises_one_line(lambda: open_dataset(str(empty)), str(empty))
    bad = tmp_path / "bad"
    write_bad(bad, "zero_byte.png")
    write_bad(bad, "text.png")
    raises_one_line(lambda: open_dataset(str(bad), skip_bad=True, log=lambda s: None), str(bad), "all 2")
    # decode-time failures everywhere: no replacement exists
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "a.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    ds = open_dataset(str(trunc), "train", 24, 3, skip_bad=True, log=lambda s: None)
    raises_one_line(lambda: ds[0], str(trunc))


# ---------------------------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("case", ["float32", "int16", "resolution", "channels4", "rgb_for_grey", "five_d",
                                  "two_d", "no_images", "nchw", "object", "not_zip", "truncated_npz",
                                  "truncated_npy", "random_npy", "no_arrays"])
def test_bad_arrays(tmp_path, case):
    good = RNG.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / ("x.npy" if case.endswith("npy") else "x.npz")
    channels, expect = 3, ["x.np"]
    if case == "float32":
        np.savez(path, good.astype(np.float32))
        expect += ["float32", "uint8"]
    elif case == "int16":
        np.savez(path, images=good.astype(np.int16))
        expect += ["int16", "[N, 8, 8, 3]"]
    elif case == "resolution":
        np.savez(path, good[:, :4, :4])
        expect += ["[3, 4, 4, 3]", "[N, 8, 8, 3]"]
    elif case == "channels4":
        np.savez(path, np.concatenate([good, good[..., :1]], axis=3))
        expect += ["4 channels"]
    elif case == "rgb_for_grey":
        np.savez(path, good)
        channels, expect = 1, expect + ["3 channels", "[N, 8, 8, 1]"]
    elif case == "five_d":
        np.savez(path, good[None])
        expect += ["[1, 3, 8, 8, 3]"]
    elif case == "two_d":
        np.savez(path, good[0, 0])
        expect += ["[8, 3]"]
    elif case == "no_images":
        np.savez(path, good[:0])
        expect += ["no images"]
    elif case == "nchw":
        np.savez(path, np.ascontiguousarray(good.transpose(0, 3, 1, 2)))  # [3, 3, 8, 8]
        expect += ["NCHW"]
    elif case == "object":
        np.savez(path, np.array([good, None], dtype=object))
        expect += ["x.npz"]
    elif case == "not_zip":
        path.write_bytes(b"PK\x03\x04 this is not really a zip")
    elif case == "truncated_npz":
        np.savez_compressed(path, good)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "truncated_npy":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "random_npy":
        path.write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif case == "no_arrays":
        import zipfile

        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
        expect += ["no arrays"]
    raises_one_line(lambda: open_dataset(str(path), "train", 8, channels), *expect)
    raises_one_line(lambda: load_images(str(path), "test", 8, channels, n=2), "x.np")


# ---------------------------------------------------------------------------------------------- CIFAR


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def batch(data) -> bytes:
    return pickle.dumps({b"data": data, b"labels": [0] * len(data)}, protocol=2)


def test_fake_cifar_archives(tmp_path, monkeypatch):
    names = [f"cifar-10-batches-py/data_batch_{k}" for k in range(1, 6)]
    good = np.zeros((2, 3072), np.uint8)
    cases = {
        "random_members.tar.gz": ({n: RNG.integers(0, 256, 100, dtype=np.uint8).tobytes() for n in names},
                                  ["data_batch_1"]),
        "unrelated.tar.gz": ({"photos/a.jpg": JPEG}, ["data_batch_1", "data_batch_5"]),
        "missing.tar.gz": ({n: batch(good) for n in names[:3]}, ["data_batch_4"]),
        "shape.tar.gz": ({n: batch(np.zeros((2, 100), np.uint8)) for n in names}, ["3072", "[2, 100]"]),
        "dtype.tar.gz": ({n: batch(np.zeros((2, 3072), np.float32)) for n in names}, ["float32", "uint8"]),
        "labels.tar.gz": ({n: pickle.dumps({b"data": good, b"labels": [1]}, protocol=2) for n in names},
                          ["1 labels"]),
        "notdict.tar.gz": ({n: pickle.dumps([good], protocol=2) for n in names}, ["list"]),
    }
    for fname, (members, expect) in cases.items():
        path = tar_gz(tmp_path / fname, members)
        raises_one_line(lambda: open_dataset(str(path), "train", 32, 3), fname, *expect)
    text = tmp_path / "cifar-10-python.tar.gz"
    text.write_text("this is not an archive")
    raises_one_line(lambda: open_dataset(str(text)), str(text), "not a readable tar")
    full = tar_gz(tmp_path / "full.tar.gz", {n: batch(good) for n in names})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    raises_one_line(lambda: open_dataset(str(cut)), "cut.tar.gz")
    assert len(open_dataset(str(full))) == 10
    raises_one_line(lambda: open_dataset(str(full), "test"), "full.tar.gz", "test_batch")
    # an oversized member is refused from its declared size, before it is read
    from ddpm.datasets import cifar

    with monkeypatch.context() as m:
        m.setattr(cifar, "MAX_MEMBER_BYTES", 1000)
        raises_one_line(lambda: open_dataset(str(full)), "full.tar.gz", "data_batch_1", "limit")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(batch(good))
    raises_one_line(lambda: open_dataset(str(folder)), "cifar-10-batches-py", "data_batch_2")


# ---------------------------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def read_folder_file(data: bytes, ext: str, skip_bad: bool) -> None:
    """Write ``data`` as the only image of a folder and read it: a result or a DataError."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "f" + ext).write_bytes(data)
        try:
            ds = open_dataset(d, "train", 4, 3, skip_bad=skip_bad, log=lambda s: None)
            x = ds[0]
        except DataError as exc:
            assert "\n" not in str(exc)
            return
        assert x.shape == (4, 4, 3) and x.dtype == np.uint8


@FUZZ
@given(data=st.binary(max_size=400), ext=st.sampled_from([".png", ".jpg", ".webp", ".JPEG"]), skip=st.booleans())
def test_fuzz_folder_random_bytes(data, ext, skip):
    read_folder_file(data, ext, skip)


@FUZZ
@given(base=st.sampled_from(["png", "jpeg", "webp"]),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), skip=st.booleans())
def test_fuzz_folder_mutated_images(base, edits, cut, skip):
    data = bytearray({"png": PNG, "jpeg": JPEG, "webp": WEBP}[base])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    read_folder_file(bytes(data), {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}[base], skip)


DTYPES = st.sampled_from([np.uint8, np.int8, np.uint16, np.int64, np.float32, np.float64, np.bool_, np.complex64])


@FUZZ
@given(arr=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)),
       how=st.sampled_from(["npy", "arr_0", "images", "other", "compressed"]),
       resolution=st.integers(1, 4), channels=st.sampled_from([1, 3]))
def test_fuzz_array_reader(arr, how, resolution, channels):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "a.npy" if how == "npy" else "a.npz")
        if how == "npy":
            np.save(path, arr)
        elif how == "compressed":
            np.savez_compressed(path, arr)
        else:
            np.savez(path, **{how: arr})
        try:
            x = load_images(str(path), "train", resolution, channels)
        except DataError as exc:
            assert "\n" not in str(exc) and "a.np" in str(exc)
            ok = (arr.dtype == np.uint8 and arr.ndim in (3, 4) and arr.shape[0] > 0
                  and arr.shape[1:3] == (resolution, resolution)
                  and (arr.ndim == 3 or arr.shape[3] in (channels, 1)))
            assert not ok, f"valid array refused: {arr.dtype} {arr.shape}: {exc}"
            return
        src = arr[..., None] if arr.ndim == 3 else arr
        np.testing.assert_array_equal(x, np.broadcast_to(src, x.shape))
        assert x.shape == (arr.shape[0], resolution, resolution, channels)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), npy=st.booleans())
def test_fuzz_array_reader_mutated_bytes(edits, cut, npy):
    buf = io.BytesIO()
    good = RNG.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    np.save(buf, good) if npy else np.savez(buf, good)
    data = bytearray(buf.getvalue())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "m.npy" if npy else "m.npz")
        path.write_bytes(bytes(data))
        try:
            x = load_images(str(path), "train", 4, 3)
        except DataError as exc:
            assert "\n" not in str(exc)
            return
        assert x.shape[1:] == (4, 4, 3) and x.dtype == np.uint8
