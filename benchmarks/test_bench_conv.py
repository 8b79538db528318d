"""pytest-benchmark suite: representative convolutions at 90% sparsity, torch dense vs SparseConv2d.

Not part of the test run (pyproject's testpaths is tests/). Run it with

    pytest benchmarks/test_bench_conv.py --benchmark-only
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

from sparseprune import prune
from sparseprune.nn import SparseConv2d

SPARSITY = 0.9
# (id, in, out, kernel, H = W, groups): ResNet-18 layer2 3x3, ResNet-50 layer1 1x1, MobileNetV2 depthwise
LAYERS = [
    ("3x3_128-128_28", 128, 128, 3, 28, 1),
    ("1x1_256-64_56", 256, 64, 1, 56, 1),
    ("dw3x3_96_56", 96, 96, 3, 56, 96),
]


@pytest.fixture(scope="module", params=LAYERS, ids=lambda spec: spec[0])
def layer(request):
    name, cin, cout, k, hw, groups = request.param
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=True)
    prune.magnitude(conv, SPARSITY)
    prune.remove(conv)
    x = torch.randn(1, cin, hw, hw, generator=torch.Generator().manual_seed(1))
    return name, conv.eval(), SparseConv2d.from_dense(conv), x


@pytest.mark.parametrize("impl", ["torch_dense", "sparseprune_conv"])
def test_conv_90_batch1(benchmark, layer, run_info, threads, impl):
    name, conv, sparse, x = layer
    w, b = conv.weight.detach(), conv.bias.detach()

    def dense():
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    fn = dense if impl == "torch_dense" else (lambda: sparse(x))
    with torch.inference_mode():
        ref = dense()
        scale = float(ref.abs().max())
        torch.testing.assert_close(sparse(x), ref, rtol=0, atol=1e-4 * scale)
        benchmark.group = f"conv {name} @ {SPARSITY:.0%}, batch 1, {threads} thread(s)"
        benchmark.extra_info.update(
            {
                "threads": threads,
                "batch": 1,
                "sparsity": SPARSITY,
                "layer": name,
                "nnz": sparse.nnz,
                **run_info,
            }
        )
        benchmark(fn)
