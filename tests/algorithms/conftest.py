"""Fixtures of the RL algorithm tests (each test module builds its own tiny setup once)."""

from __future__ import annotations

import pytest
import torch

from tiny_rl import TinySetup, tiny_setup  # noqa: E402  (tests/algorithms is on sys.path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine threads thrash (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
