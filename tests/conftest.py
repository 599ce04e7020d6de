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
