"""The training step without host round trips (issue 21), checked on the CPU.

* No host read inside a step: ``Tensor.item/.cpu/.tolist/.numpy/bool/float/int`` raise while a
  step runs (``ddpm.training.hostsync.forbid_host_sync``), for a bare ``train_step`` and for the
  whole trainer between its declared reads (once per log window, checkpoints).
* The device-side non-finite guard skips exactly the bad steps: a run with NaN batches at some
  steps ends in exactly the state of a run that never took those steps (weights, EMA, Adam
  moments and step counts, bit for bit), for foreach Adam (the CPU default) and fused Adam
  (the CUDA path, ``found_inf``).
* The EMA's tensor-weight update equals the scalar lerp (CPU: bit for bit; the multi-tensor
  form used on GPUs: within float32 rounding) and leaves the average unchanged with weight 0.

The trainer's CPU default reads the guard's flag on the host instead (free on a CPU, and it saves
the copy-and-restore of every weight and moment): ``guard.HOST_GUARD_ON_CPU``. This module turns
it off (the `device_guard` fixture) to check on a CPU the step that runs on a GPU, and checks
that the CPU form gives the same bits.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm.training import guard, hostsync
from ddpm.training.ema import EMA, foreach_lerp_tensor_
from ddpm.training.hostsync import HostSyncError, forbid_host_sync

pytestmark = pytest.mark.usefixtures("one_thread", "device_guard")


@pytest.fixture
def device_guard(monkeypatch):
    """The guard as on a GPU (decided on the device) for this module's tests."""
    monkeypatch.setattr(guard, "HOST_GUARD_ON_CPU", False)

MODEL = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0)


def tiny_config(model: ModelConfig = MODEL, **train) -> Config:
    base = TrainConfig(total_steps=4, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=0,
                       sample_every=0, save_every=0, keep_last=10, precision="fp32")
    return Config(preset="tiny", model=model, diffusion=DiffusionConfig(num_timesteps=20),
                  data=DataConfig(source="digits", random_flip=True), train=replace(base, **train))


def make_parts(cfg: Config, fused: bool = False, seed: int = 0, device: str = "cpu"):
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.nets.unet import UNet
    from ddpm.training.precision import resolve_precision
    from ddpm.training.step import TrainParts
    from ddpm.training.tsampler import make_t_sampler

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = UNet.from_config(cfg.model, cfg.out_channels).train().to(dev)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    kw = dict(lr=0.0, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)
    opt = torch.optim.Adam(model.parameters(), **kw, **({"fused": True} if fused else {"foreach": True}))
    return TrainParts(cfg=cfg, model=model, train_model=model, diffusion=diffusion, ema=EMA(model, cfg.train.ema_decay),
                      optimizer=opt, t_sampler=make_t_sampler(cfg.train.t_sampler, diffusion.num_timesteps),
                      precision=resolve_precision(cfg.train.precision, dev), device=dev)


def adam_step_counts(optimizer):
    """``allow`` for forbid_host_sync: foreach Adam reads its per-parameter step count, a CPU
    scalar that lives on the host by design (on CUDA the trainer's fused Adam keeps it on the device)."""
    return lambda t: any(t is s.get("step") for s in optimizer.state.values())


def batch(k: int, n: int = 8, labels: bool = False):
    from ddpm.training.step import Batch

    g = torch.Generator().manual_seed(100 + k)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return Batch(x0, {"y": torch.randint(0, 3, (n,), generator=g)} if labels else {})


# ---------------------------------------------------------------------------------------------- no host reads

def test_the_checker_refuses_host_reads_and_restores_torch():
    x = torch.ones(3)
    with forbid_host_sync() as refused:
        for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: float(x[0]), lambda: x.tolist(),
                     lambda: x.cpu(), lambda: x.numpy(), lambda: int(x[0])):
            with pytest.raises(HostSyncError):
                read()
        with hostsync.host_reads("test"):
            assert x.sum().item() == 3.0 and bool(x.all())
    assert len(refused) == 7
    assert x.sum().item() == 3.0 and bool(x.all()) and x.tolist() == [1.0] * 3  # restored
    assert "item" not in vars(torch.Tensor) and "__bool__" not in vars(torch.Tensor)


@pytest.mark.parametrize("variant", ["fp32", "bf16+accum", "conditional", "fused", "recipes"])
def test_train_step_reads_nothing_on_the_host(variant):
    from ddpm.training.step import train_step

    model = replace(MODEL, num_classes=3) if variant == "conditional" else MODEL
    cfg = tiny_config(model, precision="bf16" if variant.startswith("bf16") else "fp32",
                      grad_accum=2 if variant.endswith("accum") else 1)
    if variant == "recipes":  # Min-SNR weights, a decaying LR and the EMA ramp (ddpm.training.schedules)
        cfg = replace(cfg, train=replace(cfg.train, loss_weighting="min_snr:5", lr_schedule="cosine",
                                         ema_warmup="ramp"))
    parts = make_parts(cfg, fused=variant == "fused")
    before = [p.detach().clone() for p in parts.params]
    results = []
    with forbid_host_sync(allow=adam_step_counts(parts.optimizer)) as refused:
        for k in range(3):
            results.append(train_step(parts, batch(k, labels=variant == "conditional"), step=k + 1))
    assert refused == []
    assert all(r.applied for r in results)  # read afterwards: the step left them on the device
    assert any(not torch.equal(a, p) for a, p in zip(before, parts.params))


def test_the_checker_catches_a_host_side_guard(monkeypatch):
    """The test above has teeth: the old guard (``if finite:`` on the host) is refused."""
    from ddpm.training import step as step_mod

    def host_guard(optimizer, finite):
        if bool(finite):
            optimizer.step()

    monkeypatch.setattr(step_mod, "guarded_step", host_guard)
    parts = make_parts(tiny_config())
    with forbid_host_sync(allow=adam_step_counts(parts.optimizer)), pytest.raises(HostSyncError, match="__bool__"):
        step_mod.train_step(parts, batch(0), step=1)


def test_trainer_reads_the_device_once_per_log_window(tmp_path, monkeypatch):
    """train() under the checker: the only reads are the declared ones, the window read once per
    train.log_every steps (and at the checkpoint), never in between."""
    from ddpm.training import loop, train

    made = []

    def spy(params, tc, device):
        made.append(real(params, tc, device))
        return made[-1]

    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", spy)
    hostsync.reads.clear()
    cfg = tiny_config(total_steps=8, log_every=4, save_every=8)
    allow = lambda t: bool(made) and adam_step_counts(made[0])(t)  # noqa: E731
    with forbid_host_sync(allow=allow) as refused:
        r = train(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda m: None)
    assert refused == [] and r["step"] == 8
    assert hostsync.reads["window"] == 2 and hostsync.reads["checkpoint"] == 1, hostsync.reads
    assert set(hostsync.reads) == {"setup", "window", "checkpoint"}, hostsync.reads


# ---------------------------------------------------------------------------------------------- device guard

def _nan_batch(k: int):
    b = batch(k)
    b.x0[0, 0, 0, 0] = float("nan")  # one pixel: the loss sum and every gradient go NaN
    return b


def _state(parts) -> dict[str, torch.Tensor]:
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(parts.params)}
    out.update({f"e{i}": e.detach().clone() for i, e in enumerate(parts.ema.module.parameters())})
    for i, p in enumerate(parts.params):
        for k, v in parts.optimizer.state.get(p, {}).items():
            out[f"o{i}/{k}"] = v.clone()
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_device_guard_skips_exactly_the_nonfinite_steps(fused):
    """Steps 0..5 with NaN batches at 2 and 4 == steps 0, 1, 3, 5 alone (same indices, so the same
    t, noise and LR), bit for bit; the flags say which were skipped."""
    from ddpm.training.step import train_step

    cfg = tiny_config()
    bad = {2, 4}
    a = make_parts(cfg, fused=fused)
    flags = []
    for k in range(6):
        flags.append(train_step(a, _nan_batch(k) if k in bad else batch(k), step=k).applied)
    assert flags == [k not in bad for k in range(6)]
    b = make_parts(cfg, fused=fused)
    for k in range(6):
        if k not in bad:
            assert train_step(b, batch(k), step=k).applied
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and any(k.endswith("/step") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    steps = {float(v) for k, v in sa.items() if k.endswith("/step")}
    assert steps == {4.0}  # Adam counted only the applied updates


def test_cpu_host_guard_gives_the_device_guards_bits(monkeypatch):
    """The CPU default (flag read on the host) and the device form: the same weights, EMA, Adam
    moments and step counts after steps with NaN batches (not the first: a skipped first step
    leaves zero moments in the device form and no state in the host form, the same optimiser)."""
    from ddpm.training.step import train_step

    cfg = tiny_config()
    bad = {2, 4}
    runs = {}
    for host in (False, True):
        monkeypatch.setattr(guard, "HOST_GUARD_ON_CPU", host)
        parts = make_parts(cfg)
        flags = [bool(train_step(parts, _nan_batch(k) if k in bad else batch(k), step=k).applied) for k in range(6)]
        assert flags == [k not in bad for k in range(6)]
        runs[host] = _state(parts)
    assert runs[True].keys() == runs[False].keys()
    for k in runs[True]:
        assert torch.equal(runs[True][k], runs[False][k]), k
    # and the host form really is the one on the CPU by default (it reads the flag: the checker refuses it)
    monkeypatch.setattr(guard, "HOST_GUARD_ON_CPU", True)
    parts = make_parts(cfg)
    with forbid_host_sync(allow=adam_step_counts(parts.optimizer)), pytest.raises(HostSyncError, match="__bool__"):
        train_step(parts, batch(0), step=1)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_skipped_step_changes_nothing(fused):
    from ddpm.training.step import train_step

    parts = make_parts(tiny_config(), fused=fused)
    train_step(parts, batch(0), step=1)
    before = _state(parts)
    r = train_step(parts, _nan_batch(1), step=2)
    assert not r.applied and not torch.isfinite(r.stats[0])
    after = _state(parts)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert train_step(parts, batch(2), step=3).applied  # and training goes on


# ---------------------------------------------------------------------------------------------- EMA

def test_ema_tensor_weight_matches_the_scalar_lerp():
    torch.manual_seed(1)
    ema = [torch.randn(1001), torch.randn(16, 3, 3, 3)]
    params = [e + 1e-2 * torch.randn_like(e) for e in ema]
    w = 1 - 0.9999
    ref = [e.clone() for e in ema]
    torch._foreach_lerp_(ref, params, w)
    cpu = [e.clone() for e in ema]
    foreach_lerp_tensor_(cpu, params, torch.tensor(w, dtype=torch.float32))
    assert all(torch.equal(x, y) for x, y in zip(cpu, ref))  # the CPU form: bit for bit
    multi = [e.clone() for e in ema]
    foreach_lerp_tensor_(multi, params, torch.tensor(w, dtype=torch.float32), exact=False)
    for x, y, e, p in zip(multi, ref, ema, params):
        # d = p - e, e + w·d: three roundings (sub, mul, add) where lerp has two; each is at
        # most half an ulp of its result, and |w·d| << |e|, so within one ulp of |e| (+ an ulp of w·d)
        bound = torch.finfo(torch.float32).eps * (e.abs() + (w * (p - e)).abs())
        assert bool(((x - y).abs() <= bound).all())
    for exact in (True, False):
        same = [e.clone() for e in ema]
        foreach_lerp_tensor_(same, params, torch.zeros(()), exact=exact)
        assert all(torch.equal(x, e) for x, e in zip(same, ema))


def test_ema_update_with_a_false_flag_keeps_the_average():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    old = [p.clone() for p in ema.module.parameters()]
    ema.update(net, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(old, ema.module.parameters()))
    ema.update(net, torch.tensor(True))
    ref = EMA(torch.nn.Linear(3, 2), 0.5)
    ref.module.load_state_dict({k: v for k, v in zip(ema.module.state_dict(), old)})
    ref.update(net)
    assert all(torch.equal(a, b) for a, b in zip(ref.module.parameters(), ema.module.parameters()))


# ---------------------------------------------------------------------------------------------- data on the device

class _Images:
    """A dataset of n random uint8 [H, W, C] images (``take`` as the real datasets have)."""

    def __init__(self, n: int = 13, hw: int = 5, c: int = 3):
        self.data = torch.randint(0, 256, (n, hw, hw, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).numpy()

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices):
        return self.data[indices]


def test_batches_gathered_on_the_device_are_the_host_batches():
    """Same bytes, flips included, across epoch boundaries, for each rank's slice."""
    from ddpm.training.batches import BatchSource

    for rank in (0, 1):
        host = BatchSource(_Images(), 6, seed=4, flip=True, rank=rank, world_size=2, labels=list(range(13)))
        dev = BatchSource(_Images(), 6, seed=4, flip=True, rank=rank, world_size=2, labels=list(range(13)))
        assert dev.put_on_device(torch.device("cpu")) == 13 * 5 * 5 * 3
        for _ in range(7):  # 42 images: three passes over 13
            a, b = host.next(), dev.next()
            assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)
            assert torch.equal(host.last_labels, dev.last_labels)
        assert host.state_dict() == dev.state_dict()


def test_trainer_with_data_on_device_is_bit_identical(tmp_path):
    from ddpm.checkpoint import load_checkpoint
    from ddpm.training import train

    out = {}
    for setting in (False, True):
        msgs: list[str] = []
        cfg = tiny_config(total_steps=3, data_on_device=setting)
        out[setting] = train(cfg, tmp_path / str(setting), device="cpu", progress=False, log=msgs.append)
        assert any("kept on cpu" in m for m in msgs) == setting
    a, b = load_checkpoint(out[False]["checkpoint"])[0], load_checkpoint(out[True]["checkpoint"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the captured step

@pytest.mark.parametrize("variant", ["fp32", "conditional+accum"])
def test_step_graph_bookkeeping_equals_train_step(variant):
    """StepGraph without capture (the CPU stand-in for a replay): static buffers, per-step seeding
    and the undone warm-up steps give exactly train_step's results and state."""
    from ddpm.training.graphstep import StepGraph
    from ddpm.training.step import train_step

    cond = variant.startswith("conditional")
    model = replace(MODEL, num_classes=3, dropout=0.1) if cond else replace(MODEL, dropout=0.1)
    cfg = tiny_config(model, grad_accum=2 if variant.endswith("accum") else 1)
    eager, graphed = make_parts(cfg), make_parts(cfg)
    graph = StepGraph(graphed, warmup=2, capture=False)
    for k in range(4):
        torch.manual_seed(50 + k) if k == 0 else None  # dropout: the same global stream for both
        state = torch.get_rng_state()
        a = train_step(eager, batch(k, labels=cond), step=k)
        after_eager = torch.get_rng_state()
        torch.set_rng_state(state)
        b = graph(batch(k, labels=cond), step=k)
        assert torch.equal(torch.get_rng_state(), after_eager)  # warm-up left the dropout stream alone
        assert torch.equal(a.record(), b.record()), k
    sa, sb = _state(eager), _state(graphed)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_step_graph_refuses_what_it_cannot_capture():
    from ddpm.errors import ConfigError
    from ddpm.training.graphstep import StepGraph

    with pytest.raises(ConfigError, match="train.cuda_graph.*CUDA device.*fused Adam"):
        StepGraph(make_parts(tiny_config()))
    with pytest.raises(ConfigError, match="t_sampler=uniform"):
        StepGraph(make_parts(tiny_config(t_sampler="importance")), capture=False)
    with pytest.raises(ConfigError, match="ema_warmup=none"):
        StepGraph(make_parts(tiny_config(ema_warmup="ramp")), capture=False)


@pytest.mark.slow
def test_compiled_step_equals_eager_within_the_rounding_bound():
    """train.compile (inductor, CPU) against eager, one step from the same state.

    Bounds from the arithmetic: a float32 dot product of length K has a relative error of at
    most K·u (u = 2^-24); along the network's longest path of D reductions the output's relative
    error is at most D·K·u, and so are the loss's and the gradients' (relative to their scale,
    the global gradient norm after clipping).
    One Adam step from zero moments moves each weight by -lr·g/(|g|+eps); that function of g has
    slope at most 1/eps and range 2, so the exact updates differ by at most lr·min(2, |g-g'|/eps).
    Each side computes its update with about eight roundings (moments, bias corrections, square
    root, eps, division, lr), so add 8u of each update, and half an ulp of the weight per side for
    the final subtraction; the EMA (decay 0.9) moves by a tenth of the weights' change (plus its
    own final rounding)."""
    from ddpm.training.step import train_step

    model = replace(MODEL, ch_mult=(1,), attn_resolutions=())  # small: inductor compiles slowly on 2 cores
    cfg = tiny_config(model, warmup_steps=0)
    eager, comp = make_parts(cfg), make_parts(cfg)
    start = [p.detach().clone() for p in eager.params]
    comp.train_model = torch.compile(comp.model)
    a = train_step(eager, batch(0), step=0)
    b = train_step(comp, batch(0), step=0)
    u = 2.0 ** -24
    K = 3 * 3 * model.ch * max(model.ch_mult)  # the longest reduction: a 3x3 conv at the widest level
    D = 2 * (len(model.ch_mult) * (model.num_res_blocks + 1) * 2 + 4)  # convs on the path, forward and backward
    rel = D * K * u
    assert bool(a.finite) and bool(b.finite)
    torch.testing.assert_close(b.stats, a.stats, rtol=rel, atol=0)
    torch.testing.assert_close(b.norm, a.norm, rtol=rel, atol=0)
    lr, eps = cfg.train.lr, cfg.train.adam_eps
    scale = min(float(a.norm), cfg.train.grad_clip)
    for p0, pe, pc, ee, ec in zip(start, eager.params, comp.params, eager.ema.module.parameters(),
                                  comp.ema.module.parameters()):
        ge, gc = pe.grad, pc.grad
        # rounding scales with the terms summed, not with the result (a bias before a GroupNorm
        # has a gradient of exactly 0 made of cancelling terms): the scale is the clipped global norm
        assert bool(((gc - ge).abs() <= rel * scale).all())
        with torch.no_grad():
            # each side rounds its update (8u of it) and its subtraction (half an ulp, u·|p|)
            rounding = 8 * u * ((pe - p0).abs() + (pc - p0).abs()) + 2 * u * torch.maximum(pe.abs(), pc.abs())
            allowed = lr * torch.clamp((gc - ge).abs() / eps, max=2.0) + rounding
            assert bool(((pc - pe).abs() <= allowed).all())
            assert bool(((ec - ee).abs() <= 0.1 * allowed + 2 * u * torch.maximum(ee.abs(), ec.abs())).all())
    # the bound is not vacuous: the weights moved by up to lr and agree far closer than that
    moved = torch.cat([(pe.detach() - pc.detach()).abs().flatten() for pe, pc in zip(eager.params, comp.params)])
    assert float(moved.median()) < 1e-3 * lr


# ---------------------------------------------------------------------------------------------- CUDA
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_cuda_step_makes_no_host_sync_and_the_graph_replays_it():
    """On CUDA: steps under set_sync_debug_mode("error"); the captured step's replays equal the
    eager steps from the same state and dropout stream (the first loss bit for bit, the state
    within Adam's drift bound)."""
    from ddpm.training.graphstep import StepGraph
    from ddpm.training.step import Batch, train_step

    cfg = tiny_config(replace(MODEL, dropout=0.1), precision="bf16")
    eager, graphed = make_parts(cfg, fused=True, device="cuda"), make_parts(cfg, fused=True, device="cuda")
    graph = StepGraph(graphed, warmup=2)

    def cuda_batch(k):
        b = batch(k)
        return Batch(b.x0.cuda())

    train_step(eager, cuda_batch(0), step=0)  # lazy initialisation outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, 3):
            train_step(eager, cuda_batch(k), step=k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager2 = make_parts(cfg, fused=True, device="cuda")
    torch.cuda.manual_seed(7)
    a = [train_step(eager2, cuda_batch(k), step=k).record() for k in range(3)]
    torch.cuda.manual_seed(7)
    b = [graph(cuda_batch(k), step=k).record() for k in range(3)]
    assert torch.equal(a[0], b[0])  # the same weights, draws and dropout: the same kernels, the same loss
    sa, sb = _state(eager2), _state(graphed)
    # the replay may read the LR from a float32 tensor where the eager kernel gets it as a scalar;
    # bit for bit expected, but only the bound is asserted: each Adam update is at most ~lr in
    # size (|m̂|/sqrt(v̂) <= 1.002 for three steps), so 3 steps drift apart by at most 2·3·1.002·lr
    bound = 2 * 3 * 1.002 * 1e-3
    assert all(float((sa[k] - sb[k]).abs().max()) <= bound for k in sa if k.startswith(("p", "e")))
