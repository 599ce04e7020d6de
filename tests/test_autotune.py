"""Routing decided by timing where it runs (ddpm.autotune, issue 12): the cache is keyed on the
machine (CPU model and flags, torch version) and thread count and is invalidated when they change,
``DDPM_AUTOTUNE=0`` restores the static rules, and whatever is chosen computes the same as the
direct path within float32 bounds. The timer is replaced throughout: nothing here depends on how
fast this machine is.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddpm import autotune
from ddpm import winograd as wg
from test_winograd import NET_REL_TOL, _inputs, _unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Autotuning on, its cache in a fresh folder, an empty memory; yields set_times(dict), which
    installs a fake timer (each candidate really runs once, then 'takes' the given seconds) and
    returns the list of candidate names it was asked to time."""
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "BUDGET_S", 1e9)  # fake seconds must not cut the rounds short
    autotune.clear_memory()

    def set_times(times: dict[str, float]) -> list[str]:
        calls: list[str] = []

        def fake(name, fn, *args, **kwargs):
            fn()
            calls.append(name)
            return times[name]

        monkeypatch.setattr(autotune, "measure", fake)
        return calls

    yield set_times
    autotune.clear_memory()


def _candidates(ran: list[str]):
    return {name: (lambda name=name: ran.append(name)) for name in ("direct", "winograd")}


def test_choice_is_timed_once_then_cached_in_memory_and_on_disk(tuned, tmp_path):
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    ran: list[str] = []
    assert autotune.choose("k1", _candidates(ran), baseline="direct") == "winograd"
    # a warm-up call of each, then rounds of one call each in rotating order (load falls on both)
    assert calls[:6] == ["direct", "winograd", "direct", "winograd", "winograd", "direct"]
    # (a clear difference: decided after 3 rounds, not REPEATS)
    assert calls == ran and len(calls) == 2 * (1 + 3) < 2 * (1 + autotune.REPEATS)
    assert autotune.choose("k1", _candidates(ran), baseline="direct") == "winograd"
    autotune.clear_memory()  # a new process: read back from the file, not timed again
    assert autotune.choose("k1", _candidates(ran), baseline="direct") == "winograd"
    assert len(calls) == 2 * (1 + 3)
    files = list((tmp_path / "cache").glob("autotune-*.json"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))  # written atomically
    data = json.loads(files[0].read_text())
    assert data["machine"] == {"cpu": autotune.cpu_signature(), "torch": torch.__version__}
    (key, entry), = data["decisions"].items()
    assert key == f"k1|threads={torch.get_num_threads()}" and entry["choice"] == "winograd"
    assert entry["seconds"] == {"direct": 1.0, "winograd": 0.5}


def test_time_budget_bounds_a_decision(tuned, monkeypatch):
    """Slow candidates get fewer rounds: at most one past the budget (here: the first)."""
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    monkeypatch.setattr(autotune, "BUDGET_S", 1.2)
    assert autotune.choose("slow", _candidates([]), baseline="direct") == "winograd"
    assert len(calls) == 2 * 2  # warm-ups, then one round (1.5 "seconds" > 1.2)


def test_baseline_kept_unless_clearly_faster(tuned):
    """Within the noise margin the baseline (the direct path) is kept: never slower than it."""
    tuned({"direct": 1.0, "winograd": 1.0 - autotune.MARGIN / 2})
    assert autotune.choose("close", _candidates([]), baseline="direct") == "direct"
    tuned({"direct": 1.0, "winograd": 1.3})
    assert autotune.choose("slower", _candidates([]), baseline="direct") == "direct"
    tuned({"direct": 1.0, "winograd": 1.0 - 2 * autotune.MARGIN})
    assert autotune.choose("faster", _candidates([]), baseline="direct") == "winograd"
    with pytest.raises(ValueError, match="baseline"):
        autotune.choose("x", _candidates([]), baseline="nope")


@pytest.mark.parametrize("change", ["cpu", "torch", "threads"])
def test_cache_is_not_trusted_across_a_changed_machine(tuned, monkeypatch, change):
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    assert autotune.choose("k", _candidates([]), baseline="direct") == "winograd"
    n = len(calls)
    # the same decision on the same machine is not timed again, even by a new process ...
    autotune.clear_memory()
    autotune.choose("k", _candidates([]), baseline="direct")
    assert len(calls) == n
    # ... but after a change it is (the earlier answer would now be wrong)
    calls = tuned({"direct": 0.5, "winograd": 1.0})
    if change == "cpu":
        monkeypatch.setattr(autotune, "cpu_signature", lambda: "Another CPU | avx2 fma")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    else:
        torch.set_num_threads(2 if torch.get_num_threads() != 2 else 1)
    autotune.clear_memory()
    assert autotune.choose("k", _candidates([]), baseline="direct") == "direct"
    assert set(calls) == {"direct", "winograd"}


def test_foreign_or_corrupt_cache_file_is_ignored_and_replaced(tuned):
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    key = f"k|threads={torch.get_num_threads()}"
    # a file whose machine is another one (e.g. a hash collision or a copied home folder)
    path.write_text(json.dumps({"format": 1, "machine": {"cpu": "x", "torch": "y"},
                                "decisions": {key: {"choice": "direct"}}}))
    assert autotune.choose("k", _candidates([]), baseline="direct") == "winograd" and calls
    n = len(calls)
    path.write_text("{not json")
    autotune.clear_memory()
    assert autotune.choose("k", _candidates([]), baseline="direct") == "winograd" and len(calls) > n
    assert json.loads(path.read_text())["decisions"][key]["choice"] == "winograd"


def test_noisy_timings_hold_for_the_process_only(tuned, monkeypatch):
    """A busy machine (repeats spreading by more than MAX_SPREAD) decides for this process but
    writes nothing: the next process times again."""
    seq = iter([1.0, 1.0] + [0.2, 0.2, 3.0, 3.0] * autotune.REPEATS)  # rounds alternate fast, slow
    calls: list[str] = []
    monkeypatch.setattr(autotune, "measure", lambda name, fn: calls.append(name) or next(seq))
    assert autotune.choose("noisy", _candidates([]), baseline="direct") in ("direct", "winograd")
    assert not autotune.cache_path().exists()
    n = len(calls)
    autotune.choose("noisy", _candidates([]), baseline="direct")
    assert len(calls) == n  # (held in memory)
    # noisy but clear (every time of the winner below every time of the other): kept on disk, and
    # decided after 3 rounds
    seq = iter([1.0, 1.0] + [1.0, 0.4, 0.1, 3.0] * autotune.REPEATS)  # rounds: (direct, winograd), (w, d)
    calls.clear()
    assert autotune.choose("clear", _candidates([]), baseline="direct") == "winograd"
    assert autotune.cache_path().exists() and len(calls) == 2 + 2 * 3


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "ddpm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == tmp_path / "home" / ".cache" / "ddpm"
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / "mine"))
    assert autotune.cache_dir() == tmp_path / "mine"
    for off in ("0", "off", "false", "No"):
        monkeypatch.setenv(autotune.ENV_SWITCH, off)
        assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    assert autotune.enabled()


def test_cpu_signature_names_the_cpu_and_its_flags():
    sig = autotune.cpu_signature()
    name, _, flags = sig.partition(" | ")
    assert name
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "flags" in cpuinfo:
        assert name in cpuinfo and flags and all(f in cpuinfo for f in flags.split()[:5])


def _direct_and(model, x, t, **kw):
    with torch.inference_mode():
        ref = model(x, t)
        with wg.winograd_convs(model, **kw) as n:
            out = model(x, t)
    return ref, out, n


def test_winograd_routing_follows_the_timing_and_matches_direct(tuned):
    m = _unet(128)
    x, t = _inputs()
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    ref, out, n = _direct_and(m, x, t)
    assert n == sum(wg.is_eligible(c, wg.TUNE_MIN_CHANNELS) for c in m.modules()) >= 4
    assert calls and set(calls) == {"direct", "winograd"}
    shapes = len(autotune._MEMORY)  # one decision per distinct call shape, not per conv or per call
    assert 0 < shapes < n
    n_calls = len(calls)
    assert not torch.equal(out, ref)  # Winograd ran ...
    torch.testing.assert_close(out, ref, rtol=0, atol=NET_REL_TOL * ref.abs().max().item())  # ... and agrees
    with torch.inference_mode(), wg.winograd_convs(m):
        m(x, t)
    assert len(calls) == n_calls  # decided once: the second block reuses the decisions
    # a new process with another timer: the stored decisions stand (not timed again) ...
    calls = tuned({"direct": 0.5, "winograd": 1.0})
    autotune.clear_memory()
    with torch.inference_mode(), wg.winograd_convs(m):
        assert torch.equal(m(x, t), out) and not calls
    # ... and a new batch size is a new decision: here direct is faster, so the routed model is
    # the direct one, bit for bit
    with torch.inference_mode():
        ref7 = m(x[:7], t[:7])
        with wg.winograd_convs(m):
            assert torch.equal(m(x[:7], t[:7]), ref7)
    assert calls


def test_opt_out_restores_the_static_rule(tuned, monkeypatch):
    calls = tuned({"direct": 0.5, "winograd": 1.0})
    m = _unet(64)  # 64 channels: a candidate when tuned, never under the static rule
    x, t = _inputs()
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    _, _, n = _direct_and(m, x, t)
    assert n == 0 and not calls
    m = _unet(128)
    ref, out, n = _direct_and(m, x, t)
    assert n > 0 and not calls and not torch.equal(out, ref)  # static: Winograd, untimed
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    ref, out, _ = _direct_and(m, x, t, autotune=False)  # --conv winograd: forced, untimed
    assert not calls and not torch.equal(out, ref)
    ref, out, _ = _direct_and(m, x, t)
    assert calls and torch.equal(out, ref)  # timed: direct is faster here
    with wg.winograd_convs(m, enabled=False) as n_off:  # --conv direct
        assert n_off == 0


def test_training_routing_is_timed_with_gradients_and_matches_direct(tuned):
    """autograd=True (the trainer): the timed candidates run forward and backward; the chosen
    path's gradients equal the direct ones within float32 bounds; .grad is untouched by timing."""
    calls = tuned({"direct": 1.0, "winograd": 0.5})
    m = _unet(128)
    x, t = _inputs()
    ref = m(x, t)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with wg.winograd_convs(m, autograd=True):
        out = m(x, t)
        assert all(p.grad is None for p in m.parameters())  # the timing did not accumulate gradients
        out.square().mean().backward()
    assert calls and "grad" in next(iter(autotune._MEMORY))[3]
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=NET_REL_TOL * ref.abs().max().item())
    for name, p in m.named_parameters():
        if name.endswith("k.bias"):  # softmax is shift-invariant: its true gradient is 0 (float noise)
            continue
        r = ref_grads[name]
        torch.testing.assert_close(p.grad, r, rtol=0, atol=4 * NET_REL_TOL * r.abs().max().item() + 1e-12,
                                   msg=name)
