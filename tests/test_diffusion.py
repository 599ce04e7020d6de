"""Forward process, posterior, p_mean_variance and training losses (paper sections 2-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion, call_model
from ddpm.errors import ConfigError, UserError
from ddpm.schedule import get_beta_schedule

T = 50
BETAS = get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


def make(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(BETAS, **kw)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
def test_gather_in_float64_then_cast():
    d = GaussianDiffusion(get_beta_schedule("linear", 1000))
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 500, 999])
    got = d._extract("sqrt_recipm1_alphas_cumprod", t, x)
    assert got.dtype == torch.float32 and got.shape == (3, 1, 1, 1)
    want = torch.tensor(d.sqrt_recipm1_alphas_cumprod[[0, 500, 999]]).float().view(3, 1, 1, 1)
    assert torch.equal(got, want)  # float64 -> float32 cast, not float32 arithmetic
    got64 = d._extract("sqrt_recipm1_alphas_cumprod", t, x.double())
    assert got64.dtype == torch.float64 and torch.equal(got64.view(-1), torch.tensor(d.sqrt_recipm1_alphas_cumprod[[0, 500, 999]]))


def test_q_sample_moments_monte_carlo():
    d = make()
    n = 20000
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    for i in [0, 10, 49]:
        t = torch.full((n,), i)
        xt = d.q_sample(x0.expand(n, 1, 2, 2), t, noise=rand(n, 1, 2, 2, seed=i))
        mean_cf, var_cf = math.sqrt(np.prod(1 - BETAS[:i + 1])) * x0[0], 1 - np.prod(1 - BETAS[:i + 1])
        se_mean = math.sqrt(var_cf / n)
        assert ((xt.mean(0) - mean_cf).abs() < 5 * se_mean).all()
        se_var = var_cf * math.sqrt(2 / (n - 1))
        assert ((xt.var(0) - var_cf).abs() < 5 * se_var).all()
        m, v, lv = d.q_mean_variance(x0, torch.tensor([i]))
        torch.testing.assert_close(m, mean_cf.unsqueeze(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(v, torch.full_like(x0, var_cf), rtol=1e-12, atol=0)
        torch.testing.assert_close(lv, torch.full_like(x0, math.log(var_cf)), rtol=1e-12, atol=0)


def test_posterior_matches_bayes_product_of_gaussians():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), derived here in float64."""
    d = make()
    x0, xt = rand(6, 2, 3, 3, seed=1).clamp(-1, 1), rand(6, 2, 3, 3, seed=2)
    t = torch.tensor([1, 2, 5, 20, 48, 49])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for b, i in enumerate(t.tolist()):
        abar_prev, alpha = np.prod(1 - BETAS[:i]), 1 - BETAS[i]
        # prior N(sqrt(abar_prev) x0, 1 - abar_prev) times likelihood N(x_t; sqrt(alpha) x_{t-1}, beta)
        prec = 1 / (1 - abar_prev) + alpha / BETAS[i]
        post_var = 1 / prec
        post_mean = post_var * (math.sqrt(abar_prev) * x0[b] / (1 - abar_prev) + math.sqrt(alpha) * xt[b] / BETAS[i])
        torch.testing.assert_close(mean[b], post_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var[b], torch.full_like(xt[b], post_var), rtol=1e-10, atol=0)
        torch.testing.assert_close(log_var[b], torch.full_like(xt[b], math.log(post_var)), rtol=1e-10, atol=0)
    # t = 0 (paper t = 1): x_0 is known, so the posterior is a point mass at x0; the log is clipped
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.zeros(6, dtype=torch.int64))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=0)
    assert torch.all(var == 0)
    assert torch.all(log_var == math.log(d.posterior_variance[1]))


def test_eps_mean_without_clipping_is_eq11():
    d = make(var_type="fixedsmall")
    xt, eps = rand(5, 3, 4, 4, seed=3) * 2, rand(5, 3, 4, 4, seed=4)
    t = torch.tensor([0, 1, 17, 30, 49])
    out = d.p_mean_variance(None, xt, t, clip_denoised=False, model_output=eps)
    for b, i in enumerate(t.tolist()):
        beta, abar = BETAS[i], np.prod(1 - BETAS[:i + 1])
        eq11 = (xt[b] - beta / math.sqrt(1 - abar) * eps[b]) / math.sqrt(1 - beta)
        torch.testing.assert_close(out["mean"][b], eq11, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out["pred_xstart"][b], (xt[b] - math.sqrt(1 - abar) * eps[b]) / math.sqrt(abar),
                                   rtol=1e-12, atol=1e-13)


def test_clipping_and_last_step_mean_is_clipped_x0():
    d = make()
    xt, eps = rand(4, 1, 3, 3, seed=5) * 3, rand(4, 1, 3, 3, seed=6) * 3
    t = torch.tensor([0, 0, 9, 40])
    clipped = d.p_mean_variance(None, xt, t, clip_denoised=True, model_output=eps)
    raw = d.p_mean_variance(None, xt, t, clip_denoised=False, model_output=eps)
    torch.testing.assert_close(clipped["pred_xstart"], raw["pred_xstart"].clamp(-1, 1))
    assert (raw["pred_xstart"].abs() > 1).any()
    # at index 0, coef1 = 1 and coef2 = 0: the mean is the (clipped) x0 prediction (paper Eq. 7, Algorithm 2)
    torch.testing.assert_close(clipped["mean"][:2], clipped["pred_xstart"][:2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_fixed_variances(var_type):
    d = make(var_type=var_type)
    x = rand(T, 1, 2, 2, seed=7)
    out = d.p_mean_variance(None, x, torch.arange(T), model_output=torch.zeros_like(x))
    lv = out["log_variance"][:, 0, 0, 0].numpy()
    abar = np.cumprod(1 - BETAS)
    post = BETAS * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    if var_type == "fixedlarge":  # beta_t, except beta~_2 at index 0 (official rule)
        want = np.log(np.append(post[1], BETAS[1:]))
    else:  # beta~_t with the clipped log at index 0
        want = np.log(np.append(post[1], post[1:]))
    np.testing.assert_allclose(lv, want, rtol=1e-12)
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy()[1:], np.exp(want)[1:], rtol=1e-12)
    assert out["variance"].shape == x.shape and out["log_variance"].shape == x.shape


def test_learned_variances():
    x = rand(3, 2, 2, 2, seed=8)
    t = torch.tensor([0, 10, 49])
    raw = rand(3, 2, 2, 2, seed=9)
    d = make(var_type="learned", loss_type="kl")
    out = d.p_mean_variance(None, x, t, model_output=torch.cat([torch.zeros_like(x), raw], 1))
    torch.testing.assert_close(out["log_variance"], raw, rtol=0, atol=0)
    torch.testing.assert_close(out["variance"], raw.exp())
    d = make(var_type="learned_range", loss_type="hybrid")
    lo = torch.tensor(d.posterior_log_variance_clipped[[0, 10, 49]]).view(3, 1, 1, 1)
    hi = torch.tensor(np.log(BETAS[[0, 10, 49]])).view(3, 1, 1, 1)
    for v, want in [(-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2), (0.5, 0.75 * hi + 0.25 * lo)]:
        out = d.p_mean_variance(None, x, t, model_output=torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1))
        torch.testing.assert_close(out["log_variance"], want.expand_as(x), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="expected"):
        d.p_mean_variance(None, x, t, model_output=torch.zeros_like(x))  # C instead of 2C channels


def test_xstart_and_xprev_means():
    x, out = rand(3, 1, 3, 3, seed=10), rand(3, 1, 3, 3, seed=11) * 0.5
    t = torch.tensor([0, 5, 30])
    d = make(mean_type="xstart")
    r = d.p_mean_variance(None, x, t, clip_denoised=False, model_output=out)
    torch.testing.assert_close(r["pred_xstart"], out, rtol=0, atol=0)
    torch.testing.assert_close(r["mean"], d.q_posterior_mean_variance(out, x, t)[0], rtol=1e-12, atol=0)
    d = make(mean_type="xprev")
    r = d.p_mean_variance(None, x, t, clip_denoised=True, model_output=out)
    torch.testing.assert_close(r["mean"], out, rtol=0, atol=0)  # clipping never touches an xprev mean
    r = d.p_mean_variance(None, x, t, clip_denoised=False, model_output=out)
    # the reported x0 is the one whose posterior mean is the output
    torch.testing.assert_close(d.q_posterior_mean_variance(r["pred_xstart"], x, t)[0], out, rtol=1e-9, atol=1e-9)


def test_model_output_channels():
    assert make().model_output_channels(3) == 3
    assert make(var_type="learned_range", loss_type="hybrid").model_output_channels(3) == 6
    assert make(var_type="learned", loss_type="kl").model_output_channels(1) == 2


# ----------------------------------------------------------------------------------------------
class Affine(torch.nn.Module):
    """out = a * x + b (per output channel), enough to test losses and gradients."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.a = torch.nn.Parameter(torch.linspace(0.1, 0.5, c_out, dtype=torch.float64).view(1, -1, 1, 1))
        self.b = torch.nn.Parameter(torch.linspace(-0.2, 0.2, c_out, dtype=torch.float64).view(1, -1, 1, 1))
        self.c_in = c_in

    def forward(self, x, t):
        xx = x.repeat(1, self.a.shape[1] // self.c_in, 1, 1)
        return self.a * xx + self.b


def test_training_losses_mse_targets():
    x0, noise = rand(4, 2, 3, 3, seed=12).clamp(-1, 1), rand(4, 2, 3, 3, seed=13)
    t = torch.tensor([0, 3, 20, 49])
    for mean_type in ["eps", "xstart", "xprev"]:
        d = make(mean_type=mean_type)
        m = Affine(2, 2)
        loss = d.training_losses(m, x0, t, noise=noise)
        xt = d.q_sample(x0, t, noise)
        target = {"eps": noise, "xstart": x0, "xprev": d.q_posterior_mean_variance(x0, xt, t)[0]}[mean_type]
        want = ((target - m(xt, t)) ** 2).mean(dim=(1, 2, 3))  # a per-pixel mean, not a sum
        assert loss.shape == (4,)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    # float32 in, float32 out; with a zero model the eps-loss is the mean of eps^2 (about 1)
    d = make()
    loss = d.training_losses(lambda x, tt: torch.zeros_like(x), x0.float(), t, noise=noise.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (noise.float() ** 2).mean(dim=(1, 2, 3)))


def test_training_losses_kl_and_rescaled():
    x0, noise = rand(4, 1, 2, 2, seed=14).clamp(-1, 1), rand(4, 1, 2, 2, seed=15)
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    t = torch.tensor([0, 1, 25, 49])
    for var_type in ["fixedlarge", "learned"]:
        d = make(var_type=var_type, loss_type="kl")
        m = Affine(1, d.model_output_channels(1))
        xt = d.q_sample(x0, t, noise)
        vb = d.vb_terms_bpd(m, x0, xt, t, clip_denoised=False)["output"]
        torch.testing.assert_close(d.training_losses(m, x0, t, noise=noise), vb, rtol=0, atol=0)
        d2 = make(var_type=var_type, loss_type="rescaled_kl")
        torch.testing.assert_close(d2.training_losses(m, x0, t, noise=noise), vb * T, rtol=1e-12, atol=0)
    # the kl loss does not clip: with an out-of-range x0 prediction it differs from the clipped term
    d = make(loss_type="kl")
    far = lambda x, tt: torch.full_like(x, -50.0)
    xt = d.q_sample(x0, t, noise)
    assert not torch.allclose(d.training_losses(far, x0, t, noise=noise),
                              d.vb_terms_bpd(far, x0, xt, t, clip_denoised=True)["output"])


def test_hybrid_loss_value_and_stop_gradient():
    x0, noise = rand(3, 1, 2, 2, seed=16).clamp(-1, 1), rand(3, 1, 2, 2, seed=17)
    t = torch.tensor([0, 10, 40])
    d = make(var_type="learned_range", loss_type="hybrid")
    m = Affine(1, 2)
    loss = d.training_losses(m, x0, t, noise=noise)
    xt = d.q_sample(x0, t, noise)
    out = m(xt, t)
    mse = ((noise - out[:, :1]) ** 2).mean(dim=(1, 2, 3))
    vb = d.vb_terms_bpd(None, x0, xt, t, clip_denoised=False, model_output=out)["output"]
    torch.testing.assert_close(loss, mse + vb * T / 1000, rtol=1e-12, atol=0)
    # the VLB part only trains the variance: the mean channel's gradient is that of the MSE alone
    loss.sum().backward()
    g_hybrid = m.a.grad.clone()
    m.zero_grad()
    mse2 = ((noise - m(xt, t)[:, :1]) ** 2).mean(dim=(1, 2, 3))
    mse2.sum().backward()
    torch.testing.assert_close(g_hybrid[:, 0], m.a.grad[:, 0], rtol=1e-12, atol=0)
    assert g_hybrid[:, 1].abs().item() > 0 and m.a.grad[:, 1].abs().item() == 0


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_mse_with_learned_variance_is_rejected(var_type):
    with pytest.raises(ValueError) as e:
        make(var_type=var_type, loss_type="mse")
    msg = str(e.value)
    assert "loss_type='mse'" in msg and f"var_type='{var_type}'" in msg and "hybrid" in msg
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_hybrid_with_fixed_variance_is_rejected(var_type):
    with pytest.raises(ValueError) as e:
        make(var_type=var_type, loss_type="hybrid")
    msg = str(e.value)
    assert "loss_type='hybrid'" in msg and f"var_type='{var_type}'" in msg
    assert isinstance(e.value, ConfigError)


def test_valid_combinations_and_unknown_names():
    for v in ["fixedlarge", "fixedsmall", "learned", "learned_range"]:
        for loss in ["kl", "rescaled_kl"]:
            make(var_type=v, loss_type=loss)
    make(var_type="learned", loss_type="hybrid")
    make(mean_type="xprev", var_type="fixedsmall", loss_type="mse")
    with pytest.raises(ValueError, match=r"mean_type.*'epsilon'.*eps, xstart, xprev"):
        make(mean_type="epsilon")
    with pytest.raises(ValueError, match=r"did you mean 'fixedlarge'"):
        make(var_type="fixed_large")
    with pytest.raises(ValueError, match="loss_type"):
        make(loss_type="l2")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(np.array([0.1, 0.0, 0.2]))


def test_from_config_and_config_defaults():
    d = GaussianDiffusion.from_config(DiffusionConfig())
    assert d.num_timesteps == 1000 and d.var_type == "fixedlarge" and d.loss_type == "mse" and d.mean_type == "eps"
    np.testing.assert_array_equal(d.betas, np.linspace(1e-4, 0.02, 1000))


def test_call_model_autocast_and_cast_back():
    seen = {}

    def model(x, t):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return torch.nn.functional.linear(x.flatten(1), torch.eye(x[0].numel())).view_as(x)

    x = torch.randn(2, 1, 2, 2)
    out = call_model(model, x, torch.zeros(2, dtype=torch.int64), amp_dtype=torch.bfloat16)
    assert seen["autocast"] and out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=1e-2, atol=1e-2)  # bf16 has ~3 significant digits
    out = call_model(model, x, torch.zeros(2, dtype=torch.int64))
    assert not seen["autocast"] and torch.equal(out, x)
