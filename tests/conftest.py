"""Shared fixtures: one seeded random source for every test."""
import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(12345)
    yield


@pytest.fixture
def one_torch_thread():
    """For tests of the math on tiny tensors: extra threads only add contention on a shared
    machine (threaded kernels are compared with one thread in the kernel tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
