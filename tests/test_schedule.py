"""Beta schedules and the precomputed buffers against test vectors computed from the paper's schedule (paper section 2 and 4, Eq. 4-7)."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.schedule import SCHEDULES, get_beta_schedule


def _close_to_printed(value: float, printed: str) -> bool:
    """|value - printed| within half a unit of the printed last digit (and at most 1e-8 when printed finer)."""
    d = Decimal(printed)
    half_ulp = 0.5 * 10.0 ** d.as_tuple().exponent
    return abs(value - float(d)) <= max(half_ulp, 1e-8 * abs(float(d))) * (1 + 1e-9)


# Spec section 3, "[derived] Numeric test vectors (float64)", linear schedule, T = 1000.
SPEC_VECTORS = {
    # i: (beta, abar, beta~, log beta~ clipped, coef1, coef2); None where the reference table has "-"
    0: ("1.0e-4", "0.9999", "0", "-9.81672514", "1.0", "0.0"),
    1: ("1.1991992e-4", "0.999780092", "5.45318766e-5", "-9.81672514", "0.5452915", "0.4547085"),
    2: ("1.3983984e-4", "0.999640283", "8.54891152e-5", "-9.36712150", None, None),
    499: ("1.00400400e-2", "7.85872429e-2", "1.00313554e-2", None, "3.07007e-3", "0.9941067"),
    999: ("0.02", "4.03582977e-5", "1.99999835e-2", "-3.91202383", "1.28351e-4", "0.98994868"),
}


@pytest.fixture(scope="module")
def paper():
    return GaussianDiffusion(get_beta_schedule("linear", 1000), var_type="fixedlarge")


def test_buffers_match_spec_test_vectors(paper):
    names = ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2")
    for i, row in SPEC_VECTORS.items():
        for name, printed in zip(names, row):
            if printed is None:
                continue
            arr = getattr(paper, name)
            assert arr.dtype == np.float64
            assert _close_to_printed(float(arr[i]), printed), (name, i, arr[i], printed)


def test_derived_buffers_and_ratios(paper):
    assert _close_to_printed(paper.sqrt_recipm1_alphas_cumprod[0], "0.0100005")
    assert _close_to_printed(paper.sqrt_recipm1_alphas_cumprod[999], "157.407")
    ratio = paper.betas / np.where(paper.posterior_variance > 0, paper.posterior_variance, np.nan)
    assert _close_to_printed(ratio[1], "2.199")
    assert _close_to_printed(ratio[2], "1.636")
    assert _close_to_printed(ratio[999], "1.0000008")
    # alphas_cumprod_prev is 1 at index 0 and abar shifted by one elsewhere (0-based time: docs/ARCHITECTURE.md).
    assert paper.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(paper.alphas_cumprod_prev[1:], paper.alphas_cumprod[:-1])
    # the remaining buffers against their definitions, computed here independently
    abar = np.cumprod(1 - paper.betas)
    np.testing.assert_allclose(paper.sqrt_alphas_cumprod, np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(paper.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(paper.log_one_minus_alphas_cumprod, np.log(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(paper.sqrt_recip_alphas_cumprod, 1 / np.sqrt(abar), rtol=1e-12)


def test_index0_log_variances(paper):
    # clipped posterior log-variance: index 0 takes beta~_2 (index 1), paper Eq. 4-7
    assert paper.posterior_log_variance_clipped[0] == paper.posterior_log_variance_clipped[1]
    assert _close_to_printed(paper.posterior_log_variance_clipped[0], "-9.81672514")
    # fixedlarge: beta_t for t >= 2 but beta~_2 = 5.453e-5 (not beta_1 = 1e-4) at index 0, paper section 3.2
    fl = paper.fixedlarge_variance
    assert _close_to_printed(math.log(fl[0]), "-9.81672514")
    assert _close_to_printed(fl[0], "5.453e-5")
    np.testing.assert_array_equal(fl[1:], paper.betas[1:])


def test_linear_quad_and_terminal_stats():
    lin = get_beta_schedule("linear", 1000)
    assert lin.dtype == np.float64 and lin.shape == (1000,)
    assert lin[0] == 1e-4 and lin[-1] == 0.02
    assert _close_to_printed(np.prod(1 - lin), "4.0358e-5")  # abar_T of the paper's linear schedule
    quad = get_beta_schedule("quad", 1000)
    assert math.isclose(quad[0], 1e-4, rel_tol=1e-12) and math.isclose(quad[-1], 0.02, rel_tol=1e-12)
    assert np.all(np.diff(np.sqrt(quad)) > 0) and np.allclose(np.diff(np.sqrt(quad), 2), 0, atol=1e-15)
    assert _close_to_printed(np.prod(1 - quad), "7.33e-4")


@pytest.mark.parametrize("name,frac", [("warmup10", 0.1), ("warmup50", 0.5)])
def test_warmup(name, frac):
    b = get_beta_schedule(name, 200, 1e-3, 0.05)
    n = int(200 * frac)
    np.testing.assert_allclose(b[:n], np.linspace(1e-3, 0.05, n), rtol=1e-14)
    assert np.all(b[n:] == 0.05)


def test_const_and_jsd():
    assert np.all(get_beta_schedule("const", 10, 1e-4, 0.3) == 0.3)
    jsd = get_beta_schedule("jsd", 5)
    np.testing.assert_allclose(jsd, [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-15)
    assert jsd[-1] == 1.0  # abar_T = 0


def test_cosine_schedule_matches_formula_and_is_capped():
    T = 1000
    b = get_beta_schedule("cosine", T, beta_start=123.0, beta_end=456.0)  # ignores start/end
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    expected = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    np.testing.assert_allclose(b, expected, rtol=1e-12)
    assert b.max() == 0.999 and b[-1] == 0.999  # the last step would be ~1 without the cap
    assert b[0] < 1e-4  # cosine starts gentler than linear
    # uncapped part: abar follows f(t)/f(0)
    abar = np.cumprod(1 - b)
    np.testing.assert_allclose(abar[:900], np.array(f[1:901]) / f[0], rtol=1e-10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_valid(name):
    b = get_beta_schedule(name, 100, 1e-3, 0.2)
    assert b.dtype == np.float64 and b.shape == (100,)
    assert np.all(b > 0) and np.all(b <= 1)
    GaussianDiffusion(b)  # buffers build


def test_unknown_name_and_bad_range():
    with pytest.raises(ValueError) as e:
        get_beta_schedule("cosin", 10)
    msg = str(e.value)
    assert "cosin" in msg and all(n in msg for n in SCHEDULES) and "did you mean 'cosine'" in msg
    assert isinstance(e.value, ConfigError)
    with pytest.raises(ValueError, match="outside"):
        get_beta_schedule("linear", 10, 1e-4, 1.5)
    with pytest.raises(ValueError, match="outside"):
        get_beta_schedule("linear", 10, 0.0, 0.02)
    with pytest.raises(ValueError, match="num_timesteps"):
        get_beta_schedule("linear", 0)


def test_top_level_exports():
    import ddpm

    assert ddpm.get_beta_schedule is get_beta_schedule and ddpm.GaussianDiffusion is GaussianDiffusion


def test_from_config_uses_the_schedule():
    cfg = DiffusionConfig(num_timesteps=50, beta_schedule="quad", beta_start=2e-3, beta_end=0.3,
                          mean_type="xstart", var_type="fixedsmall", loss_type="kl")
    d = GaussianDiffusion.from_config(cfg)
    np.testing.assert_array_equal(d.betas, get_beta_schedule("quad", 50, 2e-3, 0.3))
    assert (d.num_timesteps, d.mean_type, d.var_type, d.loss_type) == (50, "xstart", "fixedsmall", "kl")
