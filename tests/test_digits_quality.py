"""The offline digits quality measure: classifier training, caching and the scores' direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.data import digits_labels, load_images
from ddpm.errors import DataError
from ddpm.evaluate import digits_quality as dq
from ddpm.images import to_model


@pytest.fixture(autouse=True)
def _one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A classifier trained once for this module, in its own cache folder."""
    d = tmp_path_factory.mktemp("ddpm_cache")
    clf = dq.load_classifier(d)
    assert clf["trained"]
    return d


def _noise(n=300, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)


def test_classifier_accuracy_on_test_split(cache):
    clf = dq.load_classifier(cache)
    x, y = load_images("digits", "test", 8, 1), digits_labels("test")
    _, probs = dq._forward(clf, dq._flat(x))
    acc = (probs.argmax(1) == y).mean()
    assert acc > 0.93
    assert float(clf["test_accuracy"]) == pytest.approx(acc)


def test_real_digits_score_well_and_noise_badly(cache):
    real = dq.digits_quality(load_images("digits", "train", 8, 1, n=300), cache)
    noise = dq.digits_quality(_noise(), cache)
    assert real["n"] == 300 and sum(real["class_histogram"]) == 300
    assert real["fd"] < 6.0 and real["confidence"] > 0.95  # measured: 4.32 for these 300 and real["balance"] > 0.95
    assert noise["fd"] > 50.0 and noise["confidence"] < 0.3
    assert noise["fd"] > 20 * real["fd"]
    # A blank canvas is not a digit either.
    blank = dq.digits_quality(np.zeros((50, 8, 8, 1), np.uint8), cache)
    assert blank["confidence"] < 0.5 and blank["fd"] > 20 * real["fd"]


def test_single_class_has_low_balance(cache):
    x, y = load_images("digits", "train", 8, 1), digits_labels("train")
    ones = dq.digits_quality(x[y == 1], cache)
    assert ones["class_histogram"][1] >= 0.9 * (y == 1).sum()
    assert ones["balance"] < 0.3 and ones["class_entropy"] < 1.0


def test_float_and_rgb_inputs(cache):
    u8 = load_images("digits", "test", 8, 1, n=40)
    ref = dq.digits_quality(u8, cache)
    assert dq.digits_quality(to_model(u8), cache) == ref  # float NCHW in [-1, 1]
    assert dq.digits_quality(np.repeat(u8, 3, axis=3), cache) == ref  # grey stored as RGB
    with pytest.raises(DataError, match="8x8"):
        dq.digits_quality(np.zeros((4, 16, 16, 1), np.uint8), cache)


def test_cache_reused_without_retraining(cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained although a valid cache exists")

    monkeypatch.setattr(dq, "train_classifier", boom)
    clf = dq.load_classifier(cache)
    assert not clf["trained"]
    assert dq.digits_quality(_noise(20), cache)["n"] == 20


def test_stale_cache_is_retrained(tmp_path, cache, monkeypatch):
    good = dq.load_classifier(cache)
    weights = {k: v for k, v in good.items() if k[0] in "wb" and k[1:].isdigit()}
    calls = []
    monkeypatch.setattr(dq, "train_classifier", lambda x, y: calls.append(1) or weights)
    first = dq.load_classifier(tmp_path)
    assert first["trained"] and calls == [1]
    assert not dq.load_classifier(tmp_path)["trained"] and calls == [1]
    # Pretend the cache was made from other training data: it must not be used.
    z = dict(np.load(first["path"]))
    z["data_sha256"] = np.array("0" * 64)
    np.savez(first["path"], **z)
    assert dq.load_classifier(tmp_path)["trained"] and calls == [1, 1]


def test_training_is_deterministic_and_leaves_global_rng_alone():
    x, y = load_images("digits", "train", 8, 1, n=200), digits_labels("train")[:200]
    state = torch.get_rng_state()
    a = dq.train_classifier(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    b = dq.train_classifier(x, y)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_reference_numbers(cache):
    ref = dq.digits_reference(cache, n_noise=200)
    assert ref["test_accuracy"] > 0.93
    assert abs(ref["test_vs_test"]["fd"]) < 1e-6
    assert ref["train_vs_test"]["fd"] < 0.05 * ref["noise_vs_test"]["fd"]


def test_agreement_with_requested_labels(cache):
    """Real test digits with their true labels agree at the classifier's test accuracy; with every
    label shifted by one they almost never agree; per-class numbers average to the overall one."""
    x, y = load_images("digits", "test", 8, 1), digits_labels("test")
    clf = dq.load_classifier(cache)
    true = dq.digits_quality(x, cache, labels=y)
    assert true["agreement"] == pytest.approx(float(clf["test_accuracy"]))
    counts = np.bincount(y, minlength=10)
    per = np.array(true["agreement_per_class"])
    assert np.average(per, weights=counts) == pytest.approx(true["agreement"])
    shifted = dq.digits_quality(x, cache, labels=(y + 1) % 10)
    assert shifted["agreement"] < 0.1
    assert "agreement" not in dq.digits_quality(x, cache)
    part = dq.digits_quality(x[y < 3], cache, labels=y[y < 3])
    assert part["agreement_per_class"][3:] == [None] * 7
    with pytest.raises(DataError, match="label 10 is outside"):
        dq.digits_quality(x[:4], cache, labels=np.array([0, 1, 2, 10]))
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        dq.digits_quality(x[:4], cache, labels=np.array([0, 1, 2]))
