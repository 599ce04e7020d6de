"""Samplers: paper Algorithm 2 with oracles, respacing, DDIM, per-image seeds,
progressive x0 predictions, shared-latent chains and interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm import sample as top_level_sample
from ddpm.diffusion import GaussianDiffusion
from ddpm.rng import ImageNoise
from ddpm.samplers import get as get_sampler
from ddpm.samplers.base import Chain, Denoiser
from ddpm.sampling import interpolate, respace, sample, sample_chains, sample_progressive, space_timesteps
from ddpm.schedule import get_beta_schedule

T = 50
BETAS = get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


def make(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(BETAS, **kw)


class Toy:
    """A deterministic per-pixel model (mixes channels, depends on t); batch-size independent
    bit for bit, unlike a convolution. Records its inputs when ``record``."""

    def __init__(self, c_out: int = 1, record: bool = False):
        self.c_out, self.record, self.xs, self.ts = c_out, record, [], []

    def __call__(self, x, t):
        if self.record:
            self.xs.append(x.clone())
            self.ts.append(t.clone())
        s = x.sum(1, keepdim=True)
        tt = t.view(-1, 1, 1, 1).to(x.dtype)
        out = 0.7 * torch.tanh(x + 0.1 * s) + 0.3 * torch.sin(tt * 0.37)
        return out.repeat(1, self.c_out // x.shape[1], 1, 1) if self.c_out > x.shape[1] else out


class PointMassEps:
    """The optimal eps-predictor when the data are one image x*."""

    def __init__(self, d: GaussianDiffusion, xstar: torch.Tensor):
        self.sa, self.s1 = torch.tensor(d.sqrt_alphas_cumprod), torch.tensor(d.sqrt_one_minus_alphas_cumprod)
        self.xstar = xstar

    def __call__(self, x, t):
        a, b = (v.to(x)[t].view(-1, 1, 1, 1) for v in (self.sa, self.s1))
        return (x - a * self.xstar.to(x)) / b


class GaussianEps:
    """The optimal eps-predictor E[eps | x_t] for data x0 ~ N(m, s^2) per pixel."""

    def __init__(self, d: GaussianDiffusion, m: float, s: float):
        self.abar, self.m, self.s = torch.tensor(d.alphas_cumprod), m, s

    def __call__(self, x, t):
        ab = self.abar.to(x)[t].view(-1, 1, 1, 1)
        return torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * self.m) / (ab * self.s ** 2 + 1 - ab)


# ----------------------------------------------------------------------------------------------
# Oracles
def test_sampler_recovers_point_mass():
    d = make()
    xstar = (torch.tensor([0, 40, 128, 255], dtype=torch.float32) / 127.5 - 1).view(1, 2, 2)
    for kw in [{}, {"steps": 10}, {"sampler": "ddim", "steps": 7, "spacing": "linspace"}]:
        out = sample(d, PointMassEps(d, xstar), (1, 2, 2), [0, 1, 2], **kw)
        assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (3, 1, 2, 2)
        torch.testing.assert_close(out, xstar.expand(3, 1, 2, 2), rtol=0, atol=2e-6)


def _chain_moments(betas, m, s, fixed_var):
    """Exact mean/variance of the ancestral chain's output for Gaussian data and the optimal
    eps-model, by propagating the linear-Gaussian recursion from x_T ~ N(0, 1) (derived here)."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    mu, var = 0.0, 1.0
    for i in range(len(betas) - 1, -1, -1):
        k = math.sqrt(abar[i]) * s * s / (abar[i] * s * s + 1 - abar[i])  # x0_hat = m + k (x_t - sqrt(abar) m)
        a, b = c1[i] * k + c2[i], c1[i] * m * (1 - k * math.sqrt(abar[i]))
        mu, var = a * mu + b, a * a * var + (fixed_var[i] if i > 0 else 0.0)
    return mu, var


@pytest.mark.parametrize("var_type,m,s", [("fixedsmall", 0.4, 0.5), ("fixedlarge", 0.3, 1.0)])
def test_sampler_gaussian_data_moments(var_type, m, s):
    d = make(var_type=var_type)
    x = sample(d, GaussianEps(d, m, s), (1, 8, 8), range(1000), clip_denoised=False).double().flatten()
    n = x.numel()  # pixels are independent: the chain acts elementwise on iid noise
    abar = np.cumprod(1 - BETAS)
    post = BETAS * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    mu, var = _chain_moments(BETAS, m, s, post if var_type == "fixedsmall" else BETAS)
    se_mu, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert abs(x.mean().item() - mu) < 5 * se_mu
    assert abs(x.var().item() - var) < 5 * se_var
    if var_type == "fixedlarge":
        # sigma^2 = beta is exact for unit-variance data (paper section 3.2): the data's moments come back
        assert abs(x.mean().item() - m) < 5 * se_mu
        assert abs(x.var().item() - s * s) < 5 * se_var
    else:
        assert var < 0.9 * s * s  # beta~ underestimates the variance of non-degenerate data


# ----------------------------------------------------------------------------------------------
# Batching, seeds, respacing
def test_per_image_seeds_do_not_depend_on_batch_size():
    d = make()
    seeds = [5, 17, 3, 99, 0]
    full = sample(d, Toy(), (2, 3, 3), seeds)
    for bs in (1, 2):
        torch.testing.assert_close(sample(d, Toy(), (2, 3, 3), seeds, batch_size=bs), full, rtol=0, atol=0)
    assert torch.equal(top_level_sample(d, Toy(), (2, 3, 3), seeds[:2]), full[:2])
    # changing one image's seed changes that image only
    other = sample(d, Toy(), (2, 3, 3), [6, 17, 3, 99, 0])
    assert not torch.equal(other[0], full[0]) and torch.equal(other[1:], full[1:])


def test_respacing_all_steps_reproduces_the_plain_sampler_exactly():
    for var_type, loss in [("fixedlarge", "mse"), ("learned_range", "hybrid")]:
        d = make(var_type=var_type, loss_type=loss)
        model = Toy(d.model_output_channels(1))
        plain = sample(d, model, (1, 4, 4), [1, 2])
        for spacing in ("trailing", "leading", "linspace", "quadratic", "logsnr"):
            assert torch.equal(sample(d, model, (1, 4, 4), [1, 2], steps=T, spacing=spacing), plain)
    spaced, tmap = respace(make(), range(T))
    np.testing.assert_array_equal(spaced.betas, BETAS)
    assert tmap == list(range(T))


def test_respace_keeps_marginals_and_maps_timesteps():
    d = make(var_type="fixedsmall")
    use = space_timesteps(T, 8, "trailing")
    spaced, tmap = respace(d, use)
    assert tmap == use and spaced.num_timesteps == 8 and spaced.var_type == "fixedsmall"
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[use], rtol=1e-12)
    assert spaced.alphas_cumprod_prev[0] == 1.0
    # the network sees the original index s_k at chain step k
    seen = []
    denoise = Denoiser(lambda x, t: seen.append(t.clone()) or x, Chain(d, tuple(tmap), torch.device("cpu")), 3)
    for k in (0, 3, 7):
        denoise(torch.zeros(3, 1, 1, 1), k)
    assert [t.tolist() for t in seen] == [[use[k]] * 3 for k in (0, 3, 7)]


def test_space_timesteps_formulas():
    # trailing always keeps T-1 (diffusers' "trailing"); leading starts at 0; linspace has both ends
    assert space_timesteps(1000, 10, "trailing") == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert space_timesteps(1000, 10, "leading") == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert space_timesteps(1000, 10, "linspace") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # quadratic: DDIM's round(linspace(0, sqrt(0.8 T), K)^2); logsnr: both ends of the chain
    assert space_timesteps(1000, 5, "quadratic") == [0, 50, 200, 450, 800]
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert space_timesteps(1000, 5, "logsnr", abar)[::4] == [0, 999]
    for steps in (1, 3, 7, 50, 333, 999, 1000):
        for spacing in ("trailing", "leading", "linspace", "quadratic", "logsnr"):
            kept = space_timesteps(1000, steps, spacing, abar)
            assert len(kept) == steps and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] <= 999
        assert space_timesteps(1000, steps, "trailing")[-1] == 999
    with pytest.raises(ValueError, match="1..1000"):
        space_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="trailing, leading, linspace"):
        space_timesteps(1000, 10, "uniform")


def test_space_timesteps_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("trailing", "leading", "linspace"):
        for steps in (1, 7, 10, 50, 333, 1000):
            s = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            s.set_timesteps(steps)
            assert sorted(s.timesteps.tolist()) == space_timesteps(1000, steps, spacing), (spacing, steps)


# ----------------------------------------------------------------------------------------------
# DDIM
def _noise_list(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_ddim_eta1_step_is_the_ancestral_fixedsmall_step():
    d = make(var_type="fixedsmall")
    anc = stepper(d, "ancestral", clip_denoised=False, dtype=torch.float64)
    ddim = stepper(d, "ddim", eta=1.0, clip_denoised=False, dtype=torch.float64)
    x, z = _noise_list(2, (3, 2, 4, 4), 0)
    for k in (0, 1, 2, 25, 49):
        out = Toy()(x, torch.full((3,), k))
        a, xa = anc.step(k, x, out, z)
        b, xb = ddim.step(k, x, out, z)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xb, xa, rtol=0, atol=0)
    # ... and so are whole float32 chains with the same per-image noise (unclipped, this toy
    # model's chain grows to |x| ~ 100: compare relative to float32 rounding over 50 steps)
    anc32 = sample(d, Toy(), (1, 4, 4), [3, 4], clip_denoised=False)
    ddim32 = sample(d, Toy(), (1, 4, 4), [3, 4], sampler="ddim", eta=1.0, clip_denoised=False)
    torch.testing.assert_close(ddim32, anc32, rtol=1e-5, atol=1e-5)
    # with clipping on they agree as well (eps is recomputed from the clipped x0)
    torch.testing.assert_close(sample(d, Toy(), (1, 4, 4), [3, 4], sampler="ddim", eta=1.0),
                               sample(d, Toy(), (1, 4, 4), [3, 4]), rtol=0, atol=1e-5)


def stepper(d, name, eta=0.0, clip_denoised=True, dtype=torch.float32, timesteps=None):
    """The registered sampler ``name`` on the chain of ``d`` (every step unless ``timesteps``)."""
    kept = tuple(range(d.num_timesteps)) if timesteps is None else tuple(timesteps)
    return get_sampler(name)(Chain(d, kept, torch.device("cpu"), clip_denoised, eta, dtype))


class _ListNoise:
    def __init__(self, draws):
        self.draws = list(draws)

    def next(self):
        return self.draws.pop(0)


def _ddim_reference(abar_kept, x, model, tmap, clip):
    """Song et al. (2021) Eq. 12 with eta = 0, written out in float64."""
    for k in range(len(abar_kept) - 1, -1, -1):
        ab, ab_prev = abar_kept[k], (abar_kept[k - 1] if k > 0 else 1.0)
        eps = model(x, torch.full((x.shape[0],), tmap[k]))
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta0_is_deterministic_and_matches_eq12(clip):
    d = make()
    use = space_timesteps(T, 9, "trailing")
    _, tmap = respace(d, use)
    st = stepper(d, "ddim", eta=0.0, clip_denoised=clip, dtype=torch.float64, timesteps=use)
    x_T = _noise_list(1, (2, 1, 4, 4), 1)[0] * 1.5
    runs = [st.run(Denoiser(Toy(), st.chain, 2), x_T, _ListNoise(_noise_list(9, (2, 1, 4, 4), seed)))
            for seed in (10, 11)]
    assert torch.equal(runs[0], runs[1])  # the per-step noise is ignored
    ref = _ddim_reference(d.alphas_cumprod[use], x_T, Toy(), tmap, clip)
    torch.testing.assert_close(runs[0], ref, rtol=1e-10, atol=1e-12)


def test_stepper_runs_the_p_mean_variance_arithmetic():
    # the sampler's pre-gathered step equals p_mean_variance + sigma z, for every variance type
    x, z = (v.float() for v in _noise_list(2, (4, 1, 3, 3), 5))
    for var_type, loss in [("fixedlarge", "mse"), ("fixedsmall", "mse"), ("learned", "kl"),
                           ("learned_range", "hybrid")]:
        for mean_type in ("eps", "xstart", "xprev"):
            d = make(var_type=var_type, loss_type=loss, mean_type=mean_type)
            st = stepper(d, "ancestral")
            for k in (0, 1, 30, 49):
                t = torch.full((4,), k)
                out = Toy(d.model_output_channels(1))(x, t)
                got, x0 = st.step(k, x, out, z)
                p = d.p_mean_variance(None, x, t, model_output=out)
                want = p["mean"] + (k > 0) * torch.exp(0.5 * p["log_variance"]) * z
                assert torch.equal(x0, p["pred_xstart"])
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Progressive, chains, interpolation
def test_sample_progressive_records_x0_predictions():
    d = make()
    model = Toy(record=True)
    final, xs, ts = sample_progressive(d, model, (1, 3, 3), [7, 8], every=10)
    assert ts == [0, 10, 20, 30, 40] and xs.shape == (2, 5, 1, 3, 3)
    assert torch.equal(final, sample(d, Toy(), (1, 3, 3), [7, 8]))
    assert torch.equal(xs[:, 0], final)  # slot 0 (i = 0) is the final sample
    for j, i in enumerate(ts):
        step = T - 1 - i  # model.xs[step] is the x_t the network saw at index i
        assert model.ts[step][0].item() == i
        want = d.p_mean_variance(model, model.xs[step], model.ts[step])["pred_xstart"]
        torch.testing.assert_close(xs[:, j], want, rtol=0, atol=0)
    _, xs, ts = sample_progressive(d, Toy(), (1, 3, 3), [7], every=50)
    assert ts == [0] and xs.shape == (1, 1, 1, 3, 3)
    _, _, ts = sample_progressive(d, Toy(), (1, 3, 3), [7], every=2, steps=10)
    assert ts == [4, 14, 24, 34, 44]  # original timesteps of chain steps 0, 2, 4, 6, 8 (trailing)


def test_sample_chains_share_noise_until_the_split():
    d = make()
    model = Toy(record=True)
    splits = (0, 10, 30, T)
    out = sample_chains(d, model, (1, 3, 3), seed=4, n=3, split_steps=splits)
    assert out.shape == (4, 3, 1, 3, 3)
    assert torch.equal(out, sample_chains(d, Toy(), (1, 3, 3), seed=4, n=3, split_steps=splits))
    assert torch.equal(out[3, 0], out[3, 1]) and torch.equal(out[3, 1], out[3, 2])  # all shared
    assert not torch.equal(out[0, 0], out[0, 1])
    xs = torch.stack(model.xs)  # [T, rows, ...], rows = split-major, chain-minor; xs[T-1-i] is x seen at i
    for r, s in enumerate(splits):
        rows = xs[:, r * 3:(r + 1) * 3]
        for i in range(T):
            same = torch.equal(rows[T - 1 - i, 0], rows[T - 1 - i, 1]) and torch.equal(rows[T - 1 - i, 1], rows[T - 1 - i, 2])
            # the input at step i was made by step i+1 (or is x_T); it is shared iff T - (i+1) <= s
            assert same == (i == T - 1 or T - (i + 1) <= s), (s, i)
    # every split starts from the same x_T
    assert torch.equal(xs[0, 0], xs[0, 3]) and torch.equal(xs[0, 0], xs[0, 9])


def test_interpolate_mixes_latents_with_shared_reverse_noise():
    d = make()
    a = torch.linspace(-1, 1, 16).view(1, 4, 4)
    b = -a.flip(-1)
    model = Toy(record=True)
    out = interpolate(d, model, a, b, t=20, lambdas=[0.0, 0.5, 0.5, 1.0], seed=3)
    assert out.shape == (4, 1, 4, 4) and len(model.xs) == 21 and model.ts[0].tolist() == [20] * 4
    assert torch.equal(out[1], out[2])  # same latent, same reverse noise
    x_t = model.xs[0]
    torch.testing.assert_close(x_t[1], 0.5 * (x_t[0] + x_t[3]), rtol=0, atol=1e-6)
    # the endpoints are q_sample(x0, 20) with independent noise
    e_a = (x_t[0] - d.sqrt_alphas_cumprod[20] * a) / d.sqrt_one_minus_alphas_cumprod[20]
    e_b = (x_t[3] - d.sqrt_alphas_cumprod[20] * b) / d.sqrt_one_minus_alphas_cumprod[20]
    assert (e_a - e_b).abs().max() > 0.1
    assert torch.equal(out, interpolate(d, Toy(), a, b, t=20, lambdas=[0.0, 0.5, 0.5, 1.0], seed=3))
    # a point-mass model decodes every mixture to x*, whatever lambda
    pm = interpolate(d, PointMassEps(d, a), a, b, t=T - 1, lambdas=[0.0, 0.3, 1.0], seed=0)
    torch.testing.assert_close(pm, a.expand(3, 1, 4, 4), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="0..49"):
        interpolate(d, Toy(), a, b, t=T, lambdas=[0.5], seed=0)


# ----------------------------------------------------------------------------------------------
def test_sampling_options_are_checked():
    d = make()
    with pytest.raises(ValueError, match="ancestral, ddim"):
        sample(d, Toy(), (1, 2, 2), [0], sampler="plms")
    with pytest.raises(ValueError, match="1..50"):
        sample(d, Toy(), (1, 2, 2), [0], steps=0)
    with pytest.raises(ValueError, match=">= 2"):
        sample(d, Toy(), (1, 2, 2), [0], steps=1)
    with pytest.raises(ValueError, match="trailing, leading, linspace"):
        sample(d, Toy(), (1, 2, 2), [0], spacing="even")
    with pytest.raises(ValueError, match="seeds"):
        sample(d, Toy(), (1, 2, 2), 3)
    with pytest.raises(ValueError, match="eta"):
        sample(d, Toy(), (1, 2, 2), [0], sampler="ddim", eta=-1)
    with pytest.raises(ValueError, match="expected"):
        sample(d, Toy(c_out=2), (1, 2, 2), [0])  # wrong channel count for a fixed variance


def test_amp_and_progress_paths_run():
    d = make()
    seen = []

    def model(x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.linear(x.flatten(1), torch.eye(x[0].numel()) * 0.5).view_as(x)

    out = sample(d, model, (1, 2, 2), [0, 1], amp_dtype=torch.bfloat16, progress=True, steps=5)
    assert out.dtype == torch.float32 and all(seen) and len(seen) == 5
    assert out.abs().max() <= 1
