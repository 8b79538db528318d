"""pytest-benchmark suite: a few representative linear cases, dense vs sparseprune CSR.

Not part of the test run (pyproject's testpaths is tests/). Run it with

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-autosave   # keep a record in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare    # against the last saved one

Every case checks the sparse output against dense before it is timed, and stores the thread
count, build info, CPU model and git revision in the benchmark's extra_info (the
`threads` and `run_info` fixtures are in conftest.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseprune.bench import prune_linear_layers
from sparseprune.nn import SparseLinear

OUT_FEATURES, IN_FEATURES = 3072, 768  # BERT-base FFN up-projection
SPARSITY = 0.9


@pytest.fixture(scope="module")
def layer():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    prune_linear_layers(linear, SPARSITY)
    return linear.eval(), SparseLinear.from_dense(linear, "csr")


@pytest.mark.parametrize("batch", [1, 64], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("impl", ["torch_dense", "sparseprune_csr"])
def test_linear_3072x768_90(benchmark, layer, run_info, threads, batch, impl):
    linear, sparse = layer
    w, b = linear.weight.detach(), linear.bias.detach()
    x = torch.randn(batch, IN_FEATURES, generator=torch.Generator().manual_seed(batch))
    fn = (lambda: F.linear(x, w, b)) if impl == "torch_dense" else (lambda: sparse(x))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
        benchmark.group = f"3072x768 @ {SPARSITY:.0%}, batch {batch}, {threads} thread(s)"
        benchmark.extra_info.update(
            {
                "threads": threads,
                "batch": batch,
                "sparsity": SPARSITY,
                "shape": [OUT_FEATURES, IN_FEATURES],
                **run_info,
            }
        )
        benchmark(fn)
