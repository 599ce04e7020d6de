"""FID / IS / KID statistics and the compute_fid plumbing (with a stand-in feature extractor)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from ddpm.errors import UserError
from ddpm.evaluate import fid
from ddpm.evaluate.fid import (compute_fid, feature_statistics, frechet_distance, inception_score, kid,
                               load_samples, rank_seeds)
from ddpm.images import to_model


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small matrices: threaded BLAS only spins when other test processes share the 2 cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(params=["scipy", "eigh"])
def sqrt_backend(request, monkeypatch):
    if request.param == "eigh":
        monkeypatch.setattr(fid, "_scipy_linalg", None)
    else:
        assert fid._scipy_linalg is not None
    return request.param


def _random_orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_identical_statistics_give_zero(sqrt_backend):
    feats = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


@pytest.mark.parametrize("commuting", [False, True])
def test_closed_form_for_commuting_covariances(sqrt_backend, commuting):
    d = 12
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    q = _random_orthogonal(d, 6) if commuting else np.eye(d)  # same eigenbasis => S1 S2 = S2 S1
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_scipy_and_eigh_agree_on_general_covariances(monkeypatch):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10))
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    with_scipy = frechet_distance(m1, s1, m2, s2)
    monkeypatch.setattr(fid, "_scipy_linalg", None)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(with_scipy, rel=1e-8)


def test_feature_statistics():
    x = np.random.default_rng(4).normal(size=(50, 3))
    mu, sigma = feature_statistics(x)
    c = x - x.mean(0)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, c.T @ c / 49)


def test_kid_linear_kernel_by_hand():
    """Degree 1, gamma 1, coef0 0 with all rows in the subset: the unbiased MMD² of a linear kernel."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(30, 4))
    m = 30
    sx, sy = x.sum(0), y.sum(0)
    within_x = (sx @ sx - (x * x).sum()) / (m * (m - 1))  # sum over i != j of x_i . x_j
    within_y = (sy @ sy - (y * y).sum()) / (m * (m - 1))
    expected = within_x + within_y - 2 * (sx / m) @ (sy / m)
    mean, std = kid(x, y, num_subsets=3, subset_size=m, degree=1, gamma=1.0, coef0=0.0)
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 0.05 * shifted_mean
    assert abs(same_mean) < 3 * same_std + 1e-3


def test_inception_score_limits():
    k = 10
    uniform = np.full((100, k), 1.0 / k)
    assert inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(np.zeros((100, k)), splits=10, kind="logits")[0] == pytest.approx(1.0)
    confident = np.tile(np.eye(k), (10, 1))  # every split holds each class once
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    mean_logits, _ = inception_score(60.0 * confident, splits=10)  # logits, detected as such
    assert mean_logits == pytest.approx(k, rel=1e-6)


def test_inception_score_by_hand():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    py = np.array([0.75, 0.25])
    kl1 = math.log(1.0 / py[0])
    kl2 = 0.5 * math.log(0.5 / py[0]) + 0.5 * math.log(0.5 / py[1])
    assert inception_score(p, splits=1)[0] == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# compute_fid plumbing


class StandIn:
    """A cheap feature extractor: per-channel means and a few pixel statistics as 'features'."""

    name = "stand-in-v1"

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        self.images += x.shape[0]
        f = x.double() / 255.0
        feats = torch.cat([f.mean((2, 3)), f.std((2, 3)), f[:, :, ::2, ::2].flatten(1)[:, :10]], 1)
        return feats.numpy(), feats[:, :4].numpy() * 5


def _digits(split, n=None):
    from ddpm.data import load_images

    return load_images("digits", split, 8, 1, n=n)


def test_compute_fid_plumbing_and_reference_cache(tmp_path):
    ex = StandIn()
    samples = _digits("test", 120)
    out = compute_fid(samples, "digits:train", cache_dir=tmp_path, extractor=ex, batch_size=50, is_splits=2)
    n_train = len(_digits("train"))
    assert out["n_samples"] == 120 and out["n_reference"] == n_train
    assert ex.images == n_train + 120  # reference computed once, samples once
    # Independent computation of the same FID.
    ref_feats, _ = ex(torch.from_numpy(_digits("train")).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous())
    s_feats, s_logits = ex(torch.from_numpy(samples).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous())
    expected = frechet_distance(*feature_statistics(s_feats), *feature_statistics(ref_feats))
    assert out["fid"] == pytest.approx(expected, rel=1e-6)
    assert out["is_mean"] == pytest.approx(inception_score(s_logits, splits=2)[0], rel=1e-6)
    assert out["kid_mean"] is not None

    cached = list((tmp_path / "fid").glob("*.npz"))
    assert len(cached) == 1
    ex2 = StandIn()
    out2 = compute_fid(samples, "digits:train", cache_dir=tmp_path, extractor=ex2, batch_size=50, is_splits=2)
    assert ex2.images == 120  # the reference statistics came from the cache
    assert out2["fid"] == pytest.approx(out["fid"], rel=1e-12)
    # The split can be given separately; the same statistics come from the cache.
    ex3 = StandIn()
    out3 = compute_fid(samples, "digits", split="train", cache_dir=tmp_path, extractor=ex3, is_splits=2)
    assert ex3.images == 120 and out3["fid"] == out2["fid"]
    # A different n (or split) is a different cache entry.
    compute_fid(samples, "digits:train", cache_dir=tmp_path, extractor=StandIn(), n_reference=200, with_kid=False)
    compute_fid(samples, "digits", split="test", cache_dir=tmp_path, extractor=StandIn(), with_kid=False)
    assert len(list((tmp_path / "fid").glob("*.npz"))) == 3
    with pytest.raises(UserError, match="names split 'train'"):
        compute_fid(samples, "digits:train", split="test", cache_dir=tmp_path, extractor=StandIn())


def test_float_samples_are_quantised_to_uint8(tmp_path):
    u8 = _digits("test", 60)
    x = to_model(u8)
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.9 / 127.5)
    stats = tmp_path / "ref.npz"
    ref = StandIn()(torch.from_numpy(_digits("train", 300)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous())[0]
    mu, sigma = feature_statistics(ref)
    np.savez(stats, mu=mu, sigma=sigma)
    a = compute_fid(u8, str(stats), extractor=StandIn(), is_splits=1)
    b = compute_fid(x + jitter, str(stats), extractor=StandIn(), is_splits=1)  # float, off-grid by < half a bin
    assert a["fid"] == b["fid"] and a["is_mean"] == b["is_mean"]
    np.testing.assert_array_equal(load_samples(x + jitter), u8)
    np.testing.assert_array_equal(load_samples((x + jitter).numpy()), u8)


def test_missing_torch_fidelity_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes every import of it fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UserError, match=r'pip install "ddpm\[fid\]"'):
        compute_fid(_digits("test", 4), "digits:train")


def test_missing_weights_says_which_file(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "_inception_class", lambda: object)
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        compute_fid(_digits("test", 4), "digits:train")
    msg = str(e.value)
    assert fid.INCEPTION_URL in msg and str(tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILENAME) in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="inception_weights=.*not found"):
        fid.resolve_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(UserError, match="DDPM_INCEPTION_WEIGHTS"):
        fid.resolve_inception_weights()
    (tmp_path / "env.pth").write_bytes(b"x")
    assert fid.resolve_inception_weights() == tmp_path / "env.pth"


def test_rank_seeds_partition():
    shards = [rank_seeds(10, 100, r, 3) for r in range(3)]
    assert shards == [[100, 101, 102], [103, 104, 105], [106, 107, 108, 109]]
    assert rank_seeds(10, 100) == list(range(100, 110))  # no process group: everything


def test_generate_samples_sharded_equals_single_process():
    from ddpm.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(np.linspace(1e-3, 0.2, 6))

    def model(x, t):
        return 0.5 * x

    full = fid.generate_samples(diffusion, model, 7, (1, 4, 4), seed=3, batch_size=4)
    parts = [fid.generate_samples(diffusion, model, 7, (1, 4, 4), seed=3, batch_size=2, rank=r, world_size=3,
                                  gather=False) for r in range(3)]
    assert full.dtype == np.uint8 and full.shape == (7, 4, 4, 1)
    np.testing.assert_array_equal(np.concatenate(parts), full)
    assert len(np.unique(full.reshape(7, -1), axis=0)) == 7  # distinct seeds, distinct images
