"""Test-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread per test: the tests check values on tiny models, which gain nothing from threads,
    and on a 2-core machine idle threads spinning against another process slow tiny ops down by orders
    of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
