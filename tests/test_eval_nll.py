"""evaluate_nll: exact bits/dim over a dataset, checked against calc_bpd_loop and an analytic oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.evaluate.nll import NLLResult, evaluate_nll, merge_shards, nll_shard
from ddpm.images import to_model

T = 40
BETAS = np.linspace(1e-3, 0.2, T)
ABAR = np.cumprod(1.0 - BETAS)


def _x_star_u8() -> np.ndarray:
    """The oracle's fixed image, uint8 [4, 4, 1]: both edge values and interior values."""
    return np.array([0, 255, 1, 254, 128, 127, 3, 250, 0, 0, 255, 90, 200, 17, 64, 255],
                    dtype=np.uint8).reshape(4, 4, 1)


class Oracle:
    """eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t): the exact noise for data = {x*}."""

    def __init__(self, x_star_u8: np.ndarray):
        self.x_star = to_model(x_star_u8[None])  # [1, C, H, W]
        self.abar = torch.tensor(ABAR)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x_star) / (1 - a).sqrt()


def _images(n_random: int = 5) -> np.ndarray:
    """x* twice (indices 0 and 3) among random images, uint8 [N, 4, 4, 1]."""
    rnd = np.random.default_rng(0).integers(0, 256, size=(n_random, 4, 4, 1), dtype=np.uint8)
    xs = _x_star_u8()[None]
    return np.concatenate([xs, rnd[:2], xs, rnd[2:]])


@pytest.fixture(scope="module")
def setup():
    diffusion = GaussianDiffusion(BETAS, mean_type="eps", var_type="fixedsmall", loss_type="mse")
    images = _images()
    model = Oracle(_x_star_u8())
    result = evaluate_nll(model, diffusion, images, batch_size=3, seed=11, progress=False)
    # The same computation by hand: one batch, calc_bpd_loop directly, per-image seeds 11 + k.
    direct = diffusion.calc_bpd_loop(model, to_model(images), clip_denoised=True,
                                     seeds=[11 + k for k in range(len(images))])
    direct = {k: v.double().numpy() for k, v in direct.items()}
    return diffusion, images, model, result, direct


def test_matches_calc_bpd_loop_summed_by_hand(setup):
    _, images, _, r, d = setup
    n = len(images)
    assert r.n == n and r.num_timesteps == T
    by_hand_total = d["terms_bpd"].sum(1) + d["prior_bpd"]  # all T terms + L_T, per image
    np.testing.assert_allclose(r.per_image_total_bpd, by_hand_total, rtol=1e-5)
    assert r.total_bpd == pytest.approx(by_hand_total.mean(), rel=1e-5)
    assert r.prior_bpd == pytest.approx(d["prior_bpd"].mean(), rel=1e-5)
    assert r.decoder_bpd == pytest.approx(d["terms_bpd"][:, 0].mean(), rel=1e-5)
    assert r.rate_bpd == pytest.approx(d["prior_bpd"].mean() + d["terms_bpd"][:, 1:].sum(1).mean(), rel=1e-5)
    np.testing.assert_allclose(r.terms_bpd, d["terms_bpd"].mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r.mse, d["mse"].mean(0), rtol=1e-5, atol=1e-12)
    assert r.rate_bpd + r.decoder_bpd == pytest.approx(r.total_bpd, rel=1e-6)


def test_standard_error(setup):
    _, images, _, r, d = setup
    totals = d["terms_bpd"].sum(1) + d["prior_bpd"]
    assert r.total_bpd_stderr == pytest.approx(np.std(totals, ddof=1) / np.sqrt(len(images)), rel=1e-4)


def _phi(x: np.ndarray) -> np.ndarray:
    """The official code's tanh approximation of the standard normal CDF (paper Eq. 13)."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_oracle_terms_match_independent_computation(setup):
    """For x*, the oracle's mean is the true posterior mean: KL terms vanish (fixedsmall), the
    decoder is a discretised Gaussian centred on x* with std sqrt(beta~_2), and the prior is the
    closed-form KL of q(x_T|x*) from N(0, I)."""
    _, images, _, r, d = setup
    u = _x_star_u8().astype(np.float64).ravel()
    x = u / 127.5 - 1.0
    # beta~ at paper t = 2 (index 1); the decoder at index 0 uses it (index-0 clipping, docs/DEVIATIONS.md).
    var_dec = BETAS[1] * (1.0 - ABAR[0]) / (1.0 - ABAR[1])
    half_bin = 1.0 / 255.0 / math.sqrt(var_dec)
    p = np.where((u == 0) | (u == 255), _phi(half_bin), _phi(half_bin) - _phi(-half_bin))
    decoder = -np.log2(p).mean()
    m, v = math.sqrt(ABAR[-1]) * x, 1.0 - ABAR[-1]
    prior = (0.5 * (-1.0 - math.log(v) + v + m ** 2)).mean() / math.log(2.0)
    for k in (0, 3):  # the two copies of x*
        assert d["terms_bpd"][k, 0] == pytest.approx(decoder, rel=1e-4)
        assert np.abs(d["terms_bpd"][k, 1:]).max() < 1e-4
        assert d["prior_bpd"][k] == pytest.approx(prior, rel=1e-4)
        assert r.per_image_total_bpd[k] == pytest.approx(decoder + prior, rel=1e-4, abs=T * 1e-4)
        assert d["mse"][k].max() < 1e-10  # x̂0 = x* exactly (up to float32 round-off)
    # The other images are not x*: the oracle is a wrong model for them and pays for it.
    assert r.per_image_total_bpd[[1, 2, 4, 5, 6]].min() > decoder + prior + 1.0


def test_sharded_equals_unsharded(setup):
    diffusion, images, model, r, _ = setup
    shards = [nll_shard(model, diffusion, images, rank=k, world_size=2, batch_size=2, seed=11) for k in (0, 1)]
    assert [len(s["indices"]) for s in shards] == [3, 4]  # contiguous, N = 7 split unevenly
    merged = merge_shards(shards[::-1])  # order of arrival must not matter
    np.testing.assert_array_equal(merged.per_image_total_bpd, r.per_image_total_bpd)
    np.testing.assert_allclose(merged.terms_bpd, r.terms_bpd, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(merged.mse, r.mse, rtol=1e-12, atol=1e-18)
    for name in ("total_bpd", "total_bpd_stderr", "prior_bpd", "decoder_bpd", "rate_bpd"):
        assert getattr(merged, name) == pytest.approx(getattr(r, name), rel=1e-12), name


def test_merge_rejects_missing_images(setup):
    diffusion, images, model, _, _ = setup
    shard = nll_shard(model, diffusion, images, rank=0, world_size=2, seed=11)
    bad = dict(shard, indices=shard["indices"] + 1)  # indices 1..3: image 0 missing
    with pytest.raises(ValueError, match="exactly once"):
        merge_shards([bad])


def test_json_roundtrip(setup, tmp_path):
    _, _, _, r, _ = setup
    path = tmp_path / "nll" / "bpd.json"
    r.save(path)
    d = json.loads(path.read_text())
    assert d["n"] == r.n and len(d["terms_bpd"]) == T and len(d["mse"]) == T
    assert len(d["per_image_total_bpd"]) == r.n
    assert d["total_bpd"] == pytest.approx(r.total_bpd) and d["meta"]["seed"] == 11
    back = NLLResult.load(path)
    np.testing.assert_array_equal(back.terms_bpd, r.terms_bpd)
    assert back.summary() == r.summary()


def test_model_put_in_eval_mode_and_restored(setup):
    diffusion, images, _, _, _ = setup

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, t):
            self.seen.append(self.training)
            return torch.zeros_like(x)

    net = Net().train()
    evaluate_nll(net, diffusion, images[:2], progress=False)
    assert net.seen and not any(net.seen)
    assert net.training


def _gloo_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        diffusion = GaussianDiffusion(BETAS, mean_type="eps", var_type="fixedsmall", loss_type="mse")
        r = evaluate_nll(Oracle(_x_star_u8()), diffusion, _images(), batch_size=2, seed=11, progress=False)
        if rank == 1:  # every rank gets the merged result
            r.save(out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_real_two_process_gloo_run(setup, tmp_path):
    _, _, _, r, _ = setup
    out = tmp_path / "rank1.json"
    torch.multiprocessing.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = NLLResult.load(out)
    assert got.meta["world_size"] == 2
    np.testing.assert_array_equal(got.per_image_total_bpd, r.per_image_total_bpd)
    assert got.total_bpd == pytest.approx(r.total_bpd, rel=1e-12)
    np.testing.assert_allclose(got.terms_bpd, r.terms_bpd, rtol=1e-12, atol=1e-15)
