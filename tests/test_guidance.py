"""Classifier-free guidance (Ho & Salimans 2022) through every registered sampler: a conditioning
oracle, plus the label helpers of :mod:`ddpm.conditioning`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm import samplers
from ddpm.conditioning import check_labels, dataset_labels, drop_labels, parse_classes
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError, DataError
from ddpm.sampling import sample
from ddpm.schedule import get_beta_schedule

T = 20
SHAPE = (2, 4, 4)
NUM_CLASSES = 3
# Per-label scale of the oracle's eps; the last entry is the null label. All within [0.6, 0.9]:
# any two products x*s_a, x*s_b then lie within a factor 2 of each other with the same sign, so
# their difference is exact in floating point (Sterbenz) and u + 1*(c - u) == c exactly.
SCALES = (0.6, 0.7, 0.8, 0.9)


def make() -> GaussianDiffusion:
    return GaussianDiffusion(get_beta_schedule("linear", T, 1e-4 * 1000 / T, 0.5))


class Oracle(torch.nn.Module):
    """eps(x, t, y) = SCALES[y] * x: the output depends on the label in a known way.

    ``weight``: when set, the model itself returns the guided combination
    eps_u + W (eps_c - eps_u) written out by hand (y must then be the conditional labels), so a
    sampler run without ``guidance`` gives the formula's result to compare against."""

    num_classes = NUM_CLASSES

    def __init__(self, weight: float | None = None):
        super().__init__()
        self.weight = weight

    @staticmethod
    def eps(x, y):
        s = torch.tensor(SCALES, dtype=x.dtype, device=x.device)[y]
        return x * s.view(-1, 1, 1, 1)

    def forward(self, x, t, y=None):
        if self.weight is None:
            return self.eps(x, y)
        c, u = self.eps(x, y), self.eps(x, torch.full_like(y, NUM_CLASSES))
        return u + self.weight * (c - u)


SEEDS = [3, 4, 5, 6, 7]
Y = torch.tensor([0, 1, 2, 1, 0])


def _run(name, model, y, guidance=None):
    return sample(make(), model, SHAPE, SEEDS, sampler=name, steps=8, batch_size=2,
                  model_kwargs=None if y is None else {"y": y}, guidance=guidance)


@pytest.mark.parametrize("name", samplers.names())
def test_guided_eps_is_the_formula_for_every_sampler(name):
    for w in (0.5, 2.0, 3.0):
        got = _run(name, Oracle(), Y, guidance=w)
        want = _run(name, Oracle(weight=w), Y)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and guidance matters: W = 3 is neither branch
    assert not torch.equal(_run(name, Oracle(), Y, guidance=3.0), _run(name, Oracle(), Y))


@pytest.mark.parametrize("name", samplers.names())
def test_w0_is_the_unconditional_branch_and_w1_the_conditional_one(name):
    cond = _run(name, Oracle(), Y)
    uncond = _run(name, Oracle(), torch.full_like(Y, NUM_CLASSES))
    assert not torch.equal(cond, uncond)
    torch.testing.assert_close(_run(name, Oracle(), Y, guidance=1.0), cond, rtol=0, atol=0)
    torch.testing.assert_close(_run(name, Oracle(), Y, guidance=0.0), uncond, rtol=0, atol=0)


def test_guided_samples_are_batch_invariant():
    a = sample(make(), Oracle(), SHAPE, SEEDS, sampler="ancestral", batch_size=5, model_kwargs={"y": Y}, guidance=2.0)
    b = sample(make(), Oracle(), SHAPE, SEEDS, sampler="ancestral", batch_size=1, model_kwargs={"y": Y}, guidance=2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- helpers


def test_parse_classes():
    np.testing.assert_array_equal(parse_classes("3", 10, 4), [3, 3, 3, 3])
    np.testing.assert_array_equal(parse_classes("0,1,2", 10, 7), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(parse_classes("all", 4, 10), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    with pytest.raises(ConfigError, match=r"--class 11: this model has 10 classes"):
        parse_classes("11", 10, 4)
    with pytest.raises(ConfigError, match="--class 10"):
        parse_classes("1,10", 10, 4)
    with pytest.raises(ConfigError, match="unconditional"):
        parse_classes("3", 0, 4)
    for bad in ("cat", "", "1.5", "-1"):
        with pytest.raises(ConfigError, match="--class"):
            parse_classes(bad, 10, 4)


def test_drop_labels_uses_only_the_given_generator():
    y = torch.arange(1000) % 10
    a = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(5))
    b = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    dropped = a == 10
    kept = ~dropped
    assert torch.equal(a[kept], y[kept])
    # Binomial(1000, 0.1): mean 100, sd 9.5; 60..140 is more than 4 sd either side
    assert 60 <= int(dropped.sum()) <= 140
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator().manual_seed(5)), y)
    assert bool((drop_labels(y, 1.0, 10, torch.Generator().manual_seed(5)) == 10).all())
    # the same draw for every p: raising p only adds dropped labels
    c = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(5))
    assert bool((c[dropped] == 10).all())
    # a slice of a global batch (one rank's share) drops exactly the images the whole batch does
    part = drop_labels(y[300:550], 0.1, 10, torch.Generator().manual_seed(5), offset=300, total=1000)
    assert torch.equal(part, a[300:550])


def test_check_and_dataset_labels():
    np.testing.assert_array_equal(check_labels(np.array([0, 9, 3], dtype=np.uint8), 10, "x"), [0, 9, 3])
    with pytest.raises(DataError, match=r"'d.npz'.*label 10 is outside 0\.\.9"):
        check_labels(np.array([0, 10]), 10, "data source 'd.npz'")
    with pytest.raises(DataError, match="label -1"):
        check_labels(np.array([-1, 2]), 10, "x")

    class Plain:
        source, labels = "imgs.npy", None

        def __len__(self):
            return 3

    with pytest.raises(DataError, match=r"'imgs.npy' has no class labels.*model.num_classes=10"):
        dataset_labels(Plain(), 10)
    p = Plain()
    p.labels = np.array([1, 2, 0])
    np.testing.assert_array_equal(dataset_labels(p, 3), [1, 2, 0])
    with pytest.raises(DataError, match="imgs.npy"):
        dataset_labels(p, 2)
