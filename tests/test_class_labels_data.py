"""Class labels from every data source: digits, CIFAR-10, class subfolders, .npz label arrays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddpm.conditioning import dataset_labels
from ddpm.data import digits_labels, open_dataset
from ddpm.errors import DataError

from test_data import fake_cifar_batches, write_cifar


def test_digits_have_their_ten_classes():
    for split in ("train", "test"):
        ds = open_dataset("digits", split, 8, 1)
        np.testing.assert_array_equal(ds.labels, digits_labels(split))
        assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
        np.testing.assert_array_equal(dataset_labels(ds, 10), digits_labels(split))
    with pytest.raises(DataError, match=r"label 9 is outside 0\.\.4"):
        dataset_labels(open_dataset("digits", "test", 8, 1), 5)


@pytest.mark.parametrize("kind", ["tar.gz", "folder"])
def test_cifar_keeps_its_labels_in_batch_order(tmp_path, kind):
    batches = fake_cifar_batches(n=3, seed=1)
    path = write_cifar(tmp_path, batches, kind)
    train = open_dataset(str(path), "train", 32, 3)
    want = np.concatenate([batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)])
    np.testing.assert_array_equal(train.labels, want)
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck" and train.num_classes == 10
    test = open_dataset(str(path), "test", 16, 1)  # resized / grey: labels unchanged
    np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])


def test_cifar_without_labels_is_unlabelled_and_bad_labels_are_refused(tmp_path):
    batches = fake_cifar_batches(n=2)
    for b in batches.values():
        del b[b"labels"]
    ds = open_dataset(str(write_cifar(tmp_path / "a", batches)), "test", 32, 3)
    assert ds.labels is None and ds.num_classes == 0
    with pytest.raises(DataError, match="has no class labels"):
        dataset_labels(ds, 10)
    batches = fake_cifar_batches(n=2)
    batches["test_batch"][b"labels"] = [3, 12]
    with pytest.raises(DataError, match=r"test_batch.*outside 0\.\.9"):
        open_dataset(str(write_cifar(tmp_path / "b", batches)), "test", 32, 3)


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_folder_subfolders_are_classes_in_sorted_order(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "zebra" / "a.png", 10)
    _png(root / "cat" / "b.png", 20)
    _png(root / "cat" / "deep" / "c.png", 30)  # nested: the top-level folder is the class
    _png(root / "dog" / "d.png", 40)
    ds = open_dataset(str(root), "train", 8, 3)
    assert ds.class_names == ("cat", "dog", "zebra") and ds.num_classes == 3
    # files sorted by relative path: cat/b, cat/deep/c, dog/d, zebra/a
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 2])
    assert [int(ds[i][0, 0, 0]) for i in range(4)] == [20, 30, 40, 10]
    with pytest.raises(DataError, match=r"label 2 is outside 0\.\.1"):
        dataset_labels(ds, 2)
    _png(root / "loose.png", 50)  # an image in the root: no longer one class per subfolder
    flat = open_dataset(str(root), "train", 8, 3)
    assert flat.labels is None
    with pytest.raises(DataError, match=f"'{root}' has no class labels"):
        dataset_labels(flat, 3)


@pytest.mark.parametrize("key", ["arr_1", "labels", "y"])
def test_npz_label_arrays(tmp_path, key):
    x = np.zeros((4, 6, 6, 1), dtype=np.uint8)
    y = np.array([3, 0, 2, 1], dtype=np.int32)
    path = tmp_path / "d.npz"
    if key == "arr_1":
        np.savez(path, x, y)
    else:
        np.savez(path, images=x, **{key: y})
    ds = open_dataset(str(path), "train", 6, 1)
    np.testing.assert_array_equal(ds.labels, y)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 4
    np.testing.assert_array_equal(dataset_labels(ds, 4), y)


def test_npz_without_or_with_bad_labels(tmp_path):
    x = np.zeros((3, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", x)
    np.save(tmp_path / "plain.npy", x)
    for name in ("plain.npz", "plain.npy"):
        ds = open_dataset(str(tmp_path / name), "train", 6, 1)  # unconditional use is unaffected
        assert ds.labels is None
        with pytest.raises(DataError, match=f"{name}' has no class labels"):
            dataset_labels(ds, 10)
    for bad in (np.array([0.5, 1.0, 2.0]), np.array([0, 1]), np.array([[0, 1, 2]]), np.array([0, -1, 2])):
        np.savez(tmp_path / "bad.npz", x, bad)
        ds = open_dataset(str(tmp_path / "bad.npz"), "train", 6, 1)  # opening still works
        with pytest.raises(DataError, match="bad.npz' array 'arr_1'"):
            ds.labels
