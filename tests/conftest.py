"""Shared test fixtures. Tests must stay small: the suite runs on 2 CPU cores in CI."""

from __future__ import annotations

import os

import pytest
import torch

# Deterministic, modest thread use: several test processes may share 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after). Small networks gain nothing from a second
    OpenMP thread and lose 10-20x when other processes share the 2 cores (barrier waits).
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def _no_autotune_no_home_cache(tmp_path_factory):
    """Routing must not depend on timings in tests, and tests never write to the user's cache:
    ``DDPM_AUTOTUNE=0`` (the static routing rules of ddpm.winograd / ddpm.fast) and a temporary
    ``DDPM_CACHE_DIR`` for the whole session (CLI subprocesses inherit both). The autotune tests
    turn it on themselves, with a replaced timer (tests/test_autotune.py)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DDPM_AUTOTUNE", "0")
    mp.setenv("DDPM_CACHE_DIR", str(tmp_path_factory.mktemp("ddpm_cache")))
    yield
    mp.undo()
