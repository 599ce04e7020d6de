"""Editing real images (ddpm.editing): RePaint / replacement inpainting, SDEdit, DDIM inversion,
masks. Stand-in models (per pixel, so batch-invariant bit for bit) and T = 20..50 keep it fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.editing import ddim_decode, ddim_invert, inpaint, repaint_schedule, sdedit, slerp
from ddpm.editing.inpaint import count_calls
from ddpm.editing.masks import check_mask, load_mask, random_mask, region_mask
from ddpm.errors import DataError, SamplingOptionError, ConfigError
from ddpm.images import to_model, to_uint8
from ddpm.rng import ImageNoise
from ddpm.sampling import make_chain, sample
from ddpm.schedule import get_beta_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

T = 20
BETAS = get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.5)


def make(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(BETAS, **kw)


class Toy:
    """A deterministic per-pixel eps model depending on x and t (batch-invariant bit for bit)."""

    def __init__(self, record: bool = False):
        self.record, self.ts = record, []

    def __call__(self, x, t):
        if self.record:
            self.ts.append(int(t[0]))
        tt = t.view(-1, 1, 1, 1).to(x.dtype)
        return 0.7 * torch.tanh(x + 0.1 * x.sum(1, keepdim=True)) + 0.3 * torch.sin(tt * 0.37)


class CondToy:
    """eps = 0.3 tanh(x) + 0.1 y; ``num_classes`` gives the null label for guidance."""

    num_classes = 3

    def __call__(self, x, t, y=None):
        assert y is not None, "the labels did not reach the network"
        return 0.3 * torch.tanh(x) + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1)


def _u8(n, c=1, h=4, w=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _mask(h=4, w=4, region="bottom"):
    return torch.from_numpy(region_mask(region, h, w))[None, None]


# ---------------------------------------------------------------------------------------------- RePaint
def test_repaint_schedule_matches_the_paper_counts():
    assert repaint_schedule(5) == [4, 3, 2, 1, 0, -1]
    assert repaint_schedule(5, jump=3, resample=1) == [4, 3, 2, 1, 0, -1]
    # J = 2, R = 2 on K = 5: jumps after arriving at states 0 and 2 (below K - J = 3)
    assert repaint_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    for K, J, R in [(250, 10, 10), (200, 10, 10), (30, 1, 3), (17, 4, 2)]:
        s = repaint_schedule(K, J, R)
        assert s[0] == K - 1 and s[-1] == -1 and all(abs(b - a) == 1 for a, b in zip(s, s[1:]))
        n_points = len(range(0, K - J, J))
        assert count_calls(K, J, R) == K + (R - 1) * J * n_points
    assert count_calls(250, 10, 10) == 2410  # the paper's default: 250 + 24 * 9 * 10


def _replacement_by_hand(d, model, x0, keep, seeds):
    """Song et al. 2021's replacement method written out from the paper's formulas in float64
    (Algorithm 2 with the clipped x0, then paste the noised known part), drawing noise in the
    documented order: x_T, then per step z (reverse) and n (known part)."""
    betas = d.betas
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    var_large = np.append(betas[1] * (1 - abar[0]) / (1 - abar[1]), betas[1:])  # fixedlarge, beta~_2 at 0
    noise = ImageNoise(seeds, tuple(x0.shape[1:]))
    x = noise.next().double()
    ref = x0.double()
    for i in range(len(betas) - 1, -1, -1):
        eps = model(x.float(), torch.full((x.shape[0],), i)).double()
        xhat = ((x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])).clamp(-1, 1)
        mean = (math.sqrt(abar_prev[i]) * betas[i] * xhat + math.sqrt(1 - betas[i]) * (1 - abar_prev[i]) * x) / (1 - abar[i])
        z, n = noise.next().double(), noise.next().double()
        unknown = mean + (math.sqrt(var_large[i]) if i > 0 else 0.0) * z
        known = ref if i == 0 else math.sqrt(abar_prev[i]) * ref + math.sqrt(1 - abar_prev[i]) * n
        x = torch.where(keep, known, unknown)
    return x


def test_resample_1_jump_1_is_the_replacement_method_written_out():
    d, model = make(), Toy()
    x0 = to_model(_u8(3))
    mask = _mask()
    out = inpaint(d, model, x0, mask, [4, 5, 6], resample=1, jump=1)
    want = _replacement_by_hand(d, model, x0, (mask == 0).expand_as(x0), [4, 5, 6])
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
    assert not torch.equal(out[:, :, 2:], x0[:, :, 2:])  # the generated half is generated


def test_repaint_jump_1_is_the_papers_algorithm_1():
    """Lugmayr et al. Algorithm 1 (jump 1, U = R resamplings per step) written out as loops."""
    d, model, R = make(), Toy(), 3
    x0 = to_model(_u8(2))
    mask = _mask(region="center")
    keep = (mask == 0).expand_as(x0)
    out = inpaint(d, model, x0, mask, [1, 2], resample=R, jump=1)
    abar = d.alphas_cumprod
    noise = ImageNoise([1, 2], (1, 4, 4))
    x = noise.next()
    for t in range(T - 1, -1, -1):  # x holds x_t (0-based state t)
        for u in range(R if t > 0 else 1):  # at the paper's t = 1 only the last of the U draws counts
            mean, _, logvar, _ = (v for v in d.p_mean_variance(None, x, torch.full((2,), t),
                                                               model_output=model(x, torch.full((2,), t))).values())
            z, n = noise.next(), noise.next()
            unknown = mean + (torch.exp(0.5 * logvar) if t > 0 else 0) * z
            known = x0 if t == 0 else math.sqrt(abar[t - 1]) * x0 + math.sqrt(1 - abar[t - 1]) * n
            x = torch.where(keep, known, unknown)
            if u < R - 1 and t > 0:  # back to x_t: x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
                x = math.sqrt(1 - d.betas[t]) * x + math.sqrt(d.betas[t]) * noise.next()
    torch.testing.assert_close(out, x, rtol=0, atol=2e-5)


def test_known_pixels_are_kept_bit_for_bit_in_float_and_uint8():
    d = make()
    u8 = _u8(4, c=3, seed=1)
    x0 = to_model(u8)
    mask = torch.from_numpy(random_mask(0.5, [0, 1, 2, 3], 4, 4))
    for kw in ({"resample": 1}, {"resample": 3, "jump": 2}, {"steps": 7, "sampler": "ddim", "eta": 0.5}):
        out = inpaint(d, Toy(), x0, mask, [0, 1, 2, 3], **kw)
        keep = (mask == 0).expand_as(x0)
        assert torch.equal(out[keep], x0[keep])
        keep_hwc = keep.permute(0, 2, 3, 1).numpy()
        assert np.array_equal(to_uint8(out)[keep_hwc], u8[keep_hwc])
        assert not torch.equal(out[~keep], x0[~keep])


def test_inpaint_is_per_image_seeded_and_batch_invariant():
    d = make()
    x0 = to_model(_u8(5))
    mask = _mask(region="left")
    seeds = [9, 3, 7, 1, 0]
    full = inpaint(d, Toy(), x0, mask, seeds, resample=2, jump=3)
    for bs in (1, 2):
        assert torch.equal(inpaint(d, Toy(), x0, mask, seeds, resample=2, jump=3, batch_size=bs), full)
    assert torch.equal(inpaint(d, Toy(), x0[1:3], mask, seeds[1:3], resample=2, jump=3), full[1:3])
    other = inpaint(d, Toy(), x0, mask, [8] + seeds[1:], resample=2, jump=3)
    assert not torch.equal(other[0], full[0]) and torch.equal(other[1:], full[1:])


def test_inpaint_passes_labels_and_guidance_batch_invariantly():
    d = make()
    x0 = to_model(_u8(4))
    y = torch.tensor([0, 1, 2, 1])
    a = inpaint(d, CondToy(), x0, _mask(), range(4), model_kwargs={"y": y}, guidance=2.0)
    b = inpaint(d, CondToy(), x0, _mask(), range(4), model_kwargs={"y": y}, guidance=2.0, batch_size=1)
    assert torch.equal(a, b)
    c = inpaint(d, CondToy(), x0, _mask(), range(4), model_kwargs={"y": y})
    assert not torch.equal(a[1:], c[1:])  # W = 2 differs from the plain conditional model


class TwoImages:
    """The optimal eps-predictor when the data are two images +a and -a, equally likely:
    E[x0 | x_t] = sum_i w_i x_i, w ~ exp(-|x_t - sqrt(abar) x_i|^2 / (2 (1 - abar)))."""

    def __init__(self, d, a):
        self.abar, self.xs = torch.tensor(d.alphas_cumprod), torch.stack([a, -a])

    def __call__(self, x, t):
        ab = self.abar.to(x)[t].view(-1, 1, 1, 1)
        d2 = ((x[:, None] - ab.sqrt()[:, None] * self.xs[None]) ** 2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - ab.view(-1, 1))), 1)
        return (x - ab.sqrt() * (w[:, :, None, None, None] * self.xs[None]).sum(1)) / (1 - ab).sqrt()


def test_repaint_harmonises_better_than_replacement():
    """Two known pixels of 16 say which of two images it is; the replacement method often commits
    the generated 14 to the other image at high noise and never recovers (RePaint section 4.2)."""
    T2 = 50
    d = GaussianDiffusion(get_beta_schedule("linear", T2, 1e-4 * 1000 / T2, 0.02 * 1000 / T2))
    a = torch.tensor([0.8, -0.8] * 8).view(1, 4, 4)
    model = TwoImages(d, a)
    mask = torch.ones(1, 1, 4, 4)
    mask[..., 0, :2] = 0
    n = 100
    hit = {}
    for R, J in ((1, 1), (10, 10)):
        out = inpaint(d, model, a.expand(n, 1, 4, 4), mask, range(n), resample=R, jump=J)
        hit[R] = float(((out - a).abs().amax((1, 2, 3)) < 0.1).float().mean())
    assert hit[1] < 0.7 and hit[10] > hit[1] + 0.1, hit


def test_inpaint_refuses_bad_arguments():
    d, x0 = make(), to_model(_u8(2))
    with pytest.raises(SamplingOptionError, match="binary"):
        inpaint(d, Toy(), x0, _mask() * 0.5 + 0.25, [0, 1])
    with pytest.raises(SamplingOptionError, match="mask must be"):
        inpaint(d, Toy(), x0, torch.ones(1, 1, 3, 4), [0, 1])
    with pytest.raises(SamplingOptionError, match="history"):
        inpaint(d, Toy(), x0, _mask(), [0, 1], sampler="dpm++2m", steps=5)
    with pytest.raises(SamplingOptionError, match="one integer per image"):
        inpaint(d, Toy(), x0, _mask(), [0])


# ---------------------------------------------------------------------------------------------- SDEdit
@pytest.mark.parametrize("kw", [{}, {"sampler": "ddim", "steps": 6}, {"sampler": "dpm++2m", "steps": 5},
                                {"sampler": "ddim", "steps": 5, "spacing": "leading"}])
def test_sdedit_at_strength_1_is_sampling_from_the_noised_guide(kw):
    d = make()
    guide = to_model(_u8(3, seed=2))
    seeds = [3, 1, 4]
    out = sdedit(d, Toy(), guide, 1.0, seeds, **kw)
    steps = kw.get("steps")
    from ddpm.autospacing import resolve_spacing

    spacing = resolve_spacing(kw.get("spacing", "auto"), kw.get("sampler", "ancestral"), steps)  # sample's default
    top = T - 1 if steps is None else max(make_chain(d, "cpu", steps, spacing).timesteps)
    eps = ImageNoise(seeds, (1, 4, 4)).next()
    abar = d.alphas_cumprod[top]
    x_T = math.sqrt(abar) * guide + math.sqrt(1 - abar) * eps
    assert torch.equal(out, sample(d, Toy(), (1, 4, 4), seeds, x_T=x_T, **kw))


def test_sdedit_walks_the_kept_steps_at_or_below_t0():
    d = make()
    guide = to_model(_u8(2))
    m = Toy(record=True)
    sdedit(d, m, guide, 0.5, [0, 1])  # t0 = round(0.5 * 20) - 1 = 9
    assert m.ts == list(range(9, -1, -1))
    m = Toy(record=True)
    sdedit(d, m, guide, 0.52, [0, 1], sampler="ddim", steps=5)  # trailing kept 3, 7, 11, 15, 19; t0 = 9
    assert m.ts == [7, 3]
    # the first network input is the guide noised to the top kept step (7) by each stream's first draw
    seen = []

    def spy(x, t):
        seen.append(x.clone())
        return Toy()(x, t)
    sdedit(d, spy, guide, 0.52, [0, 1], sampler="ddim", steps=5)
    eps = ImageNoise([0, 1], (1, 4, 4)).next()
    want = math.sqrt(d.alphas_cumprod[7]) * guide + math.sqrt(1 - d.alphas_cumprod[7]) * eps
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-6)


def test_sdedit_is_batch_invariant_and_keeps_the_guide_at_low_strength():
    d = make()
    guide = to_model(_u8(4, seed=3))
    full = sdedit(d, Toy(), guide, 0.3, [5, 6, 7, 8], clip_denoised=False)
    assert torch.equal(sdedit(d, Toy(), guide, 0.3, [5, 6, 7, 8], batch_size=3, clip_denoised=False), full)
    low = (sdedit(d, Toy(), guide, 0.1, [5, 6, 7, 8]) - guide).abs().mean()
    high = (sdedit(d, Toy(), guide, 1.0, [5, 6, 7, 8]) - guide).abs().mean()
    assert low < high


@pytest.mark.parametrize("S", [0.0, -0.1, 1.01, float("nan"), True, 0.02])
def test_sdedit_refuses_strength_outside_0_1(S):
    with pytest.raises(SamplingOptionError, match="strength"):
        sdedit(make(), Toy(), to_model(_u8(1)), S, [0])


# ---------------------------------------------------------------------------------------------- inversion
class ConstEps:
    """eps independent of x and t: DDIM's ODE has eps constant along it, inversion is exact."""

    def __init__(self, c):
        self.c = c

    def __call__(self, x, t):
        return self.c.expand_as(x)


class LipschitzEps:
    """eps(x, t) = tanh(w_t avgpool3x3(x) + b_t): avg pooling (weights >= 0, summing to <= 1) is
    1-Lipschitz in the max norm and tanh too, so eps(., t) is |w_t|-Lipschitz in the max norm."""

    def __init__(self, T):
        t = torch.arange(T, dtype=torch.float32)  # smooth in t, like a trained network's eps
        self.w = 0.5 + 0.3 * torch.cos(0.2 * t)
        self.b = 0.5 * torch.sin(0.3 * t)

    def __call__(self, x, t):
        p = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
        return torch.tanh(self.w[t].view(-1, 1, 1, 1) * p + self.b[t].view(-1, 1, 1, 1))


def test_inversion_is_exact_when_eps_is_constant():
    d = make()
    x0 = to_model(_u8(3, seed=4))
    model = ConstEps(0.3 * torch.randn(1, 1, 4, 4))
    for steps in (None, 5):
        z = ddim_invert(d, model, x0, steps=steps)
        torch.testing.assert_close(ddim_decode(d, model, z, steps=steps), x0, rtol=0, atol=3e-5)


def _round_trip_and_bound(d, model, x0, steps):
    """(max-norm error per image, the derived bound per image) of decode(encode(x0))."""
    z, states, eps = ddim_invert(d, model, x0, steps=steps, trajectory=True)
    assert torch.equal(states[:, -1], z) and torch.equal(states[:, 0], x0)
    rec = ddim_decode(d, model, z, steps=steps)
    kept = list(make_chain(d, "cpu", steps).timesteps)
    abar = d.alphas_cumprod[kept]
    abar_prev = np.append(1.0, abar[:-1])
    c1 = np.sqrt(abar_prev / abar)
    c2 = np.sqrt(1 - abar_prev) - c1 * np.sqrt(1 - abar)
    L = model.w[kept].double().numpy()
    errs, bounds = [], []
    for i in range(x0.shape[0]):
        bound, grow = 0.0, 1.0
        for k, s in enumerate(kept):  # d_k = eps(z_k, s_k) - e_k, z_k the encoder's state k
            dk = (model(states[i:i + 1, k + 1], torch.tensor([s])) - eps[i:i + 1, k]).abs().max().item()
            bound += grow * abs(c2[k]) * dk
            grow *= c1[k] + abs(c2[k]) * L[k]
        errs.append((rec[i] - x0[i]).abs().max().item())
        bounds.append(bound)
    return np.array(errs), np.array(bounds)


def test_round_trip_error_is_within_the_derived_bound():
    """|decode(encode(x)) - x|_max <= sum_k prod_{j<k} (c1_j + |c2_j| L_j) |c2_k| |d_k|_max, the
    bound derived in ddpm.editing.invert, for a model with known Lipschitz constants L_j; and
    the bound shrinks as K grows (K = T against K = T/2)."""
    # A schedule whose abar_T is not tiny: the growth factor prod c1_j = 1/sqrt(abar_T) stays small.
    d = GaussianDiffusion(get_beta_schedule("linear", T, 1e-3, 0.05))
    model = LipschitzEps(T)
    x0 = to_model(_u8(3, h=6, w=6, seed=5))
    err_T, bound_T = _round_trip_and_bound(d, model, x0, None)
    err_h, bound_h = _round_trip_and_bound(d, model, x0, T // 2)
    assert (err_T > 0).all() and (err_T <= bound_T + 1e-5).all() and (err_h <= bound_h + 1e-5).all()
    assert (bound_T < bound_h).all() and (err_T < err_h).all()


def test_inversion_is_deterministic_and_batch_invariant():
    d = make()
    x0 = to_model(_u8(5, seed=6))
    z = ddim_invert(d, Toy(), x0, steps=8)
    assert torch.equal(ddim_invert(d, Toy(), x0, steps=8, batch_size=2), z)
    assert torch.equal(ddim_invert(d, Toy(), x0[2:3], steps=8), z[2:3])


def test_slerp_against_the_formula_on_the_unit_circle():
    a, b = torch.tensor([1.0, 0.0]).view(1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 2)
    out = slerp(a, b, [0.0, 1 / 3, 0.5, 1.0]).view(4, 2)
    for row, lam in zip(out, [0.0, 1 / 3, 0.5, 1.0]):  # a quarter circle: the point at angle lam * pi/2
        torch.testing.assert_close(row, torch.tensor([math.cos(lam * math.pi / 2), math.sin(lam * math.pi / 2)]))
    a3 = torch.randn(1, 3, 3)
    torch.testing.assert_close(slerp(a3, 2 * a3, [0.25]), (1.25 * a3)[None])  # parallel: linear


# ---------------------------------------------------------------------------------------------- masks
def test_region_masks_mark_the_generated_part():
    assert region_mask("bottom", 4, 4)[2:].all() and not region_mask("bottom", 4, 4)[:2].any()
    assert region_mask("left", 4, 6)[:, :3].all() and not region_mask("left", 4, 6)[:, 3:].any()
    c = region_mask("center", 8, 8)
    assert c.sum() == 16 and c[2:6, 2:6].all()
    np.testing.assert_array_equal(region_mask("border", 8, 8), 1 - c)
    with pytest.raises(ConfigError, match="did you mean 'left'"):
        region_mask("lef", 4, 4)


def test_random_masks_depend_only_on_the_seed():
    m = random_mask(0.5, [3, 4, 5], 8, 8)
    assert m.shape == (3, 1, 8, 8) and set(np.unique(m)) == {0.0, 1.0}
    np.testing.assert_array_equal(random_mask(0.5, [4], 8, 8)[0], m[1])
    assert 0.3 < m.mean() < 0.7


def test_mask_checks_name_the_problem():
    ok = region_mask("top", 4, 4)
    assert check_mask(ok * 255, 2, 4, 4, "m").shape == (2, 1, 4, 4)
    with pytest.raises(DataError, match="mask is 3x4 .* images are 4x4"):
        check_mask(np.zeros((4, 3)), 1, 4, 4, "m")
    with pytest.raises(DataError, match="not binary"):
        check_mask(ok * 0.5, 1, 4, 4, "m")
    with pytest.raises(DataError, match="generates nothing"):
        check_mask(np.zeros((4, 4)), 1, 4, 4, "m")
    with pytest.raises(DataError, match="of image 1 generates everything"):
        check_mask(np.stack([ok, np.ones((4, 4))]), 2, 4, 4, "m")
    with pytest.raises(DataError, match="3 masks for 2 images"):
        check_mask(np.stack([ok] * 3), 2, 4, 4, "m")


def test_load_mask_reads_files_folders_and_arrays(tmp_path):
    from PIL import Image

    ok = (region_mask("right", 4, 4) * 255).astype(np.uint8)
    Image.fromarray(ok).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "m.png"), 2, 4, 4, [0, 1])[1, 0], ok / 255)
    (tmp_path / "dir").mkdir()
    for k, r in enumerate(["left", "top"]):
        Image.fromarray((region_mask(r, 4, 4) * 255).astype(np.uint8)).save(tmp_path / "dir" / f"{k}.png")
    m = load_mask(str(tmp_path / "dir"), 2, 4, 4, [0, 1])
    np.testing.assert_array_equal(m[1, 0], region_mask("top", 4, 4))
    with pytest.raises(DataError, match="2 mask images for 3 images"):
        load_mask(str(tmp_path / "dir"), 3, 4, 4, [0, 1, 2])
    np.save(tmp_path / "m.npy", region_mask("left", 4, 4).astype(bool))
    assert load_mask(str(tmp_path / "m.npy"), 1, 4, 4, [0]).sum() == 8
    with pytest.raises(DataError, match="mask is 4x4 .* images are 8x8"):
        load_mask(str(tmp_path / "m.png"), 1, 8, 8, [0])
    with pytest.raises(ConfigError, match="random:P"):
        load_mask("random:1.5", 1, 4, 4, [0])
    with pytest.raises(ConfigError, match="no such file"):
        load_mask(str(tmp_path / "nope.png"), 1, 4, 4, [0])


def test_interpolating_real_images_ends_at_the_images_when_inversion_is_exact():
    from ddpm.editing import interpolate_latents

    d = make()
    x = to_model(_u8(2, seed=8))
    out = interpolate_latents(d, ConstEps(0.3 * torch.randn(1, 1, 4, 4)), x[0], x[1], [0.0, 0.5, 1.0], steps=6)
    assert out.shape == (3, 1, 4, 4)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=3e-5)
    torch.testing.assert_close(out[2], x[1], rtol=0, atol=3e-5)
    assert (out[1] - x[0]).abs().max() > 0.05 and (out[1] - x[1]).abs().max() > 0.05
