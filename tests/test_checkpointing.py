"""model.checkpointing: recomputing the ResBlocks in the backward pass changes nothing.

Activation checkpointing reruns each ResBlock's forward during backward with the RNG state it
had the first time (torch.utils.checkpoint's preserve_rng_state), so the dropout masks, the
activations and therefore the losses, gradients and Adam updates are bit-identical (torch.equal,
no tolerance: the same kernels see the same inputs), and the global RNG ends in the same state.
"""

from __future__ import annotations

import pytest
import torch

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.nets.unet import ResBlock, UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(checkpointing: bool, steps: int = 4, dropout_seed: int = 123):
    cfg = ModelConfig(resolution=8, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      dropout=0.3, checkpointing=checkpointing)
    torch.manual_seed(0)
    model = UNet.from_config(cfg, 3).train()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50, beta_start=2e-3, beta_end=0.4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    torch.manual_seed(dropout_seed)  # the dropout stream
    for _ in range(steps):
        x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
        t = torch.randint(0, 50, (4,), generator=g)
        noise = torch.randn(4, 3, 8, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = diffusion.training_losses(model, x0, t, noise=noise).mean()
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, losses, grads, torch.get_rng_state()


def test_checkpointing_is_on_every_resblock_and_saves_activations():
    model = UNet.from_config(ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                         attn_resolutions=(4,), checkpointing=True), 1)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.checkpointing for b in blocks)
    assert not any(b.checkpointing for b in model.set_checkpointing(False).modules() if isinstance(b, ResBlock))

    # Fewer tensors saved for backward with checkpointing: the point of the option.
    def saved_count(on: bool) -> int:
        model.set_checkpointing(on).train()
        n = [0]

        def pack(t):
            n[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)).sum()
        return n[0]

    assert saved_count(True) < saved_count(False)


def test_checkpointing_on_and_off_give_identical_losses_gradients_and_weights():
    m_off, l_off, g_off, rng_off = _run(False)
    m_on, l_on, g_on, rng_on = _run(True)
    for a, b in zip(l_off, l_on):
        assert torch.equal(a, b)
    for step_off, step_on in zip(g_off, g_on):
        for a, b in zip(step_off, step_on):
            assert torch.equal(a, b)
    for a, b in zip(m_off.parameters(), m_on.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(rng_off, rng_on)
    # Dropout was active: another dropout stream changes the later losses (so the test can fail).
    assert not torch.equal(l_on[-1], _run(True, dropout_seed=7)[1][-1])


def test_resume_may_switch_checkpointing_and_stays_bit_exact(tmp_path):
    """2 steps without checkpointing + 2 resumed with it == 4 steps without (dropout on)."""
    from ddpm.checkpoint import load_checkpoint
    from ddpm.config import apply_overrides, get_preset
    from ddpm.training.loop import train

    base = ["model.ch_mult=1", "model.num_res_blocks=1", "model.attn_resolutions=", "model.dropout=0.2",
            "train.batch_size=8", "train.save_every=2", "train.log_every=0", "train.sample_every=0"]
    cfg = apply_overrides(get_preset("digits"), base + ["train.total_steps=4"])
    quiet = dict(device="cpu", progress=False, log=lambda m: None)
    straight = train(cfg, tmp_path / "a", **quiet)
    train(apply_overrides(cfg, ["train.total_steps=2"]), tmp_path / "b", **quiet)
    resumed = train(apply_overrides(cfg, ["model.checkpointing=true"]), tmp_path / "b", resume="auto", **quiet)
    a, _ = load_checkpoint(straight["checkpoint"])
    b, _ = load_checkpoint(resumed["checkpoint"])
    for k in a:
        if k.startswith(("model/", "ema/")):
            assert torch.equal(a[k], b[k]), k
