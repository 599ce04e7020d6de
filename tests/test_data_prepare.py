"""`ddpm data prepare`: decode once, then train on exactly the batches the folder gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_cli import run
from ddpm.data import open_dataset
from ddpm.datasets.prepared import PreparedDataset, labels_path, sidecar
from ddpm.prepare import prepare
from ddpm.errors import DataError
from ddpm.training.batches import BatchSource


def make_class_folder(root: Path, n_per_class: int = 5, seed: int = 0) -> Path:
    """Two classes (subfolders 'cats', 'apples'), RGB and grey, square and not, 20..37 pixels."""
    rng = np.random.default_rng(seed)
    for cls in ("cats", "apples"):
        for k in range(n_per_class):
            w, h = 20 + int(rng.integers(0, 18)), 20 + int(rng.integers(0, 18))
            if k % 3 == 0:
                im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
            else:
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            (root / cls).mkdir(parents=True, exist_ok=True)
            im.save(root / cls / f"{k:02d}.png")
    return root


def test_prepared_file_gives_exactly_the_folders_batches(tmp_path):
    src = make_class_folder(tmp_path / "imgs")
    out = tmp_path / "p.npy"
    meta = prepare(str(src), out, 16, 3)
    folder = open_dataset(str(src), "train", 16, 3)
    prepared = open_dataset(str(out), "train", 16, 3)
    assert isinstance(prepared, PreparedDataset) and len(prepared) == len(folder) == 10
    assert prepared.class_names == folder.class_names == ("apples", "cats")
    assert np.array_equal(prepared.labels, folder.labels) and list(prepared.labels) == [0] * 5 + [1] * 5
    assert meta["count"] == 10 and meta["resolution"] == 16 and meta["channels"] == 3
    assert json.loads(sidecar(out).read_text())["class_names"] == ["apples", "cats"]
    # the same training batches, flips and epoch boundaries included (batch 4 of 10 images)
    a = BatchSource(folder, 4, seed=3, flip=True)
    b = BatchSource(prepared, 4, seed=3, flip=True)
    for _ in range(7):
        assert torch.equal(a.next(), b.next())
    assert isinstance(prepared.array, np.memmap)  # read without decoding, memory-mapped


def test_prepared_grey_is_repeated_into_rgb_like_the_folder(tmp_path):
    src = make_class_folder(tmp_path / "imgs", n_per_class=3)
    out = tmp_path / "g.npy"
    prepare(str(src), out, 8, 1)
    assert np.array_equal(open_dataset(str(out), "train", 8, 1).take(np.arange(6)),
                          open_dataset(str(src), "train", 8, 1).take(np.arange(6)))
    assert np.array_equal(open_dataset(str(out), "train", 8, 3).take(np.arange(6)),
                          np.repeat(open_dataset(str(src), "train", 8, 1).take(np.arange(6)), 3, axis=3))
    rgb = tmp_path / "c.npy"
    prepare(str(src), rgb, 8, 3)
    with pytest.raises(DataError, match="prepared with 3 channels, but the model wants 1.*--channels 1"):
        open_dataset(str(rgb), "train", 8, 1)


def _damage(tmp_path, how: str) -> Path:
    src = make_class_folder(tmp_path / "imgs", n_per_class=3)
    out = tmp_path / "p.npy"
    prepare(str(src), out, 8, 3)
    data = bytearray(out.read_bytes())
    if how == "truncated":
        out.write_bytes(bytes(data[:-5]))
    elif how == "flipped":
        data[-1] ^= 1
        out.write_bytes(bytes(data))
    return out


def test_truncated_or_changed_prepared_file_is_refused_in_one_line(tmp_path, capsys):
    out = _damage(tmp_path / "t", "truncated")
    with pytest.raises(DataError, match="truncated"):
        open_dataset(str(out), "train", 8, 3)
    rc, _, err = run(["train", "--data", str(out), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "truncated" in err and "ddpm data prepare" in err
    out = _damage(tmp_path / "f", "flipped")
    with pytest.raises(DataError, match="sha256"):
        open_dataset(str(out), "train", 8, 3)


def test_prepared_file_of_another_resolution_is_refused_in_one_line(tmp_path, capsys):
    out = _damage(tmp_path, "none")
    with pytest.raises(DataError, match="prepared at 8x8, but the model wants 16x16"):
        open_dataset(str(out), "train", 16, 3)
    rc, _, err = run(["train", "--data", str(out), "--resolution", "16", "--out", str(tmp_path / "r"),
                      "--dry-run"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "prepared at 8x8" in err
    assert not (tmp_path / "r").exists()


def test_cli_prepare_writes_files_and_refuses_to_overwrite(tmp_path, capsys):
    src = make_class_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "ds.npy"
    rc, text, err = run(["data", "prepare", str(src), str(out), "--resolution", "16", "--no-progress"], capsys)
    assert rc == 0, err
    assert "4 images" in text and "2 classes" in text and f"--data {out}" in text
    meta = json.loads(sidecar(out).read_text())
    assert meta["channels"] == 3  # some images are RGB -> colour by default
    assert meta["source"] == str(src.resolve()) and len(meta["sha256"]) == 64
    assert np.load(labels_path(out)).tolist() == [0, 0, 1, 1]
    before = out.read_bytes()
    rc, _, err = run(["data", "prepare", str(src), str(out), "--resolution", "8", "--no-progress"], capsys)
    assert rc == 2 and "already exists" in err and out.read_bytes() == before
    rc, _, err = run(["data", "prepare", str(src), str(tmp_path / "x.npz"), "--resolution", "8"], capsys)
    assert rc == 2 and ".npy" in err


def test_train_from_prepared_file_uses_its_resolution(tmp_path, capsys):
    src = make_class_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "ds.npy"
    prepare(str(src), out, 16, 1)
    from argparse import Namespace

    from ddpm.commands.train import resolve_train_config

    cfg = resolve_train_config(Namespace(preset=None, data=str(out), out=None, resume=None, overrides=[],
                                         size="tiny", resolution=None, device="cpu"))
    assert cfg.model.resolution == 16 and cfg.model.in_channels == 1
