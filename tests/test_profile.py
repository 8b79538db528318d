"""Executable.profile and `sparseprune bench EXECUTABLE --profile`: every op timed by the native
plan, shares, kernels and GFLOP/s computed from the stored weights."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import sparseprune as sp


@pytest.fixture(scope="module")
def exe():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                          nn.GELU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight[torch.rand(m.weight.shape, generator=gen) < 0.8] = 0
    return sp.compile(model, (torch.randn(2, 3, 6, 6, generator=gen),), policy="threshold")


def test_every_op_is_timed_with_its_kernel_and_flops(exe):
    x = np.random.default_rng(0).standard_normal((5, 3, 6, 6)).astype(np.float32)
    prof = exe.profile(x, repeats=4, warmup=1, n_threads=1)
    assert prof.batch == 5 and prof.threads == 1 and prof.repeats == 4
    assert [r.index for r in prof.rows] == list(range(exe.n_ops))
    assert [r.op for r in prof.rows] == [op["op"] for op in exe.spec["ops"]]
    assert all(r.median_ms > 0 for r in prof.rows)
    assert sum(r.share for r in prof.rows) == pytest.approx(1.0)
    assert prof.call_median_ms >= 0.5 * sum(r.median_ms for r in prof.rows)
    layers = {row["index"]: row for row in exe.layer_table()}
    for r in prof.rows:
        if r.index not in layers:
            assert r.kernel == "-" and r.useful_gflop is None and r.useful_gflops is None
            continue
        layer, op = layers[r.index], exe.spec["ops"][r.index]
        assert r.kernel == layer["format"]
        if op["op"] == "linear":
            assert r.useful_gflop == pytest.approx(2e-9 * layer["nnz"] * 5)
            assert r.dense_gflop == pytest.approx(2e-9 * op["rows"] * op["cols"] * 5)
        else:  # the 3x3 conv over 6x6 with padding 1: 36 output pixels per image
            assert r.useful_gflop == pytest.approx(2e-9 * layer["nnz"] * 5 * 36)
            assert r.dense_gflop == pytest.approx(2e-9 * 8 * 3 * 9 * 5 * 36)
        assert r.useful_gflop < r.dense_gflop and r.useful_gflops > 0
    text = prof.table()
    assert "GFLOP/s" in text and "linear" in text and "conv2d" in text
    assert json.loads(json.dumps(prof.to_dict()))["ops"][0]["op"] == "conv2d"


def test_profile_checks_its_arguments(exe):
    x = np.zeros((1, 3, 6, 6), np.float32)
    with pytest.raises(ValueError, match="repeats"):
        exe.profile(x, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        exe.profile(x, warmup=-1)
    with pytest.raises(TypeError, match="float32"):
        exe.profile(x.astype(np.float64))
    plan = exe._plan
    for bad in (np.zeros(exe.n_ops, np.float32), np.zeros(exe.n_ops + 1), np.zeros((exe.n_ops, 1))):
        with pytest.raises(ValueError, match="op_seconds"):
            plan.run([x], 1, [], bad)
    seconds = np.zeros(exe.n_ops)
    plan.run([x], 1, [], seconds)
    plan.run([x], 1, [], seconds)  # adds up
    assert (seconds > 0).all()


def test_cli_bench_profile(exe, tmp_path):
    path = tmp_path / "m.safetensors"
    exe.save(path)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "sparseprune.cli", "bench", str(path), "--profile",
                           "--batch-sizes", "1,3", "--threads", "1", "--repeats", "3", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("GFLOP/s") == 2 and "share" in proc.stdout
    result = json.loads(out.read_text())
    assert [p["batch"] for p in result["profiles"]] == [1, 3]
    assert len(result["profiles"][0]["ops"]) == exe.n_ops
    proc = subprocess.run([sys.executable, "-m", "sparseprune.cli", "bench", "--model", "mlp-small", "--profile"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--profile applies to an EXECUTABLE" in proc.stderr
