"""Fast paths (issue 6): channels_last, torch.compile, bf16 autocast and CUDA graphs give the same
results as the plain eager fp32 path, within float tolerance, and leave the model as it was.

Speed itself is measured by benchmarks/run.py, never asserted here.
"""

from __future__ import annotations

import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.fast import FastModel, channels_last, to_channels_last, wants_channels_last
from ddpm.nets.unet import UNet
from ddpm.sampling import interpolate, sample, sample_chains, sample_progressive
from ddpm.speed import Speed
from ddpm.schedule import get_beta_schedule

T = 8
SHAPE = (1, 8, 8)
SEEDS = [3, 1, 4]
CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusion(t: int = T) -> GaussianDiffusion:
    return GaussianDiffusion(get_beta_schedule("linear", t, 1e-4 * 1000 / t, min(0.02 * 1000 / t, 0.999)))


def _tiny(seed: int = 0, levels: int = 2) -> UNet:
    """A small U-Net with attention whose near-zero output layers are perturbed, so that its
    output depends on x and t (a freshly initialised one outputs ~1e-10). ``levels=1``: no
    down/upsampling (fewer kernels to compile)."""
    torch.manual_seed(seed)
    m = UNet(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2)[:levels], num_res_blocks=1,
             attn_resolutions=(4,) if levels == 2 else (8,), dropout=0.0, resolution=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def _snapshot(m: torch.nn.Module):
    return [(n, p, p.data_ptr(), p.stride(), p.detach().clone()) for n, p in m.named_parameters()]


def _assert_unchanged(m: torch.nn.Module, snap) -> None:
    now = dict(m.named_parameters())
    for name, p, ptr, stride, value in snap:
        assert now[name] is p, f"{name}: the Parameter object was replaced"
        assert p.data_ptr() == ptr and p.stride() == stride, f"{name}: storage or strides not restored"
        assert torch.equal(p.detach(), value), f"{name}: values changed"


def test_channels_last_context_converts_then_restores_the_module():
    m = _tiny()
    snap = _snapshot(m)
    convs = [p for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(not p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    with channels_last(m) as same:
        assert same is m
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert all(q is p for q, (_, p, *_) in zip(m.parameters(), snap))  # optimiser/EMA references stay valid
    _assert_unchanged(m, snap)
    with channels_last(m, enabled=False):
        assert all(not p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_channels_last_context_restores_after_an_error():
    m = _tiny()
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last(m):
            raise RuntimeError("boom")
    _assert_unchanged(m, snap)


def test_fast_model_channels_last_matches_the_plain_call():
    m = _tiny()
    x, t = torch.randn(3, *SHAPE), torch.tensor([0, 5, 999])
    with torch.no_grad():
        ref = m(x, t)
        fm = FastModel(m, "cpu", channels_last=True)
        assert fm.channels_last and not fm.compile and not fm.cuda_graph
        with channels_last(m):
            out = fm(x, t)
    assert out.is_contiguous()  # the sampler's arithmetic stays NCHW
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (ref - m(x, torch.tensor([1, 6, 998]))).abs().max() > 1e-3  # the check above can fail


def test_fast_model_leaves_plain_callables_and_other_devices_alone():
    def f(x, t):
        return 2 * x

    assert not wants_channels_last(f, "cpu")
    assert not wants_channels_last(_tiny(), "meta")
    assert wants_channels_last(_tiny(), "cpu")
    # CPU: NHWC only for images of 32x32 and more (measured slower on 8x8); CUDA: only compiled
    assert not wants_channels_last(_tiny(), "cpu", (8, 8)) and wants_channels_last(_tiny(), "cpu", (32, 32))
    assert not wants_channels_last(_tiny(), "cuda", (32, 32))
    assert wants_channels_last(_tiny(), "cuda", (32, 32), compile=True)
    assert not FastModel(_tiny(), "cpu", image_hw=(8, 8)).channels_last
    fm = FastModel(f, "cpu", cuda_graph=True)
    assert not fm.channels_last and not fm.cuda_graph  # CUDA graphs only on CUDA
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(fm(x, torch.zeros(2, dtype=torch.int64)), 2 * x)
    y = to_channels_last(torch.randn(2, 3, 4, 4))
    assert y.is_contiguous(memory_format=torch.channels_last) and to_channels_last(y) is y


@pytest.mark.parametrize("kw", [dict(), dict(sampler="ddim", steps=4, eta=0.5)], ids=["ancestral", "ddim"])
def test_sample_channels_last_matches_plain_and_restores_model(kw):
    m, d = _tiny(), _diffusion()
    snap = _snapshot(m)
    plain = sample(d, m, SHAPE, SEEDS, speed=Speed(channels_last=False), **kw)
    fast = sample(d, m, SHAPE, SEEDS, speed=Speed(channels_last=True), **kw)
    _assert_unchanged(m, snap)
    assert fast.is_contiguous() and fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    other = sample(d, _tiny(seed=5), SHAPE, SEEDS, speed=Speed(channels_last=True), **kw)
    assert (other - fast).abs().max() > 1e-2  # a different network gives different samples


def test_progressive_chains_interpolate_channels_last_match_plain():
    m, d = _tiny(), _diffusion()
    f1, xs1, ts1 = sample_progressive(d, m, SHAPE, SEEDS, every=3, speed=Speed(channels_last=False))
    f2, xs2, ts2 = sample_progressive(d, m, SHAPE, SEEDS, every=3, speed=Speed(channels_last=True))
    assert ts1 == ts2
    torch.testing.assert_close(xs2, xs1, rtol=0, atol=1e-4)
    torch.testing.assert_close(f2, f1, rtol=0, atol=1e-4)
    c1 = sample_chains(d, m, SHAPE, seed=2, n=2, split_steps=(0, 4), speed=Speed(channels_last=False))
    c2 = sample_chains(d, m, SHAPE, seed=2, n=2, split_steps=(0, 4), speed=Speed(channels_last=True))
    torch.testing.assert_close(c2, c1, rtol=0, atol=1e-4)
    a, b = torch.rand(*SHAPE) * 2 - 1, torch.rand(*SHAPE) * 2 - 1
    i1 = interpolate(d, m, a, b, t=5, lambdas=[0.0, 0.5, 1.0], seed=1, speed=Speed(channels_last=False))
    i2 = interpolate(d, m, a, b, t=5, lambdas=[0.0, 0.5, 1.0], seed=1, speed=Speed(channels_last=True))
    torch.testing.assert_close(i2, i1, rtol=0, atol=1e-4)


def test_sample_bf16_autocast_close_to_fp32():
    """bf16 autocast for the network (the sampler's math stays fp32): the samples differ from
    fp32 (autocast really ran) by ~0.3% of the [-1, 1] range on average, two orders of magnitude
    less than samples from other seeds differ. (Single pixels can move more: the x0 prediction
    divides the network's error by sqrt(abar), large at the first steps.)"""
    m, d = _tiny(), _diffusion()
    ref = sample(d, m, SHAPE, SEEDS)
    bf = sample(d, m, SHAPE, SEEDS, amp_dtype=torch.bfloat16)
    other = sample(d, m, SHAPE, [s + 100 for s in SEEDS])
    assert bf.dtype == torch.float32
    err = (bf - ref).abs().mean().item()
    assert 0 < err < 0.02, err
    assert err < 0.02 * (other - ref).abs().mean().item()


def test_lowp_weights_is_bit_identical_to_autocast_and_restores():
    """bf16 weights cast once for a whole loop give exactly what autocast gives when it casts
    them at every call (in either memory layout); the module is as before afterwards."""
    from ddpm.diffusion import call_model
    from ddpm.fast import lowp_weights

    m = _tiny()
    snap = _snapshot(m)
    x, t = torch.randn(3, *SHAPE), torch.tensor([0, 5, 999])
    bf = torch.bfloat16
    with torch.inference_mode():
        ref = call_model(m, x, t, bf)
        with lowp_weights(m, bf):
            kinds = {p.dtype for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))
                     for p in mod.parameters(recurse=False)}
            norms = {p.dtype for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm) for p in mod.parameters()}
            assert kinds == {bf} and norms == {torch.float32}
            assert torch.equal(call_model(m, x, t, bf), ref)
            assert torch.equal(call_model(m, x, t, bf), ref)
        with channels_last(m):
            ref_cl = call_model(FastModel(m, "cpu"), x, t, bf)
            with lowp_weights(m, bf):
                assert torch.equal(call_model(FastModel(m, "cpu"), x, t, bf), ref_cl)
        fp32 = call_model(m, x, t, None)
    assert not torch.equal(ref, fp32)  # autocast really changed the arithmetic
    _assert_unchanged(m, snap)
    assert all(p.requires_grad for p in m.parameters())
    with lowp_weights(m, None), lowp_weights(lambda x, t: x, bf):
        assert all(p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch, fast_bf16):
    import warnings

    import ddpm.fast as fast

    monkeypatch.setattr(fast, "_WARNED_SLOW_BF16", False)
    monkeypatch.setattr(fast, "cpu_has_fast_bf16", lambda: fast_bf16)
    m, d = _tiny(), _diffusion(3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sample(d, m, SHAPE, SEEDS[:1])  # fp32: never warns
        assert not [w for w in seen if "bf16" in str(w.message)]
        sample(d, m, SHAPE, SEEDS[:1], amp_dtype=torch.bfloat16)
        sample(d, m, SHAPE, SEEDS[:1], amp_dtype=torch.bfloat16)
    msgs = [w for w in seen if "bf16" in str(w.message)]
    assert len(msgs) == (0 if fast_bf16 else 1)
    if msgs:
        assert issubclass(msgs[0].category, RuntimeWarning) and "fp32" in str(msgs[0].message)


@pytest.mark.slow
def test_sample_compile_matches_eager_and_compiles_once():
    """torch.compile (inductor, CPU) inside the sampler: same samples as eager within float
    rounding; a second call with the same shapes reuses the compiled code."""
    from torch._dynamo.utils import counters

    m, d = _tiny(levels=1), _diffusion(4)
    snap = _snapshot(m)
    eager = sample(d, m, SHAPE, SEEDS)
    before = counters["stats"]["unique_graphs"]
    comp = sample(d, m, SHAPE, SEEDS, speed=Speed(compile=True))
    compiled_graphs = counters["stats"]["unique_graphs"] - before
    assert compiled_graphs >= 1
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-4)
    again = sample(d, m, SHAPE, SEEDS, speed=Speed(compile=True))
    assert counters["stats"]["unique_graphs"] - before == compiled_graphs  # no recompilation
    assert torch.equal(again, comp)
    _assert_unchanged(m, snap)


# ------------------------------------------------------------------------------------------ CUDA
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_sampling_matches_eager(amp):
    m, d = _tiny().cuda(), _diffusion()
    eager = sample(d, m, SHAPE, SEEDS, device="cuda", amp_dtype=amp, speed=Speed(channels_last=False))
    graphed = sample(d, m, SHAPE, SEEDS, device="cuda", amp_dtype=amp, speed=Speed(cuda_graph=True))
    tol = 1e-4 if amp is None else 0.05
    torch.testing.assert_close(graphed, eager, rtol=0, atol=tol)
    x, t = torch.randn(3, *SHAPE, device="cuda"), torch.tensor([0, 5, 7], device="cuda")
    fm = FastModel(m, "cuda", cuda_graph=True)
    with torch.no_grad(), channels_last(m):
        a = fm(x, t)
        b = fm(x + 1, t)  # a replay must not overwrite an earlier result
        torch.testing.assert_close(a, m(x, t), rtol=0, atol=1e-4)
        torch.testing.assert_close(b, m(x + 1, t), rtol=0, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_cuda_sampling_loop_makes_no_host_sync():
    """The reverse loop (network, step, noise) never waits for the GPU: coefficients are
    pre-gathered on the device and nothing is read back until the final copy to the host."""
    from ddpm.rng import ImageNoise
    from ddpm import samplers
    from ddpm.samplers.base import Denoiser
    from ddpm.sampling import make_chain

    m, d = _tiny().cuda(), _diffusion()
    noise = ImageNoise(SEEDS, SHAPE, "cuda")
    x = noise.next()
    fm = FastModel(m, "cuda", cuda_graph=True)
    chain = make_chain(d, "cuda")
    with torch.inference_mode(), channels_last(m):
        units = [samplers.get(name)(chain) for name in samplers.names()]  # every sampler's tables, made
        denoise = Denoiser(fm, chain, len(SEEDS))
        denoise(x, T - 1)  # the graph is captured before the check (capturing may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = torch.stack([u.run(denoise, x, noise) for u in units])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_cuda_compile_reduce_overhead_sampling_matches_eager():
    m, d = _tiny().cuda(), _diffusion(4)
    eager = sample(d, m, SHAPE, SEEDS, device="cuda", speed=Speed(channels_last=False))
    comp = sample(d, m, SHAPE, SEEDS, device="cuda", speed=Speed(compile=True, cuda_graph=True))
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ harness
def _bench_modules():
    import sys
    from pathlib import Path

    path = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    import timing
    import workloads

    return timing, workloads


def test_bench_alternate_rotates_the_order_and_keeps_every_time():
    timing, _ = _bench_modules()
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    out = timing.alternate(fns, repeats=3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.warmup) == 1 and len(t.times) == 3 and len(t.cpu_times) == 3 for t in out.values())
    t = timing.Timing("x", times=[3.0, 1.0, 2.0], cpu_times=[1.0, 5.0, 4.0])
    assert (t.median, t.min, t.cpu_median) == (2.0, 1.0, 4.0)
    with pytest.raises(ValueError):
        timing.alternate(fns, repeats=0)


def test_bench_ours_and_diffusers_run_the_same_network_and_steps():
    """The harness compares like with like: diffusers' UNet2DModel holds our weights and computes
    the same function; one training step of each lowers nothing to NaN and moves the weights."""
    pytest.importorskip("diffusers")
    from ddpm.config import get_preset

    _, W = _bench_modules()
    cfg = get_preset("digits")
    ours, theirs = W.build_models(cfg, torch.device("cpu"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        for p in ours.parameters():  # perturb ours, then rebuild theirs from it: outputs must follow
            p.add_(0.02 * torch.randn_like(p))
        from ddpm.interop.diffusers import state_dict_to_diffusers

        theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict()))
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().max() > 1e-2
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

    x0 = W.fixed_batch(cfg, 4, torch.device("cpu"))
    diffusion = _diffusion(1000)
    before = [p.detach().clone() for p in ours.parameters()]
    step = W.OursTrainStep(ours, diffusion, x0, torch.device("cpu"), W.OursOptions(channels_last=True))
    step()
    assert torch.isfinite(step.last_loss) and any(not torch.equal(p, q) for p, q in zip(before, ours.parameters()))
    theirs_step = W.TheirsTrainStep(theirs, x0, torch.device("cpu"))
    theirs_step()
    assert torch.isfinite(theirs_step.last_loss)
    # the same kind of loss: L_simple of a near-identity network is ~ E[eps^2] ~ 1 for both
    assert 0.2 < float(step.last_loss) < 5 and 0.2 < float(theirs_step.last_loss) < 5


@pytest.mark.slow
def test_gpu_benchmark_script_dry_run(tmp_path):
    """benchmarks/gpu.py (what benchmarks/gpu.sh runs on a GPU) end to end on the CPU with a tiny
    U-Net: every variant runs, the JSON names the device and holds finite timings and ratios."""
    pytest.importorskip("diffusers")
    import json
    import math

    _bench_modules()
    import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--channels-last", "--only", "train", "--only", "sample", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["dry_run"] and res["meta"]["device"] == "cpu" and res["meta"]["device_name"]
    tr, sa = res["train"], res["sample"]
    assert {"diffusers_bf16", "diffusers_fp32", "ours_bf16_fused", "ours_bf16_fused_channels_last",
            "ours_bf16_fused_graph"} <= set(tr["variants"])
    assert {"diffusers_bf16", "diffusers_fp32", "ours_fp32_eager", "ours_bf16_eager", "ours_fp32_graph",
            "ours_bf16_graph", "ours_bf16_graph_channels_last"} <= set(sa["variants"])
    assert sa["eager_fp32_x_vs_diffusers_fp32"] > 0
    assert all(math.isfinite(v["last_loss"]) for v in tr["variants"].values())
    assert all(v["finite"] for v in sa["variants"].values())
    assert tr["x_vs_diffusers_bf16"] > 0 and sa["x_vs_diffusers_bf16"] > 0
    key = f"seconds_{sa['batch']}x{sa['num_timesteps']}"
    assert sa[f"ours_best_{key}"] == min(v[key] for k, v in sa["variants"].items() if k.startswith("ours"))


@pytest.mark.slow
def test_gpu_benchmark_checks_256_and_profile_dry_run(tmp_path):
    """benchmarks/gpu.py's issue-21 sections on the CPU: the captured-step bookkeeping equals the
    eager step, the trainer's data path + step read nothing on the host (the package's checker
    stands in for CUDA's sync debug mode), the 256x256 preset's section and the profile run."""
    pytest.importorskip("diffusers")
    import json

    _bench_modules()
    import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--only", "checks", "--only", "big", "--only", "profile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    g, h = res["checks"]["graph_vs_eager"], res["checks"]["no_host_sync"]
    assert g["bit_identical"] and g["within_bound"] and g["model_bound"] > 0
    assert h["eager"]["ok"] and h["graph"]["ok"] and h["eager"]["losses_finite"]
    big = res["big"]
    assert big["preset"] == "celebahq256" and big["sample"]["extrapolated"]
    assert all(v["steps_per_s"] > 0 for v in big["train"]["variants"].values())
    assert {"sample_ours_fp32_eager", "sample_diffusers_fp32"} <= set(res["profile"])
    assert all(v["wall_s_per_call"] > 0 for k, v in res["profile"].items() if isinstance(v, dict))
    assert all(line and "rror" not in line for line in gpu.summary_lines(res))


@pytest.mark.slow
def test_gpu_profile_script_dry_run(tmp_path):
    """benchmarks/gpu_profile.py end to end on the CPU with a tiny U-Net: every workload is
    profiled and reported with a positive wall time per call."""
    pytest.importorskip("diffusers")
    import json

    _bench_modules()
    import gpu_profile

    out = tmp_path / "profile.json"
    assert gpu_profile.main(["--dry-run", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    names = set(res["workloads"])
    assert {"sample_ours_bf16_nchw", "sample_ours_bf16_channels_last", "sample_diffusers_bf16",
            "train_ours_bf16_nchw", "train_ours_bf16_channels_last", "train_diffusers_bf16"} == names
    assert all(w["wall_s_per_call"] > 0 and w["gpu_busy_s_per_call"] >= 0 for w in res["workloads"].values())
