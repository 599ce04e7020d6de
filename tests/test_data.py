"""ddpm.data: digits, CIFAR-10 archives, image folders, npz/npy, EpochSampler, flips.

Expected pixels are computed here from first principles (numpy means, the ITU-R 601 luma
formula, the CIFAR byte layout), never by calling the code under test.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.data import (EpochSampler, apply_flips, digits_indices, digits_labels, load_images,
                       open_dataset, read_samples)
from ddpm.errors import DataError

# ---------------------------------------------------------------------------------------------- helpers


def png_chunks(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (so 16-bit RGB can be tested): signature, IHDR, IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def fake_cifar_batches(n: int = 4, seed: int = 0) -> dict[str, dict]:
    """The real layout (Python-2 style bytes keys, uint8 [n, 3072] CHW rows) with n images/batch."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    return {name: {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                   b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)]} for name in names}


def write_cifar(root: Path, batches: dict, kind: str = "tar.gz", protocol: int = 2) -> Path:
    """Write ``batches`` with the real pickle module as an archive or an extracted folder."""
    if kind == "folder":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name, obj in batches.items():
            (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=protocol))
        return folder
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in batches.items():
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def luma(rgb) -> np.ndarray:
    """ITU-R 601-2 luma, the documented RGB -> L rule, as exact floats."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# ---------------------------------------------------------------------------------------------- digits


def test_digits_sizes_range_and_values():
    from sklearn.datasets import load_digits

    tr = open_dataset("digits", "train", resolution=8, channels=1)
    te = open_dataset("digits", "test", resolution=8, channels=1)
    assert (len(tr), len(te)) == (1500, 297)
    assert tr.name == "digits" and tr.source == "digits" and tr.skipped == 0
    x = load_images("digits", "train", 8, 1)
    assert x.shape == (1500, 8, 8, 1) and x.dtype == np.uint8
    assert x.min() == 0 and x.max() == 255
    # values: round(v * 255 / 16) of sklearn's 0..16 grey levels, at the split's indices
    d = load_digits()
    idx = digits_indices("train")
    expect = np.floor(d.images[idx] * 255 / 16 + 0.5)
    np.testing.assert_array_equal(x[..., 0], expect)
    np.testing.assert_array_equal(tr[3], x[3])
    np.testing.assert_array_equal(digits_labels("train"), d.target[idx])


def test_digits_split_is_fixed_disjoint_and_the_documented_one():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    tr, te = digits_indices("train"), digits_indices("test")
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    labels = load_digits().target
    a, b = train_test_split(np.arange(1797), test_size=297, random_state=0, stratify=labels)
    np.testing.assert_array_equal(tr, np.sort(a))
    np.testing.assert_array_equal(te, np.sort(b))
    # stratified: every class is in the test split in proportion (297/1797 of it, +-1)
    counts = np.bincount(digits_labels("test"), minlength=10)
    np.testing.assert_allclose(counts, np.bincount(labels) * 297 / 1797, atol=1)
    # the same images whatever was opened before (no hidden state)
    first = load_images("digits", "test", 8, 1, n=20)
    open_dataset("digits", "train", 16, 3)
    np.testing.assert_array_equal(load_images("digits", "test", 8, 1, n=20), first)


def test_digits_resize_and_channels():
    small = load_images("digits", "train", 8, 1).astype(np.float64)[..., 0]
    half = load_images("digits", "train", 4, 1)
    # area (BOX) shrink: each pixel is the mean of its 2x2 block, rounded
    block_mean = small.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    assert np.abs(half[..., 0] - block_mean).max() <= 0.5
    big = load_images("digits", "train", 32, 3, n=10)
    assert big.shape == (10, 32, 32, 3)
    assert (big[..., 0] == big[..., 1]).all() and (big[..., 1] == big[..., 2]).all()
    # bilinear enlarging: output pixel j samples the input at u = (j + 0.5) * 8 / 32 - 0.5,
    # interpolating linearly between its neighbours (clamped at the border); rounded once
    u = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = np.zeros((32, 8))
    w[np.arange(32), lo] += 1 - (u - lo)
    w[np.arange(32), hi] += u - lo
    expect = np.einsum("ia,nab,jb->nij", w, small[:10], w)
    assert np.abs(big[..., 0] - expect).max() <= 0.5 + 1e-3


def test_digits_labels_rejects_bad_split():
    with pytest.raises(DataError, match="split"):
        digits_labels("validation")
    with pytest.raises(DataError, match="split 'tset'.*did you mean 'test'"):
        open_dataset("digits", "tset")


# ---------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("kind,protocol", [("tar.gz", 2), ("tar.gz", 4), ("tar.gz", 5), ("folder", 2)])
def test_cifar_reads_archive_and_folder(tmp_path, kind, protocol):
    batches = fake_cifar_batches(n=3)
    path = write_cifar(tmp_path, batches, kind, protocol)
    tr = open_dataset(str(path), "train", 32, 3)
    te = open_dataset(str(path), "test", 32, 3)
    assert tr.name == "cifar10" and (len(tr), len(te)) == (15, 3)
    x = load_images(str(path), "train", 32, 3)
    assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8
    # order: data_batch_1..5; layout: 1024 R then 1024 G then 1024 B, row-major 32x32
    for k in range(5):
        raw = batches[f"data_batch_{k + 1}"][b"data"]
        for i in range(3):
            img = x[3 * k + i]
            assert img[0, 0, 0] == raw[i, 0] and img[0, 1, 0] == raw[i, 1] and img[1, 0, 0] == raw[i, 32]
            assert img[0, 0, 1] == raw[i, 1024] and img[31, 31, 2] == raw[i, 3071]
            np.testing.assert_array_equal(img, tr[3 * k + i])
    raw = batches["test_batch"][b"data"]
    np.testing.assert_array_equal(te[2][..., 1].reshape(-1), raw[2, 1024:2048])


def test_cifar_parent_folder_and_lower_resolution(tmp_path):
    batches = fake_cifar_batches(n=2)
    # constant-colour test images: the grey value and the area resize are then exact
    colours = np.array([[10, 200, 40], [255, 0, 128]], dtype=np.uint8)
    batches["test_batch"][b"data"] = np.repeat(colours, 1024, axis=1)
    write_cifar(tmp_path, batches, "folder")
    ds = open_dataset(str(tmp_path), "test", 16, 1)  # the folder that contains cifar-10-batches-py
    assert ds.name == "cifar10"
    for i in range(2):
        assert ds[i].shape == (16, 16, 1)
        assert abs(float(ds[i][0, 0, 0]) - luma(colours[i])) <= 0.5
        assert (ds[i] == ds[i][0, 0, 0]).all()
    with pytest.raises(DataError, match="32x32.*resolution 64"):
        open_dataset(str(tmp_path), "test", 64, 3)


def malicious_pickle(target: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    return pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    payload = malicious_pickle(target)
    pickle.loads(payload)  # the payload is real: an ordinary unpickler creates the file
    assert target.exists()
    target.unlink()
    batches = fake_cifar_batches(n=2)
    for kind in ("tar.gz", "folder"):
        root = tmp_path / kind
        path = write_cifar(root, batches, kind)
        member = (path / "data_batch_1") if kind == "folder" else None
        if member is not None:
            member.write_bytes(payload)
        else:
            batches_bad = dict(batches)
            batches_bad["data_batch_1"] = payload
            path.unlink()
            path = write_cifar(root, batches_bad, kind)
        with pytest.raises(DataError) as err:
            open_dataset(str(path), "train", 32, 3)
        msg = str(err.value)
        assert "\n" not in msg and "data_batch_1" in msg and "io.open" in msg and str(path) in msg
        assert not target.exists()
        # the test split does not touch the bad member and still loads
        assert len(open_dataset(str(path), "test", 32, 3)) == 2


def test_cifar_refuses_other_globals_and_bad_codecs(tmp_path):
    import os

    from ddpm.datasets.cifar import safe_load

    target = tmp_path / "made_by_mkdir"

    class Mkdir:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    class Codec:  # _codecs.encode is allowed for latin-1 only
        def __reduce__(self):
            import _codecs
            return (_codecs.encode, ("eJwDAAAAAAE=", "base64"))

    for obj in (Mkdir(), Codec(), [np.float64(1.0)]):
        with pytest.raises(DataError, match="not allowed"):
            safe_load(pickle.dumps(obj, protocol=2), "x")
    assert not target.exists()
    # plain data round-trips
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "s": "é", b"l": [1, (2, 3)], "b": bytearray(b"x")}
    for protocol in (2, 3, 4, 5):
        back = safe_load(pickle.dumps(obj, protocol=protocol), "x")
        np.testing.assert_array_equal(back[b"data"], obj[b"data"])
        assert back["s"] == "é" and back[b"l"] == [1, (2, 3)] and back["b"] == bytearray(b"x")


# ---------------------------------------------------------------------------------------------- image folder


def test_folder_centre_crop_and_area_resize(tmp_path):
    rng = np.random.default_rng(1)
    # landscape 12x8: the centre 8x8 is columns 2..9; the rest is 255 so a wrong crop shows
    img = np.full((8, 12, 3), 255, dtype=np.uint8)
    core = rng.integers(0, 200, (8, 8, 3))
    # make each 2x2 block sum to a multiple of 4, so its mean (the BOX output) is an exact integer
    core[1::2, 1::2] += (-core.reshape(4, 2, 4, 2, 3).sum(axis=(1, 3))) % 4
    img[:, 2:10] = core
    save(tmp_path / "a.png", Image.fromarray(img))
    # portrait 8x12: the centre is rows 2..9
    save(tmp_path / "b.png", Image.fromarray(np.ascontiguousarray(img.transpose(1, 0, 2))))
    ds = open_dataset(str(tmp_path), "train", resolution=4, channels=3)
    assert len(ds) == 2 and ds.name == tmp_path.name and ds.skipped == 0
    expect = core.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
    assert (expect == np.round(expect)).all()
    np.testing.assert_array_equal(ds[0], expect.astype(np.uint8))
    np.testing.assert_array_equal(ds[1], expect.transpose(1, 0, 2).astype(np.uint8))
    # at the crop's own size nothing is resampled
    np.testing.assert_array_equal(open_dataset(str(tmp_path), "test", 8, 3)[0], core)
    # the block mean is rounded once, half up: [[0, 0], [0, 2]] -> 1 but [[0, 0], [0, 1]] -> 0
    # (Pillow's own 8-bit BOX rounds after each pass and gives 1 for both)
    cases = (([[0, 0], [0, 2]], 1), ([[0, 0], [0, 1]], 0), ([[3, 4], [4, 4]], 4))
    for k, (block, _) in enumerate(cases):
        save(tmp_path / "ties" / f"{k}.png", Image.fromarray(np.array(block, dtype=np.uint8)))
    got = load_images(str(tmp_path / "ties"), "train", 1, 1).reshape(-1)
    np.testing.assert_array_equal(got, [want for _, want in cases])
    # odd excess: left = (9 - 8) // 2 = 0, so a 9x8 image keeps columns 0..7 and drops column 8
    odd = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    save(tmp_path / "c" / "odd.png", Image.fromarray(odd))
    np.testing.assert_array_equal(open_dataset(str(tmp_path / "c"), "train", 8, 3)[0], odd[:, 0:8])


def test_folder_rgb_to_grey_and_grey_to_rgb(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (12, 200, 99), (77, 77, 77)]
    for k, c in enumerate(colours):
        save(tmp_path / f"{k}.png", Image.new("RGB", (5, 5), c))
    grey = load_images(str(tmp_path), "train", 5, 1)
    assert grey.shape == (5, 5, 5, 1)
    for k, c in enumerate(colours):
        assert (grey[k] == grey[k][0, 0]).all()
        assert abs(float(grey[k][0, 0, 0]) - luma(c)) <= 0.5
    assert grey[4][0, 0, 0] == 77
    g = tmp_path / "g"
    a = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    save(g / "grey.png", Image.fromarray(a))
    rgb = open_dataset(str(g), "train", 6, 3)[0]
    assert rgb.shape == (6, 6, 3)
    for ch in range(3):
        np.testing.assert_array_equal(rgb[..., ch], a)


def test_folder_modes_16bit_palette_cmyk_rgba_webp(tmp_path):
    k = np.array([[0, 1, 100, 200], [255, 17, 128, 64], [3, 250, 9, 90], [0, 255, 255, 0]], dtype=np.uint16)
    # 16-bit grey PNG (opens as I;16): 257*k must come back as k, not clipped to 255
    Image.fromarray(k * 257).save(tmp_path / "a_grey16.png")
    # 16-bit RGB PNG (colour type 2, bit depth 16), written by hand
    rgb16 = np.stack([k, k[::-1], k.T], axis=-1).astype(">u2") * 257
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(4))
    (tmp_path / "b_rgb16.png").write_bytes(png_chunks(4, 4, 16, 2, rows))
    # palette PNG: index i -> palette colour i; index 3 is fully transparent
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8).repeat(2, 0).repeat(2, 1), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 1, 2, 3] + [0] * (256 * 3 - 12))
    pal.save(tmp_path / "c_palette.png", transparency=3)
    # CMYK JPEG: (C, M, Y, K) = (0, 255, 0, 0) is magenta (255, 0, 255)
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "d_cmyk.JPG", quality=100)
    # RGBA: opaque pixels keep their colour, transparent ones become white
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 60, 255)
    rgba[2:] = (5, 6, 7, 0)
    Image.fromarray(rgba).save(tmp_path / "e_rgba.png")
    # LA: grey with alpha
    la = Image.fromarray(np.stack([np.full((4, 4), 40, np.uint8), np.tile([255, 0], (4, 2)).astype(np.uint8)], -1))
    assert la.mode == "LA"
    la.save(tmp_path / "f_la.png")
    # lossless WebP
    webp = np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(webp).save(tmp_path / "g_img.webp", lossless=True)

    ds3 = open_dataset(str(tmp_path), "train", 4, 3)
    ds1 = open_dataset(str(tmp_path), "train", 4, 1)
    assert len(ds3) == 7
    items = [ds3[i] for i in range(7)]
    assert all(x.shape == (4, 4, 3) and x.dtype == np.uint8 for x in items)
    assert all(ds1[i].shape == (4, 4, 1) for i in range(7))
    np.testing.assert_array_equal(ds1[0][..., 0], k)
    np.testing.assert_array_equal(items[0][..., 2], k)
    np.testing.assert_array_equal(items[1], (rgb16 // 257).astype(np.uint8))
    expect_pal = np.array([[[10, 20, 30], [200, 100, 50]], [[0, 255, 0], [255, 255, 255]]])
    np.testing.assert_array_equal(items[2], expect_pal.repeat(2, 0).repeat(2, 1))
    assert np.abs(items[3].astype(int) - [255, 0, 255]).max() <= 3  # JPEG at quality 100
    np.testing.assert_array_equal(items[4][:2], np.broadcast_to([200, 10, 60], (2, 4, 3)))
    np.testing.assert_array_equal(items[4][2:], np.full((2, 4, 3), 255))
    np.testing.assert_array_equal(ds1[5][..., 0], np.tile([40, 255], (4, 2)))
    np.testing.assert_array_equal(items[6], webp)


def test_folder_scan_rules_order_and_exif(tmp_path):
    def put(rel: str, value: int):
        kw = {"format": "PNG"} if rel.lower().endswith("png") else {"lossless": True} if rel.endswith("webp") else {}
        save(tmp_path / rel, Image.new("L", (4, 4), value), **kw)

    put("b/z.PNG", 1)
    put("a.JPEG", 2)
    put("b/a.jpg", 3)
    put("c.webp", 4)
    put(".hidden.png", 5)
    put(".cache/x.png", 6)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "d.gif.bak").write_bytes(b"")
    ds = open_dataset(str(tmp_path), "train", 4, 1)
    # sorted by relative path: a.JPEG, b/a.jpg, b/z.PNG, c.webp; hidden paths ignored
    values = [int(round(float(ds[i].mean()))) for i in range(len(ds))]
    assert values == [2, 3, 1, 4]
    np.testing.assert_array_equal(load_images(str(tmp_path), "test", 4, 1), load_images(str(tmp_path), "train", 4, 1))
    # EXIF orientation 6 (rotate 90 degrees clockwise for display) is applied
    e = tmp_path / "exif"
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    exif = Image.Exif()
    exif[0x0112] = 6
    save(e / "o.png", Image.fromarray(a), exif=exif)
    np.testing.assert_array_equal(open_dataset(str(e), "train", 8, 1)[0][..., 0], np.rot90(a, k=-1))


# ---------------------------------------------------------------------------------------------- npz / npy


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    g = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x)  # arr_0
    np.savez(tmp_path / "b.npz", labels=np.arange(5), images=x)  # key 'images' wins
    np.savez(tmp_path / "c.npz", first=x, second=g)  # first array
    np.save(tmp_path / "d.npy", x)
    np.save(tmp_path / "e.npy", g)  # [N, H, W] -> C = 1
    for name in ("a.npz", "b.npz", "c.npz", "d.npy"):
        ds = open_dataset(str(tmp_path / name), "train", 6, 3)
        assert len(ds) == 5 and ds.name == name.split(".")[0]
        np.testing.assert_array_equal(load_images(str(tmp_path / name), "test", 6, 3), x)
        np.testing.assert_array_equal(ds[-1], x[4])
    grey = load_images(str(tmp_path / "e.npy"), "train", 6, 1)
    np.testing.assert_array_equal(grey[..., 0], g)
    rgb = open_dataset(str(tmp_path / "e.npy"), "train", 6, 3)
    np.testing.assert_array_equal(rgb[1], np.repeat(g[1][..., None], 3, axis=2))
    np.testing.assert_array_equal(rgb.take([3, 0]), np.repeat(g[[3, 0]][..., None], 3, axis=3))
    np.testing.assert_array_equal(read_samples(str(tmp_path / "a.npz")), x)


def test_works_with_a_torch_dataloader():
    import torch

    ds = open_dataset("digits", "test", 8, 1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (5, 8, 8, 1)
    np.testing.assert_array_equal(batch.numpy(), ds.take(range(5)))


def test_load_images_first_n_and_all():
    full = load_images("digits", "test", 8, 1)
    assert full.shape == (297, 8, 8, 1)
    np.testing.assert_array_equal(load_images("digits", "test", 8, 1, n=7), full[:7])
    assert load_images("digits", "test", 8, 1, n=10_000).shape[0] == 297
    assert load_images("digits", "test", 8, 1, n=0).shape == (0, 8, 8, 1)


def test_read_samples_folder(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        save(tmp_path / f"s{i}.png", Image.fromarray(im))
    np.testing.assert_array_equal(read_samples(str(tmp_path)), imgs)
    save(tmp_path / "s9.png", Image.fromarray(imgs[0][:4]))
    with pytest.raises(DataError, match="s9.png"):
        read_samples(str(tmp_path))


def test_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="'nope' not found / not recognised; expected digits"):
        open_dataset("nope")
    with pytest.raises(DataError, match="cs.toronto.edu"):
        open_dataset("cifar10")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="x.txt"):
        open_dataset(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="channels"):
        open_dataset("digits", channels=4)
    with pytest.raises(DataError, match="resolution"):
        open_dataset("digits", resolution=0)


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("n,batch", [(10, 4), (7, 7), (3, 8), (50, 1)])
def test_sampler_each_index_once_per_epoch(n, batch):
    s = EpochSampler(n, batch, seed=5, flip=True)
    stream = np.concatenate([s.next()[0] for _ in range(-(-4 * n // batch))])
    assert stream.dtype == np.int64
    for e in range(4):
        np.testing.assert_array_equal(np.sort(stream[e * n:(e + 1) * n]), np.arange(n))
        # epoch e is default_rng([seed, e])'s permutation
        np.testing.assert_array_equal(stream[e * n:(e + 1) * n], np.random.default_rng([5, e]).permutation(n))
    # successive epochs use different orders
    assert any((stream[e * n:(e + 1) * n] != stream[(e + 1) * n:(e + 2) * n]).any() for e in range(3))


def test_sampler_flips():
    s = EpochSampler(1000, 250, seed=0, flip=True)
    batches = [s.next() for _ in range(40)]  # 10 epochs
    flips = np.concatenate([f for _, f in batches])
    idx = np.concatenate([i for i, _ in batches])
    assert flips.dtype == np.bool_ and flips.shape == (10_000,)
    assert abs(flips.mean() - 0.5) < 0.025  # 5 standard deviations of a fair coin over 10,000 draws
    # an image's flip varies from epoch to epoch (independent per epoch)
    per_image = np.zeros((1000, 10), dtype=bool)
    for e in range(10):
        per_image[idx[e * 1000:(e + 1) * 1000], e] = flips[e * 1000:(e + 1) * 1000]
    # Binomial(10, 0.5) / 10 has std sqrt(0.025) = 0.158; flips tied to the image would give 0.5
    assert abs(per_image.mean(axis=1).std() - np.sqrt(0.025)) < 0.02
    off = EpochSampler(1000, 250, seed=0, flip=False)
    i_off, f_off = off.next()
    assert not f_off.any()
    np.testing.assert_array_equal(i_off, batches[0][0])  # flipping does not change the order


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 9])
def test_sampler_resume_continues_identically(steps):
    a = EpochSampler(10, 4, seed=11, flip=True)
    for _ in range(steps):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    assert set(state) == {"epoch", "position"}
    b = EpochSampler(10, 4, seed=11, flip=True)
    b.load_state_dict(state)
    for _ in range(6):
        (ia, fa), (ib, fb) = a.next(), b.next()
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(fa, fb)
    # the resumed batch is the (steps+1)-th batch of an uninterrupted stream
    c = EpochSampler(10, 4, seed=11, flip=True)
    c.load_state_dict(state)
    ref = EpochSampler(10, 4, seed=11, flip=True)
    stream = [next(ref) for _ in range(steps + 1)]
    first = c.next()
    np.testing.assert_array_equal(first[0], stream[-1][0])
    np.testing.assert_array_equal(first[1], stream[-1][1])


def test_sampler_seeds_differ_and_bad_state():
    a = EpochSampler(100, 50, seed=1, flip=True).next()[0]
    b = EpochSampler(100, 50, seed=2, flip=True).next()[0]
    c = EpochSampler(100, 50, seed=1, flip=True).next()[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    s = EpochSampler(10, 4, seed=0, flip=False)
    for bad in ({"epoch": 0}, {"epoch": -1, "position": 0}, {"epoch": 0, "position": 11}, None):
        with pytest.raises(DataError):
            s.load_state_dict(bad)
    with pytest.raises(ValueError):
        EpochSampler(0, 4, seed=0, flip=False)


def test_apply_flips():
    x = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 2), dtype=np.uint8)
    keep = x.copy()
    y = apply_flips(x, np.array([True, False, True]))
    np.testing.assert_array_equal(x, keep)  # input untouched
    np.testing.assert_array_equal(y[1], x[1])
    for i in (0, 2):
        for col in range(5):
            np.testing.assert_array_equal(y[i][:, col], x[i][:, 4 - col])
    with pytest.raises(ValueError):
        apply_flips(x, np.array([True]))
