"""Parity of our reverse steps with diffusers' DDPMScheduler / DDIMScheduler (test-only dependency).

diffusers keeps its schedule in float32, and its 1 - alphas_cumprod loses precision at small t
(cancellation: relative error ~ 6e-8 / (1 - abar), about 1e-4 at t = 2). So the step algorithms
are compared with our float64 alphas_cumprod placed into the scheduler (agreement to float32
rounding), and the stock scheduler separately, with a tolerance for its float32 schedule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.rng import ImageNoise
from ddpm.samplers import get as get_sampler
from ddpm.samplers.base import Chain
from ddpm.sampling import respace, sample, space_timesteps
from ddpm.schedule import get_beta_schedule

diffusers = pytest.importorskip("diffusers")

T = 1000
TS = (0, 1, 2, 10, 500, 998, 999)
SHAPE = (2, 3, 8, 8)
# a few float32 ulps at |x| ~ 1..3: the two implementations order the same float32 operations differently
F32_ATOL = 1e-6


def ddpm_scheduler(variance_type: str, diffusion: GaussianDiffusion | None = None):
    s = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                variance_type=variance_type, clip_sample=True, prediction_type="epsilon")
    if diffusion is not None:  # the same float64 schedule as ours
        s.alphas_cumprod = torch.tensor(diffusion.alphas_cumprod)
        s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def inputs(t: int, diffusion: GaussianDiffusion):
    g = torch.Generator().manual_seed(1000 + t)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    xt = diffusion.q_sample(x0, torch.full((SHAPE[0],), t), noise=torch.randn(SHAPE, generator=g))
    eps = torch.randn(SHAPE, generator=g)  # a model output (not the true noise: clipping is exercised)
    return xt, eps


def stepper(d, name, eta=0.0, timesteps=None):
    """The registered sampler ``name`` (clipping x0, float32) on d's chain: every step unless ``timesteps``."""
    kept = tuple(range(d.num_timesteps)) if timesteps is None else tuple(timesteps)
    return get_sampler(name)(Chain(d, kept, torch.device("cpu"), clip_denoised=True, eta=eta))


def diffusers_noise(seed: int) -> torch.Tensor:
    # DDPMScheduler.step draws randn_tensor(shape, generator=g) = torch.randn(shape, generator=g) on CPU
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small():
    return GaussianDiffusion(get_beta_schedule("linear", T), var_type="fixedsmall")


def test_ddpm_step_matches_diffusers_fixed_small(small):
    ours = stepper(small, "ancestral")
    sched = ddpm_scheduler("fixed_small", small)
    stock = ddpm_scheduler("fixed_small")
    for t in TS:
        xt, eps = inputs(t, small)
        ref = sched.step(eps, t, xt, generator=torch.Generator().manual_seed(t))
        got, x0 = ours.step(t, xt, eps, diffusers_noise(t))
        torch.testing.assert_close(got, ref.prev_sample, rtol=0, atol=F32_ATOL)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=0, atol=F32_ATOL)
        # the stock float32 schedule: off by its 1 - abar cancellation (observed <= 8.4e-5 at t = 2)
        ref32 = stock.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(got, ref32, rtol=0, atol=2e-4)
        # and the same step from p_mean_variance (the path the likelihood uses)
        p = small.p_mean_variance(None, xt, torch.full((SHAPE[0],), t), model_output=eps)
        torch.testing.assert_close(p["mean"] + (t > 0) * torch.exp(0.5 * p["log_variance"]) * diffusers_noise(t),
                                   ref.prev_sample, rtol=0, atol=F32_ATOL)
    # the stock scheduler's float32 abar is what differs (relative error ~3.6e-7 at T = 1000)
    rel = np.abs(stock.alphas_cumprod.double().numpy() / small.alphas_cumprod - 1).max()
    assert 1e-7 < rel < 1e-6


def test_fixed_large_differs_from_diffusers_only_at_index_0():
    large = GaussianDiffusion(get_beta_schedule("linear", T), var_type="fixedlarge")
    sched = ddpm_scheduler("fixed_large", large)
    ours_var = large.fixedlarge_variance
    theirs = np.array([float(sched._get_variance(t)) for t in range(T)])
    # t >= 1 (paper t >= 2): both use beta_t
    np.testing.assert_allclose(theirs[1:], ours_var[1:], rtol=1e-12)
    # index 0: diffusers uses beta_1 = 1e-4; the official rule uses beta~_2 = 5.453e-5 (paper section 3.2),
    # which gives a better decoder likelihood (1.31 vs 1.71 bits for a perfect interior pixel)
    assert theirs[0] == pytest.approx(1e-4, rel=1e-12)
    assert ours_var[0] == pytest.approx(large.posterior_variance[1], rel=1e-15)
    assert ours_var[0] == pytest.approx(5.4531877e-5, rel=1e-7) and theirs[0] / ours_var[0] > 1.8
    # fixed_small at index 0: diffusers clamps beta~_1 = 0 to 1e-20; ours keeps the clipped log beta~_2
    assert float(ddpm_scheduler("fixed_small", large)._get_variance(0)) == pytest.approx(1e-20)
    assert math.exp(large.posterior_log_variance_clipped[0]) == pytest.approx(5.4531877e-5, rel=1e-7)
    # neither difference changes a sample: no noise is added at index 0
    ours = stepper(large, "ancestral")
    for t in TS:
        xt, eps = inputs(t, large)
        ref = sched.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours.step(t, xt, eps, diffusers_noise(t))[0], ref, rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    d = GaussianDiffusion(get_beta_schedule("linear", T))
    _, tmap = respace(d, space_timesteps(T, 50, "trailing"))
    ours = stepper(d, "ddim", eta=eta, timesteps=tmap)
    s = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                                set_alpha_to_one=True, timestep_spacing="trailing", prediction_type="epsilon")
    s.alphas_cumprod = torch.tensor(d.alphas_cumprod)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(50)
    assert sorted(s.timesteps.tolist()) == tmap
    for k in (49, 48, 25, 1, 0):
        t = tmap[k]
        xt, eps = inputs(t, d)
        # improved-diffusion re-derives eps from the clipped x0: diffusers' use_clipped_model_output
        ref = s.step(eps, t, xt, eta=eta, use_clipped_model_output=True,
                     generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours.step(k, xt, eps, diffusers_noise(t))[0], ref, rtol=0, atol=F32_ATOL)


def test_ddim_eta0_chain_matches_a_diffusers_loop():
    d = GaussianDiffusion(get_beta_schedule("linear", T))

    def model(x, t):  # a smooth eps-model that depends on t
        return 0.8 * torch.tanh(x) + 0.2 * torch.cos(t.view(-1, 1, 1, 1).float() / 100)

    seeds, shape = [3, 4], (3, 4, 4)
    ours = sample(d, model, shape, seeds, sampler="ddim", steps=25, eta=0.0)
    s = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                                set_alpha_to_one=True, timestep_spacing="trailing")
    s.alphas_cumprod = torch.tensor(d.alphas_cumprod)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(25)
    x = ImageNoise(seeds, shape).next()  # our x_T: the first draw of each image's stream
    for t in s.timesteps.tolist():
        x = s.step(model(x, torch.full((2,), t)), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    # 25 steps of float32 rounding, each within F32_ATOL
    torch.testing.assert_close(ours, x, rtol=0, atol=25 * F32_ATOL)
