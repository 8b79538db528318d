"""pytest-benchmark suite: whole compiled executables vs torch eager dense, batch 1, 90% sparsity.

Not part of the test run (pyproject's testpaths is tests/). Run it with

    pytest benchmarks/test_bench_executable.py --benchmark-only

The models are issue 5's: a BERT-base encoder layer (sequence 128) and ResNet-18 (224x224), from
bench_executable.py. Each case checks the executable's output against torch before timing and
records threads, build info, CPU and git revision in extra_info. The figures in the README come
from bench_executable.py, which times both candidates round robin in one run.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import sparseprune

sys.path.insert(0, os.path.dirname(__file__))
from bench_executable import bert_layer, resnet  # noqa: E402

SPARSITY = 0.9
MODELS = {
    "bert_layer_seq128": (lambda: bert_layer(SPARSITY, 0), (1, 128, 768)),
    "resnet18_224": (lambda: resnet(SPARSITY, 0), (1, 3, 224, 224)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    build, shape = MODELS[request.param]
    model = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return request.param, model, x


@pytest.mark.parametrize("impl", ["torch_dense", "sparseprune_executable"])
def test_executable_batch1(benchmark, model_case, run_info, threads, impl):
    name, model, x = model_case
    with torch.inference_mode():
        ref = model(x).numpy()
    if impl == "torch_dense":
        def fn():
            with torch.inference_mode():
                return model(x)
    else:
        exe = sparseprune.compile(model, (x,), num_threads=threads)
        xn = x.numpy()
        got = exe.run(xn)
        assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, float(np.abs(ref).max()))

        def fn():
            return exe.run(xn)
    benchmark.group = f"{name} @ {SPARSITY:.0%}, batch 1, {threads} thread(s)"
    benchmark.extra_info.update({"threads": threads, **run_info})
    benchmark.pedantic(fn, warmup_rounds=3, rounds=20, iterations=1)
