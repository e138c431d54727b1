"""Shared test setup: Hypothesis profiles, one torch thread for the tiny models, and shared fixtures.

Hypothesis runs derandomized by default (profile ``ci``): the same examples on every run, so CI gives the same
result twice. ``HYPOTHESIS_PROFILE=dev pytest`` explores more, fresh examples; pin what it finds with
``@example``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from tests import tiny

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared machine's other jobs disturb them less; benchmarks
    under test set their own thread counts (``bench.timing.fixed_threads``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    """all-MiniLM-L6-v2's real tokenizer (installed as a package, offline)."""
    return tiny.minilm_tokenizer()
