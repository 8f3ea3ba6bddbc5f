"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's torch work on one thread.

    Decoding is many tiny ops; with two OpenMP threads on a shared two-core machine every op
    waits for a busy core (measured 7x slower decoding), and one thread loses little elsewhere.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
