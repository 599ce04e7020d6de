"""The seams of the architecture: the conditioning hook (``model_kwargs``) reaches the network from
every loss, bound and sampler; ``x_T`` sets the starting noise; the sampler registry."""

from __future__ import annotations

import pytest
import torch

from ddpm import samplers
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import SamplingOptionError
from ddpm.rng import ImageNoise
from ddpm.sampling import sample, sample_progressive
from ddpm.schedule import get_beta_schedule

T = 20
SHAPE = (1, 4, 4)


def make(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.5), **kw)


class CondToy(torch.nn.Module):
    """eps = 0.3 tanh(x) + 0.1 y (per image), so the output depends on the label in a known way.
    Records the labels it was called with."""

    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.out_channels, self.seen = out_channels, []

    def forward(self, x, t, y=None):
        if y is None:
            raise AssertionError("the conditioning did not reach the network")
        self.seen.append(y.clone())
        eps = 0.3 * torch.tanh(x) + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1)
        return eps.repeat(1, self.out_channels, 1, 1)


def _labels(n):
    return torch.arange(n) % 3


def test_model_kwargs_reach_the_network_in_losses_and_bounds():
    d = make()
    x0 = torch.rand(4, *SHAPE) * 2 - 1
    t = torch.tensor([0, 5, 10, 19])
    y = _labels(4)
    noise = torch.randn_like(x0)
    m = CondToy()
    loss = d.training_losses(m, x0, t, noise=noise, model_kwargs={"y": y})
    # the same loss by hand: the label shifts eps by 0.1 y
    xt = d.q_sample(x0, t, noise=noise)
    want = ((noise - (0.3 * torch.tanh(xt) + 0.1 * y.float().view(-1, 1, 1, 1))) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, want)
    assert torch.equal(m.seen[-1], y)
    # p_mean_variance / vb_terms_bpd / calc_bpd_loop: a label changes the result, and equals
    # the explicit model output
    out = m(xt, t, y=y)
    p = d.p_mean_variance(m, xt, t, model_kwargs={"y": y})
    q = d.p_mean_variance(None, xt, t, model_output=out)
    assert torch.equal(p["mean"], q["mean"])
    vb = d.vb_terms_bpd(m, x0, xt, t, model_kwargs={"y": y})["output"]
    vb0 = d.vb_terms_bpd(m, x0, xt, t, model_kwargs={"y": torch.zeros_like(y)})["output"]
    assert not torch.equal(vb, vb0)
    bpd = d.calc_bpd_loop(m, x0, seeds=[1, 2, 3, 4], model_kwargs={"y": y})
    assert len(m.seen) >= T and all(torch.equal(s, y) for s in m.seen[-T:])
    assert torch.isfinite(bpd["total_bpd"]).all()


@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_passes_per_image_labels_batch_invariantly(name):
    d = make()
    seeds = [7, 8, 9, 10, 11]
    y = _labels(len(seeds))
    kw = dict(sampler=name, steps=6, model_kwargs={"y": y})
    m = CondToy()
    full = sample(d, m, SHAPE, seeds, **kw)
    assert all(torch.equal(s, y) for s in m.seen)  # one batch: every call saw all five labels
    m2 = CondToy()
    split = sample(d, m2, SHAPE, seeds, batch_size=2, **kw)
    assert {tuple(s.tolist()) for s in m2.seen} == {(0, 1), (2, 0), (1,)}  # sliced with the images
    torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
    other = sample(d, CondToy(), SHAPE, seeds, sampler=name, steps=6, model_kwargs={"y": y + 1})
    assert not torch.allclose(other, full)


def test_guidance_is_one_batched_call_with_the_null_label():
    d = make()
    m = CondToy()
    m.num_classes = 10
    y = _labels(3)
    sample(d, m, SHAPE, [1, 2, 3], steps=4, sampler="ddim", model_kwargs={"y": y}, guidance=2.0)
    assert len(m.seen) == 4 and all(torch.equal(s, torch.cat([y, torch.full_like(y, 10)])) for s in m.seen)
    with pytest.raises(SamplingOptionError, match="model_kwargs"):
        sample(d, m, SHAPE, [1, 2, 3], steps=4, guidance=2.0)


def test_x_T_replaces_the_first_draw_and_keeps_the_step_noise():
    d = make()
    seeds = [3, 4]
    m = lambda x, t: 0.3 * torch.tanh(x)  # noqa: E731
    default = sample(d, m, SHAPE, seeds)
    own = ImageNoise(seeds, SHAPE).next()
    assert torch.equal(sample(d, m, SHAPE, seeds, x_T=own), default)
    assert torch.equal(sample(d, m, SHAPE, seeds, x_T=own, batch_size=1), default)
    other = sample(d, m, SHAPE, seeds, x_T=own * 0.5)
    assert not torch.equal(other, default)
    # deterministic DDIM from x_T depends on x_T only, not on the seeds
    a = sample(d, m, SHAPE, seeds, sampler="ddim", steps=5, x_T=own)
    b = sample(d, m, SHAPE, [100, 101], sampler="ddim", steps=5, x_T=own)
    assert torch.equal(a, b)
    with pytest.raises(SamplingOptionError, match="x_T"):
        sample(d, m, SHAPE, seeds, x_T=own[:1])
    with pytest.raises(SamplingOptionError, match="x_T"):
        sample(d, m, SHAPE, seeds, x_T=torch.zeros(2, 1, 4, 5))


def test_progressive_final_equals_sample_for_every_sampler():
    d = make()
    m = lambda x, t: 0.3 * torch.tanh(x)  # noqa: E731
    for name in samplers.names():
        final, xs, ts = sample_progressive(d, m, SHAPE, [5, 6], every=2, sampler=name, steps=6)
        assert torch.equal(final, sample(d, m, SHAPE, [5, 6], sampler=name, steps=6)), name


def test_registry_lookup_and_errors():
    assert {"ancestral", "ddim"} <= set(samplers.names())
    assert samplers.get("ddim").name == "ddim"
    with pytest.raises(SamplingOptionError, match="did you mean 'ddim'"):
        samplers.get("ddmi")
    with pytest.raises(ValueError, match="unique"):
        samplers.register(type("Dup", (samplers.get("ddim"),), {}))


def test_fid_samples_of_a_conditional_model_are_class_balanced_on_every_rank():
    from ddpm.evaluate.fid import generate_samples, rank_seeds

    d = make()
    n, C = 7, 3
    for rank in range(2):
        m = CondToy()
        m.num_classes = C
        generate_samples(d, m, n, SHAPE, seed=100, batch_size=n, gather=False, rank=rank, world_size=2,
                         num_classes=C)
        ks = [s - 100 for s in rank_seeds(n, 100, rank, 2)]  # the global image indices of this rank
        assert all(torch.equal(y, torch.tensor([k % C for k in ks])) for y in m.seen)
    m = CondToy()
    m.num_classes = C
    generate_samples(d, m, 3, SHAPE, seed=0, batch_size=3, gather=False, rank=0, world_size=1, num_classes=C,
                     guidance=2.0)
    assert torch.equal(m.seen[0], torch.tensor([0, 1, 2, C, C, C]))  # both branches in one call
