"""Analytic-DPM (Bao et al. 2022): Gamma_n from the point-mass oracle, sigma*^2 against hand
derivations (the DDPM reduction and exact Gaussian data, full and respaced chains, DDIM-type
lambda), the samplers' ``var: analytic`` and the paired bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpm.analytic import analytic_variance, bound_bpd, estimate_gamma, read_gamma, write_gamma
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import SamplingOptionError
from ddpm.rng import ImageNoise
from ddpm.sampling import sample, space_timesteps
from ddpm.schedule import get_beta_schedule

T = 40
BETAS = get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.02 * 1000 / T)
EPS64 = 2.0 ** -53


class PointMassEps:
    """Data = one image x*: the optimal eps-predictor (x_t - sqrt(abar) x*) / sqrt(1 - abar)
    returns exactly the noise that made x_t."""

    def __init__(self, d: GaussianDiffusion, xstar: torch.Tensor):
        self.sa = torch.tensor(d.sqrt_alphas_cumprod)
        self.s1 = torch.tensor(d.sqrt_one_minus_alphas_cumprod)
        self.xstar = xstar

    def __call__(self, x, t):
        a = self.sa.to(x.dtype)[t].view(-1, 1, 1, 1)
        b = self.s1.to(x.dtype)[t].view(-1, 1, 1, 1)
        return (x - a * self.xstar.to(x.dtype)) / b


def _xstar():
    return (torch.tensor([0, 40, 128, 200, 255, 17], dtype=torch.float64) / 127.5 - 1).view(1, 1, 2, 3)


def test_gamma_of_the_point_mass_oracle_is_the_mean_square_of_its_noise_draws():
    d = GaussianDiffusion(BETAS)
    xs = _xstar()
    N, seed = 5, 7
    x0 = xs.expand(N, -1, -1, -1).contiguous()
    est = estimate_gamma(d, PointMassEps(d, xs), x0, batch_size=2, seed=seed)
    # Hand derivation: eps_theta(x_n) = the draw z_n, so Gamma_n = mean_k ||z_{k,n}||^2 / d, with
    # image k's draws in descending n from ImageNoise(seed + k).
    noise = ImageNoise(range(seed, seed + N), xs.shape[1:], "cpu", torch.float32)
    sq = np.zeros((N, T))
    for n in range(T - 1, -1, -1):
        sq[:, n] = noise.next().double().pow(2).mean(dim=(1, 2, 3)).numpy()
    # float64: (x - a x*)/b recovers z with error ~ a few ulps of (|a x*| + b|z|)/b <= 1 + 1/b_min
    # times |z|; squared, relative ~ 8 * 2^-53 * (1 + 1/b_min) per element.
    bmin = float(d.sqrt_one_minus_alphas_cumprod[0])
    tol = 8 * EPS64 * (1 + 1 / bmin) * sq.max() * 4
    np.testing.assert_allclose(est["gamma"], sq.mean(0), rtol=0, atol=tol)
    np.testing.assert_allclose(est["stderr"], sq.std(0, ddof=1) / np.sqrt(N), rtol=1e-9, atol=tol)
    assert est["n"] == N
    # batch size does not change any image's draws
    est5 = estimate_gamma(d, PointMassEps(d, xs), x0, batch_size=5, seed=seed)
    np.testing.assert_allclose(est5["gamma"], est["gamma"], rtol=0, atol=tol)


def _ddpm_hand(abar: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """The DDPM reduction of Theorem 1 written out: beta~ + beta^2/(alpha (1 - abar)) (1 - Gamma),
    clipped to [beta~, min(beta/alpha, beta~ + coef1^2)]."""
    abar_prev = np.append(1.0, abar[:-1])
    alpha = abar / abar_prev
    beta = 1 - alpha
    tilde = beta * (1 - abar_prev) / (1 - abar)
    coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
    raw = tilde + beta ** 2 / (alpha * (1 - abar)) * (1 - gamma)
    return np.clip(raw, tilde, np.minimum(beta / alpha, tilde + coef1 ** 2))


@pytest.mark.parametrize("steps", [None, 7])
def test_ddpm_variance_matches_the_hand_reduction_full_and_respaced(steps):
    d = GaussianDiffusion(BETAS)
    kept = list(range(T)) if steps is None else space_timesteps(T, steps, "trailing")
    rng = np.random.default_rng(0)
    gamma = rng.uniform(-0.2, 1.2, T)  # also outside [0, 1], so both clips act
    got = analytic_variance(d, gamma, kept)
    want = _ddpm_hand(d.alphas_cumprod[kept], gamma[kept])
    np.testing.assert_allclose(got, want, rtol=64 * EPS64, atol=0)
    # Gamma = 1 (the point-mass oracle's expectation): the exact posterior variance beta~
    ones = analytic_variance(d, np.ones(T), kept)
    abar = d.alphas_cumprod[kept]
    abar_prev = np.append(1.0, abar[:-1])
    np.testing.assert_allclose(ones, (1 - abar / abar_prev) * (1 - abar_prev) / (1 - abar), rtol=16 * EPS64, atol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [None, 6])
def test_gaussian_data_variance_is_the_exact_reverse_conditional(eta, steps):
    """x0 ~ N(0, s^2 I): the optimal eps-predictor is linear, Gamma_n = (1-abar)/(abar s^2 + 1-abar),
    and the best variance of the step x_{n-1} = sqrt(abar_prev) x0^ + sqrt(1-abar_prev-lam^2) eps^ + noise
    is lam^2 + A^2 Var(x0 | x_n), A = sqrt(abar_prev) - sqrt(1-abar_prev-lam^2) sqrt(abar/(1-abar))
    (the x0-coefficient of the generalized posterior mean), Var(x0|x_n) = s^2 (1-abar)/(abar s^2 + 1-abar)."""
    d = GaussianDiffusion(BETAS)
    s2 = 0.25
    kept = list(range(T)) if steps is None else space_timesteps(T, steps, "trailing")
    gamma = (1 - d.alphas_cumprod) / (d.alphas_cumprod * s2 + 1 - d.alphas_cumprod)
    abar = d.alphas_cumprod[kept]
    abar_prev = np.append(1.0, abar[:-1])
    lam2 = eta ** 2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    A = np.sqrt(abar_prev) - np.sqrt(1 - abar_prev - lam2) * np.sqrt(abar / (1 - abar))
    want = lam2 + A ** 2 * s2 * (1 - abar) / (abar * s2 + 1 - abar)
    got = analytic_variance(d, gamma, kept, lam2=lam2)
    # cancellation in A near abar_prev -> abar: a few ulps of the terms over the result
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=64 * EPS64)


def _toy(x, t):  # per-pixel, batch independent
    return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("steps", [None, 8])
def test_ancestral_with_gamma_one_equals_the_fixedsmall_chain(steps):
    big, small = GaussianDiffusion(BETAS, var_type="fixedlarge"), GaussianDiffusion(BETAS, var_type="fixedsmall")
    kw = dict(shape=(1, 2, 2), seeds=range(3), steps=steps)
    a = sample(big, _toy, sampler="ancestral", sampler_options={"var": "analytic", "gamma": np.ones(T)}, **kw)
    b = sample(small, _toy, sampler="ancestral", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample(big, _toy, sampler="ancestral", **kw)
    assert not torch.equal(a, c)  # the option does change the chain
    # Gamma = 0: the largest variance, beta/alpha, differs again
    e = sample(big, _toy, sampler="ancestral", sampler_options={"var": "analytic", "gamma": np.zeros(T)}, **kw)
    assert not torch.equal(e, c)


def test_ddim_eta1_with_gamma_one_is_plain_ddim_and_eta0_adds_noise():
    d = GaussianDiffusion(BETAS)
    kw = dict(shape=(1, 2, 2), seeds=range(3), steps=10, sampler="ddim")
    plain = sample(d, _toy, eta=1.0, **kw)
    ana = sample(d, _toy, eta=1.0, sampler_options={"var": "analytic", "gamma": np.ones(T)}, **kw)
    # sigma* = lambda exactly in float64; the float32 coefficient tables may differ by 1 ulp
    torch.testing.assert_close(ana, plain, rtol=0, atol=64 * 2.0 ** -24)
    det = sample(d, _toy, eta=0.0, **kw)
    noisy = sample(d, _toy, eta=0.0, sampler_options={"var": "analytic", "gamma": np.full(T, 0.5)}, **kw)
    assert (noisy - det).abs().max() > 1e-3


def test_bad_options_are_one_line_errors():
    d = GaussianDiffusion(BETAS)
    with pytest.raises(SamplingOptionError, match="gamma"):
        sample(d, _toy, (1, 2, 2), [0], sampler_options={"var": "analytic"})
    with pytest.raises(SamplingOptionError, match="var"):
        sample(d, _toy, (1, 2, 2), [0], sampler_options={"var": "optimal"})
    with pytest.raises(SamplingOptionError, match="40 finite"):
        sample(d, _toy, (1, 2, 2), [0], sampler="ddim", sampler_options={"var": "analytic", "gamma": np.ones(3)})


@pytest.mark.parametrize("steps", [None, 9])
def test_bound_with_the_oracle_gamma_equals_the_fixedsmall_bound(steps):
    """Point mass, Gamma = 1: sigma*^2 = beta~ in every KL term and the decoder floor beta~_2, so
    the analytic bound is the fixedsmall one; fixedlarge's KL terms are larger."""
    d = GaussianDiffusion(BETAS)
    xs = _xstar()
    kept = None if steps is None else space_timesteps(T, steps, "trailing")
    x0 = xs.expand(2, -1, -1, -1).contiguous()
    r = bound_bpd(d, PointMassEps(d, xs), x0, np.ones(T), timesteps=kept)
    # beta~ computed two ways in float64 (a few ulps apart) in each of the <= T log-variances
    torch.testing.assert_close(r["analytic"], r["fixedsmall"], rtol=8 * T * EPS64, atol=0)
    assert torch.all(r["fixedlarge"] > r["fixedsmall"])
    # the full chain's fixed bound agrees with GaussianDiffusion.calc_bpd_loop (same noise)
    if steps is None:
        for var in ("fixedsmall", "fixedlarge"):
            dv = GaussianDiffusion(BETAS, var_type=var)
            ref = dv.calc_bpd_loop(PointMassEps(dv, xs), x0, clip_denoised=False, seeds=[0, 1])["total_bpd"]
            torch.testing.assert_close(r[var], ref, rtol=1e-10, atol=1e-10)


def test_gamma_store_is_keyed_on_the_checkpoint(tmp_path):
    path = tmp_path / "analytic_var.json"
    est = {"gamma": np.linspace(0, 1, 4), "stderr": np.zeros(4), "n": 3, "seed": 0}
    key = {"checkpoint": "ckpt_1.safetensors", "sha256": "ab", "step": 1, "T": 4}
    write_gamma(path, key, est)
    write_gamma(path, {**key, "sha256": "cd", "step": 2}, {**est, "gamma": np.ones(4)})
    np.testing.assert_array_equal(read_gamma(path, key), est["gamma"])
    np.testing.assert_array_equal(read_gamma(path, {**key, "sha256": "cd", "step": 2}), np.ones(4))
    assert read_gamma(path, {**key, "T": 5}) is None
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_nll_steps_without_analytic_is_a_one_line_error(tmp_path, capsys):
    from ddpm.cli import main

    out = tmp_path / "nll.json"
    rc = main(["eval", "nll", "--ckpt", str(tmp_path), "--steps", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--steps needs --var analytic" in err and "\n" not in err and not out.exists()
