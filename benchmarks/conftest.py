"""Fixtures shared by the pytest-benchmark suites (test_bench_linear.py, test_bench_conv.py)."""
from __future__ import annotations

import pytest
import torch

from sparseprune.bench import run_metadata


@pytest.fixture(scope="session")
def run_info():
    """Build info, CPU, git revision and torch version, for each benchmark's extra_info."""
    meta = run_metadata()
    return {key: meta[key] for key in ("build_info", "cpu", "git_revision", "torch_version")}


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    """Runs the test at 1 and at 2 torch/OpenMP threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
