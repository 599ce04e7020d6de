"""v-prediction (Salimans & Ho, ICLR 2022, section 4): v = alpha_t eps - sigma_t x0.

The conversions are checked against the angle form written out independently here: with
phi_t = atan(sigma_t / alpha_t), (x_t, v) = R(phi) (x0, eps), i.e.
    x_t = cos(phi) x0 + sin(phi) eps,   v = cos(phi) eps - sin(phi) x0,
    x0 = cos(phi) x_t - sin(phi) v,     eps = sin(phi) x_t + cos(phi) v.
Everything downstream (bound, samplers, guidance) is checked by equivalence: a v network and the
eps network that is its exact conversion (eps = sin(phi) x_t + cos(phi) v, wrapped here) must give
the same bits/dim terms and the same samples. Those comparisons run in float64, where both paths
round at ~1e-16 relative; the largest intermediate of the eps path is x_t / alpha_t with
alpha_{T-1} ~ 0.0067 for the digits schedule (|x_t| <= ~5 -> ~750), so each step's x0 differs by
~1e-13 and K <= 20 steps by < 1e-11. We assert 1e-9 (100x margin); a wrong formula is O(0.1-1) off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm import samplers
from ddpm.config import PRESETS, get_preset
from ddpm.diffusion import GaussianDiffusion
from ddpm.rng import ImageNoise
from ddpm.samplers.base import Chain, Denoiser
from ddpm.sampling import sample, space_timesteps
from ddpm.schedule import get_beta_schedule
from ddpm.vpred import v_from_eps, v_from_x0, v_from_x0_eps, x0_eps_from_v

# The digits preset's schedule: T = 200, linear 5e-4..0.1 (abar_{T-1} ~ 4.5e-5, alpha ~ 0.0067).
BETAS = get_beta_schedule("linear", 200, 5e-4, 0.1)
SHAPE = (1, 6, 6)
F64_ATOL = 1e-9


def phi(t: torch.Tensor) -> torch.Tensor:
    """The angle phi_t = atan(sigma_t / alpha_t), from the betas directly, float64 [B, 1, 1, 1]."""
    abar = np.cumprod(1.0 - BETAS)
    ang = np.arctan2(np.sqrt(1.0 - abar), np.sqrt(abar))
    return torch.as_tensor(ang, dtype=torch.float64)[t].view(-1, 1, 1, 1)


def v_net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A smooth nonlinear stand-in for a v network (depends on x, t and optionally a label)."""
    tt = t.view(-1, 1, 1, 1).to(x.dtype)
    out = 0.7 * torch.tanh(1.3 * x) - 0.4 * x * torch.cos(tt / 37.0) + 0.1 * torch.sin(tt / 11.0)
    if y is not None:
        out = out + 0.25 * torch.cos(y.view(-1, 1, 1, 1).to(x.dtype) + x)
    return out


def eps_net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The eps network that is v_net's exact conversion: eps = sin(phi) x_t + cos(phi) v."""
    p = phi(t).to(x.dtype)
    return torch.sin(p) * x + torch.cos(p) * v_net(x, t, y)


def pair(**kw) -> tuple[GaussianDiffusion, GaussianDiffusion]:
    return GaussianDiffusion(BETAS, mean_type="v", **kw), GaussianDiffusion(BETAS, mean_type="eps", **kw)


def data(B: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((B, *SHAPE), generator=g, dtype=torch.float64) * 2 - 1)


# ---------------------------------------------------------------------------------------------- conversions

def test_conversions_match_the_angle_form():
    d, _ = pair()
    x0, g = data(4), torch.Generator().manual_seed(1)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 57, 150, 199])
    p = phi(t)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(xt, torch.cos(p) * x0 + torch.sin(p) * eps, rtol=0, atol=1e-13)
    v = d.v_from_xstart_eps(x0, eps, t)
    torch.testing.assert_close(v, torch.cos(p) * eps - torch.sin(p) * x0, rtol=0, atol=1e-13)
    # the inverse on an arbitrary v (not only the true one)
    w = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_w, eps_w = d.xstart_eps_from_v(xt, w, t)
    torch.testing.assert_close(x0_w, torch.cos(p) * xt - torch.sin(p) * w, rtol=0, atol=1e-13)
    torch.testing.assert_close(eps_w, torch.sin(p) * xt + torch.cos(p) * w, rtol=0, atol=1e-13)
    # round trips and the pure functions
    a, s = d.alpha_sigma(t, x0)
    torch.testing.assert_close(x0_eps_from_v(xt, v, a, s)[0], x0, rtol=0, atol=1e-13)
    torch.testing.assert_close(v_from_eps(xt, eps, a, s), v, rtol=0, atol=1e-10)  # 1/alpha ~ 150
    torch.testing.assert_close(v_from_x0(xt, x0, a, s), v, rtol=0, atol=1e-10)    # 1/sigma at t=0 ~ 45
    torch.testing.assert_close(v_from_x0_eps(x0, eps, a, s), v, rtol=0, atol=0)
    # p_mean_variance's x0 (unclipped) and the clipped one
    out = d.p_mean_variance(None, xt, t, clip_denoised=False, model_output=w)["pred_xstart"]
    torch.testing.assert_close(out, torch.cos(p) * xt - torch.sin(p) * w, rtol=0, atol=1e-13)
    clipped = d.p_mean_variance(None, xt, t, clip_denoised=True, model_output=w)["pred_xstart"]
    torch.testing.assert_close(clipped, out.clamp(-1, 1), rtol=0, atol=0)


def test_predict_xstart_eps_for_every_mean_type():
    d, e = pair()
    x0, g = data(4), torch.Generator().manual_seed(2)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 57, 150, 199])
    xt = d.q_sample(x0, t, eps)
    v = d.v_from_xstart_eps(x0, eps, t)
    for diff, out in ((d, v), (e, eps), (GaussianDiffusion(BETAS, mean_type="xstart"), x0)):
        got_x0, got_eps = diff.predict_xstart_eps(out, xt, t)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-10)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)


def test_v_loss_is_snr_plus_one_weighted_x0_error():
    """L_simple on v: ||v - v_hat||^2 = (1 + SNR_t) ||x0 - x0_hat||^2 = (1 + 1/SNR_t) ||eps - eps_hat||^2."""
    d, _ = pair()
    x0, g = data(4), torch.Generator().manual_seed(3)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 40, 120, 199])
    loss = d.training_losses(lambda x, tt: v_net(x, tt), x0, t, noise=eps)
    p = phi(t)
    xt = torch.cos(p) * x0 + torch.sin(p) * eps
    v_hat = v_net(xt, t)
    want = ((torch.cos(p) * eps - torch.sin(p) * x0 - v_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    x0_hat = torch.cos(p) * xt - torch.sin(p) * v_hat
    eps_hat = torch.sin(p) * xt + torch.cos(p) * v_hat
    snr = (1 / torch.tan(p) ** 2).view(-1)
    torch.testing.assert_close(loss, (1 + snr) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3)), rtol=1e-9, atol=0)
    torch.testing.assert_close(loss, (1 + 1 / snr) * ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3)), rtol=1e-9, atol=0)


def test_digits_v_preset_is_digits_with_v():
    v, base = get_preset("digits_v"), PRESETS["digits"]
    assert v.diffusion.mean_type == "v" and v.preset == "digits_v"
    assert (v.model, v.data, v.train) == (base.model, base.data, base.train)
    assert v.diffusion == type(base.diffusion)(**{**base.diffusion.__dict__, "mean_type": "v"})


# ---------------------------------------------------------------------------------------------- the bound

@pytest.mark.parametrize("clip", [False, True])
def test_bound_of_v_model_equals_bound_of_its_eps_conversion(clip):
    x0 = (torch.round((data(2, seed=4) + 1) * 127.5) / 127.5 - 1)  # the 256-level grid
    results = []
    for d, net in zip(pair(), (v_net, eps_net)):
        results.append(d.calc_bpd_loop(net, x0, clip_denoised=clip, seeds=[5, 6]))
    a, b = results
    torch.testing.assert_close(a["terms_bpd"], b["terms_bpd"], rtol=0, atol=F64_ATOL)
    torch.testing.assert_close(a["mse"], b["mse"], rtol=0, atol=F64_ATOL)
    torch.testing.assert_close(a["total_bpd"], b["total_bpd"], rtol=0, atol=F64_ATOL)
    # the check can fail: the v process reading the eps network's output is a different bound
    wrong = pair()[0].calc_bpd_loop(eps_net, x0, clip_denoised=clip, seeds=[5, 6])
    assert (wrong["total_bpd"] - a["total_bpd"]).abs().min() > 0.1


# ---------------------------------------------------------------------------------------------- samplers

def run_f64(d: GaussianDiffusion, net, name: str, nfe: int, clip: bool, eta: float = 0.0, guidance=None,
            kwargs=None, null=None) -> torch.Tensor:
    cls = samplers.get(name)
    kept = tuple(space_timesteps(d.num_timesteps, cls.chain_steps(nfe), "quadratic"))
    chain = Chain(d, kept, torch.device("cpu"), clip_denoised=clip, eta=eta, dtype=torch.float64)
    noise = ImageNoise([11, 12, 13], SHAPE, torch.device("cpu"), torch.float64)
    x = noise.next()
    return cls(chain).run(Denoiser(net, chain, 3, model_kwargs=kwargs, guidance=guidance, null_kwargs=null),
                          x, noise)


@pytest.mark.parametrize("name", samplers.names())
@pytest.mark.parametrize("clip", [True, False])
def test_every_sampler_on_v_model_equals_it_on_the_converted_eps_model(name, clip):
    dv, de = pair()
    for nfe in (6, 20):
        got = run_f64(dv, v_net, name, nfe, clip, eta=0.5)
        want = run_f64(de, eps_net, name, nfe, clip, eta=0.5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=F64_ATOL)
    # sensitivity: reading the eps network as v gives other samples
    assert (run_f64(dv, eps_net, name, 6, clip) - want).abs().max() > 1e-2


def test_every_sampler_in_float32_through_sample():
    """The public path (float32 coefficients, FastModel): the eps path's x_T/alpha_{T-1} ~ 750 carries
    ~750 * 6e-8 = 4.5e-5 of rounding into x0 at the first step, and each later step adds less (alpha
    grows); with clipping contracting, 10 steps stay within 10 * 4.5e-5 ~ 5e-4."""
    dv, de = pair()
    v32 = lambda x, t: v_net(x, t)  # noqa: E731
    for name in samplers.names():
        kw = dict(sampler=name, steps=10, spacing="quadratic", eta=0.0)
        got = sample(dv, v32, SHAPE, [1, 2], **kw)
        want = sample(de, eps_net, SHAPE, [1, 2], **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=5e-4, msg=name)


def test_guidance_mixes_v_as_it_mixes_eps():
    """Classifier-free guidance at fixed x_t: out_u + W (out_c - out_u) of v converts to the same mix of eps."""
    dv, de = pair()
    y = torch.tensor([1, 4, 7])
    null = {"y": torch.full((3,), 10)}
    for W in (0.0, 1.0, 3.0):
        got = run_f64(dv, v_net, "ddim", 8, True, guidance=W, kwargs={"y": y}, null=null)
        want = run_f64(de, eps_net, "ddim", 8, True, guidance=W, kwargs={"y": y}, null=null)
        torch.testing.assert_close(got, want, rtol=0, atol=F64_ATOL)
    cond = run_f64(dv, v_net, "ddim", 8, True, kwargs={"y": y})
    torch.testing.assert_close(run_f64(dv, v_net, "ddim", 8, True, guidance=1.0, kwargs={"y": y}, null=null),
                               cond, rtol=0, atol=F64_ATOL)


def test_analytic_gamma_reads_eps_of_a_v_model():
    from ddpm.analytic import estimate_gamma

    dv, de = pair()
    x0 = data(4, seed=9)
    a = estimate_gamma(dv, v_net, x0, batch_size=2, seed=3)
    b = estimate_gamma(de, eps_net, x0, batch_size=2, seed=3)
    np.testing.assert_allclose(a["gamma"], b["gamma"], rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------- diffusers parity

T = 1000
TS = (0, 1, 2, 10, 500, 998, 999)
PSHAPE = (2, 3, 8, 8)
F32_ATOL = 1e-6  # a few float32 ulps at |x| ~ 1..3 (the order of float32 operations differs)


def _inputs(t: int, d: GaussianDiffusion):
    g = torch.Generator().manual_seed(2000 + t)
    x0 = torch.rand(PSHAPE, generator=g) * 2 - 1
    xt = d.q_sample(x0, torch.full((PSHAPE[0],), t), noise=torch.randn(PSHAPE, generator=g))
    return xt, torch.randn(PSHAPE, generator=g)  # a model output that is not the true v: clipping is exercised


def test_ddpm_step_matches_diffusers_v_prediction():
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(get_beta_schedule("linear", T), mean_type="v", var_type="fixedsmall")
    s = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_small",
                                clip_sample=True, prediction_type="v_prediction")
    s.alphas_cumprod = torch.tensor(d.alphas_cumprod)  # our float64 schedule (see test_scheduler_parity)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    ours = samplers.get("ancestral")(Chain(d, tuple(range(T)), torch.device("cpu"), clip_denoised=True))
    for t in TS:
        xt, v = _inputs(t, d)
        ref = s.step(v, t, xt, generator=torch.Generator().manual_seed(t))
        z = torch.randn(PSHAPE, generator=torch.Generator().manual_seed(t))
        got, x0 = ours.step(t, xt, v, z)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=0, atol=F32_ATOL)
        torch.testing.assert_close(got, ref.prev_sample, rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_v_prediction(eta):
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(get_beta_schedule("linear", T), mean_type="v")
    kept = space_timesteps(T, 50, "trailing")
    ours = samplers.get("ddim")(Chain(d, tuple(kept), torch.device("cpu"), clip_denoised=True, eta=eta))
    s = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                                set_alpha_to_one=True, timestep_spacing="trailing", prediction_type="v_prediction")
    s.alphas_cumprod = torch.tensor(d.alphas_cumprod)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(50)
    assert sorted(s.timesteps.tolist()) == list(kept)
    for k in (49, 48, 25, 1, 0):
        t = kept[k]
        xt, v = _inputs(t, d)
        ref = s.step(v, t, xt, eta=eta, use_clipped_model_output=True,
                     generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(PSHAPE, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours.step(k, xt, v, z)[0], ref, rtol=0, atol=F32_ATOL)


def test_training_target_matches_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(get_beta_schedule("linear", T), mean_type="v")
    s = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type="v_prediction")
    s.alphas_cumprod = torch.tensor(d.alphas_cumprod)
    x0, eps = _inputs(7, d)
    t = torch.tensor([0, 999])
    want = s.get_velocity(x0, eps, t)
    torch.testing.assert_close(d.v_from_xstart_eps(x0, eps, t), want, rtol=0, atol=F32_ATOL)
    assert math.isclose(float(d.alpha_sigma(t, x0)[0][1]), math.sqrt(d.alphas_cumprod[999]), rel_tol=1e-6)
