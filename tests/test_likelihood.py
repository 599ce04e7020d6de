"""KL, the discretized decoder and the exact bits/dim loop (paper Eq. 5), including a
point-mass oracle whose bound is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.likelihood import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood, meanflat,
                             normal_kl)
from ddpm.schedule import get_beta_schedule

LN2 = math.log(2)
H = 1 / 255  # bin half-width


def phi_tanh(x: float) -> float:
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def phi_exact(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def decoder_nll_nats(level: int, mean: float, std: float) -> float:
    """-log P(level) for a Gaussian decoder, written out bin by bin (paper Eq. 13)."""
    x = level / 127.5 - 1
    lo, hi = (x - H - mean) / std, (x + H - mean) / std
    if level == 0:
        p = phi_tanh(hi)
    elif level == 255:
        p = 1 - phi_tanh(lo)
    else:
        p = phi_tanh(hi) - phi_tanh(lo)
    return -math.log(max(p, 1e-12))


# ----------------------------------------------------------------------------------------------
def test_meanflat():
    x = torch.arange(24.0).reshape(2, 3, 2, 2)
    torch.testing.assert_close(meanflat(x), torch.tensor([5.5, 17.5]))


def test_normal_kl_zero_and_closed_form():
    m = torch.randn(5, dtype=torch.float64)
    lv = torch.randn(5, dtype=torch.float64)
    assert torch.all(normal_kl(m, lv, m, lv).abs() < 1e-15)
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    for m1, s1, m2, s2 in [(0.3, 0.5, -1.0, 2.0), (0.0, 1.0, 0.0, 1e-2), (5.0, 3.0, 4.0, 0.7)]:
        want = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
        got = normal_kl(torch.tensor(m1, dtype=torch.float64), 2 * math.log(s1), m2, torch.tensor(2 * math.log(s2), dtype=torch.float64))
        assert math.isclose(got.item(), want, rel_tol=1e-12)
    # against N(0, 1) given as floats (how the prior term calls it)
    got = normal_kl(torch.tensor([0.5], dtype=torch.float64), torch.tensor([math.log(0.25)], dtype=torch.float64), 0.0, 0.0)
    assert math.isclose(got.item(), math.log(1 / 0.5) + (0.25 + 0.25) / 2 - 0.5, rel_tol=1e-12)


def test_approx_cdf_is_the_tanh_approximation():
    xs = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    got = approx_standard_normal_cdf(xs)
    exact = torch.tensor([phi_exact(v) for v in xs.tolist()], dtype=torch.float64)
    err = (got - exact).abs().max().item()
    # paper Eq. 13: the approximation's max abs error on [-6, 6] is 1.8e-4, so this is not erf
    assert 1.5e-4 < err < 2.0e-4
    torch.testing.assert_close(got, torch.tensor([phi_tanh(v) for v in xs.tolist()], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_decoder_probabilities_sum_to_one_over_256_bins():
    g = torch.Generator().manual_seed(1)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every bin centre
    for _ in range(20):
        mean = (torch.rand((), generator=g, dtype=torch.float64) * 2.4 - 1.2).item()
        log_scale = (torch.rand((), generator=g, dtype=torch.float64) * 6 - 6).item()  # std in [e^-6, 1]
        ll = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        total = ll.exp().sum().item()
        assert abs(total - 1.0) < 256 * 1e-12 + 1e-12, (mean, log_scale, total)


def test_decoder_matches_bin_by_bin_formula_including_edges():
    levels = [0, 1, 77, 128, 254, 255]
    x = torch.tensor([lv / 127.5 - 1 for lv in levels], dtype=torch.float64)
    for mean, std in [(0.0, 0.3), (-0.99, 0.01), (1.0, 0.007385), (0.2, 1e-4)]:
        got = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
        want = torch.tensor([-decoder_nll_nats(lv, mean, std) for lv in levels], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_decoder_bits_at_perfect_mean_match_spec():
    # paper Eq. 13: with sigma = sqrt(beta~_2) the interior-pixel NLL is 1.305 bits; with sqrt(beta_1), 1.713.
    # Those figures use the exact Phi; the tanh CDF (abs error <= 1.8e-4 at each bin edge) moves
    # them by at most 2 * 1.8e-4 / (P ln 2) bits.
    d = GaussianDiffusion(get_beta_schedule("linear", 1000))
    x = torch.tensor([128 / 127.5 - 1], dtype=torch.float64)
    for var, bits in [(d.posterior_variance[1], "1.305"), (d.betas[0], "1.713")]:
        std = math.sqrt(var)
        p_exact = phi_exact(H / std) - phi_exact(-H / std)
        assert f"{-math.log2(p_exact):.3f}" == bits
        nll = -discretized_gaussian_log_likelihood(x, x, torch.tensor([math.log(std)], dtype=torch.float64)) / LN2
        assert abs(nll.item() - -math.log2(p_exact)) <= 2 * 1.8e-4 / (p_exact * LN2)


# ----------------------------------------------------------------------------------------------
# Point-mass oracle: data = one fixed image x*. The optimal eps-predictor is
# eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t), so x0 predictions are exact.
class PointMassEps:
    def __init__(self, diffusion: GaussianDiffusion, xstar: torch.Tensor):
        self.sa = torch.tensor(diffusion.sqrt_alphas_cumprod)
        self.s1 = torch.tensor(diffusion.sqrt_one_minus_alphas_cumprod)
        self.xstar = xstar
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        a = self.sa.to(x.dtype)[t].view(-1, 1, 1, 1)
        b = self.s1.to(x.dtype)[t].view(-1, 1, 1, 1)
        return (x - a * self.xstar) / b


def _xstar(levels: list[int]) -> torch.Tensor:
    return (torch.tensor(levels, dtype=torch.float64) / 127.5 - 1).view(1, 1, 2, len(levels) // 2)


def _schedule_by_hand(betas: np.ndarray):
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return abar, betas * (1 - abar_prev) / (1 - abar)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_point_mass_oracle_bpd_matches_hand_derivation(var_type):
    T = 100
    betas = get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.02 * 1000 / T)
    d = GaussianDiffusion(betas, var_type=var_type)
    levels = [0, 3, 128, 200, 254, 255]
    xstar = _xstar(levels)
    out = d.calc_bpd_loop(PointMassEps(d, xstar), xstar, clip_denoised=True)
    abar, post_var = _schedule_by_hand(betas)

    # L_0: model mean = x* exactly, std = sqrt(beta~_2) for both fixed variances
    std0 = math.sqrt(post_var[1])
    dec = sum(decoder_nll_nats(lv, lv / 127.5 - 1, std0) for lv in levels) / len(levels) / LN2
    # L_i (i >= 1): same means; the KL is that of the variances only
    if var_type == "fixedsmall":
        kl = np.zeros(T - 1)
    else:
        r = post_var[1:] / betas[1:]
        kl = 0.5 * (-1 - np.log(r) + r) / LN2
    # L_T: KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1)) per pixel
    x2 = np.array([(lv / 127.5 - 1) ** 2 for lv in levels])
    prior = float(np.mean(0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x2))) / LN2

    terms = out["terms_bpd"][0].numpy()
    assert out["terms_bpd"].shape == (1, T) and out["mse"].shape == (1, T)
    assert math.isclose(terms[0], dec, rel_tol=1e-9)
    np.testing.assert_allclose(terms[1:], kl, rtol=1e-7, atol=1e-12)
    assert math.isclose(out["prior_bpd"].item(), prior, rel_tol=1e-9)
    assert math.isclose(out["total_bpd"].item(), dec + kl.sum() + prior, rel_tol=1e-9)
    assert out["mse"].abs().max().item() < 1e-20  # x0 predictions exact


def test_oracle_decoder_term_at_T1000_is_1p305_bits():
    # all-interior image, paper schedule: L_0 = 1.305 bits/dim (paper Eq. 13), KL terms 0 (fixedsmall)
    d = GaussianDiffusion(get_beta_schedule("linear", 1000), var_type="fixedsmall")
    xstar = _xstar([128, 50, 17, 200])
    out = d.calc_bpd_loop(PointMassEps(d, xstar), xstar)
    # 1.3057 with the tanh CDF (1.3054 with the exact Phi, see the test above)
    assert abs(out["terms_bpd"][0, 0].item() - 1.305) < 1e-3
    assert out["terms_bpd"][0, 1:].abs().max().item() < 1e-10
    assert 0 < out["prior_bpd"].item() < 1e-4  # L_T ~ 1e-5 bits/dim (paper)


def test_vb_terms_kl_against_closed_form_for_a_wrong_model():
    # a model predicting eps = 0 has x0_hat = x_t / sqrt(abar): the KL is that of two means
    T = 20
    betas = get_beta_schedule("linear", T, 1e-3, 0.1)
    d = GaussianDiffusion(betas, var_type="fixedsmall")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 7, 19])
    got = d.vb_terms_bpd(lambda x, tt: torch.zeros_like(x), x0, xt, t, clip_denoised=False)["output"]
    abar, post_var = _schedule_by_hand(betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    for b, i in enumerate(t.tolist()):
        c1 = betas[i] * math.sqrt(abar_prev[i]) / (1 - abar[i])
        c2 = (1 - abar_prev[i]) * math.sqrt(1 - betas[i]) / (1 - abar[i])
        true_mean = c1 * x0[b] + c2 * xt[b]
        model_mean = c1 * xt[b] / math.sqrt(abar[i]) + c2 * xt[b]
        want = ((true_mean - model_mean) ** 2 / (2 * post_var[i])).mean().item() / LN2
        assert math.isclose(got[b].item(), want, rel_tol=1e-10)


# ----------------------------------------------------------------------------------------------
class NoiseSpy:
    """eps-model returning a fixed function of (x, t) and recording every x it sees."""

    def __init__(self):
        self.xs, self.ts = [], []

    def __call__(self, x, t):
        self.xs.append(x.clone())
        self.ts.append(t.clone())
        return 0.1 * torch.tanh(x) * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / 10)


def test_bpd_loop_order_fresh_noise_and_per_image_seeds():
    T = 12
    d = GaussianDiffusion(get_beta_schedule("linear", T, 1e-2, 0.3))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() / 127.5 - 1
    spy = NoiseSpy()
    out = d.calc_bpd_loop(spy, x0, seeds=[10, 11, 12])
    # loop order i = T-1 .. 0, one call per i
    assert [t[0].item() for t in spy.ts] == list(range(T - 1, -1, -1))
    # fresh noise per i: recover eps from each x_t
    eps = [(x - d.sqrt_alphas_cumprod[t[0]] * x0) / d.sqrt_one_minus_alphas_cumprod[t[0]]
           for x, t in zip(spy.xs, spy.ts)]
    for a, b in zip(eps, eps[1:]):
        assert (a - b).abs().min() > 0
    # total = sum of terms + prior
    torch.testing.assert_close(out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-12, atol=0)
    # with seeds, image k's result does not depend on the batch it is in
    for k, s in enumerate([10, 11, 12]):
        one = d.calc_bpd_loop(NoiseSpy(), x0[k:k + 1], seeds=[s])
        for key in ("total_bpd", "terms_bpd", "mse", "prior_bpd"):
            torch.testing.assert_close(one[key][0], out[key][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per image"):
        d.calc_bpd_loop(NoiseSpy(), x0, seeds=[1, 2])


def test_bpd_loop_mse_is_of_clipped_prediction():
    T = 5
    d = GaussianDiffusion(get_beta_schedule("linear", T, 1e-2, 0.3))
    x0 = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    big = lambda x, t: torch.full_like(x, -1e3)  # x0_hat = huge positive -> clipped to 1
    out = d.calc_bpd_loop(big, x0, clip_denoised=True)
    torch.testing.assert_close(out["mse"], torch.full((1, T), 0.25, dtype=torch.float64))
    out = d.calc_bpd_loop(big, x0, clip_denoised=False)
    assert out["mse"].min() > 1e3
