"""One file, every batch size: a linear / conv2d op stored sparse switches to the dense kernel from
its "dense_from" input rows on (the native plan builds the dense weights at load), compile
measures where the kernels cross, and the spec refuses bad thresholds."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import sparseprune
from sparseprune import formats
from sparseprune._native import _C
from sparseprune.compile import kernel_choice
from sparseprune.compile.kernel_choice import _conv_sparse_arrays, _pick_by_size, _sparse_arrays
from sparseprune.runtime import Executable, SpecError, load, run_reference
from sparseprune.runtime.spec import kernel_at, validate

from spec_helpers import assert_close, make_spec, randn

THRESHOLD = 5


def _sparse(rng, *shape, sparsity=0.8):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


def conv_spec(rng, fmt="sparse", dense_from=THRESHOLD):
    w = _sparse(rng, 8, 4, 3, 3)
    arrays = _conv_sparse_arrays("c", *formats.conv_arrays(w), randn(rng, 8))
    op = {"op": "conv2d", "in": 0, "out": 1, "weight": "c", "in_channels": 4, "out_channels": 8, "kernel": [3, 3],
          "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "activation": "relu"}
    if fmt != "sparse":
        op["format"] = fmt
    if dense_from is not None:
        op["dense_from"] = dense_from
    return make_spec([[4, 6, 6], [8, 6, 6]], [0], [1], [op]), arrays


def linear_spec(rng, fmt="csr", dense_from=THRESHOLD, block=(1, 1)):
    """A linear over 3 rows per sample: its switch counts rows (batch x 3), not samples."""
    w = _sparse(rng, 12, 16)
    packed = formats.csr_arrays(w) if fmt == "csr" else formats.bsr_arrays(w, *block)
    arrays = _sparse_arrays("l", *packed, randn(rng, 12))
    op = {"op": "linear", "in": 0, "out": 1, "weight": "l", "format": fmt, "block": list(block), "rows": 12,
          "cols": 16, "activation": "gelu"}
    if dense_from is not None:
        op["dense_from"] = dense_from
    return make_spec([[3, 16], [3, 12]], [0], [1], [op]), arrays


def _rows(spec, batch):
    """The input rows the op's switch counts at this batch."""
    op = spec["ops"][0]
    return batch * 3 if op["op"] == "linear" else batch


@pytest.mark.parametrize("make, fmt, small, large", [
    (conv_spec, "sparse", "sparse-conv", "dense-conv"),
    (conv_spec, "pattern", "pattern-conv", "dense-conv"),
    (linear_spec, "csr", "csr", "dense"),
])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_switch_runs_the_kernel_of_its_side_and_matches_the_reference(make, fmt, small, large, n_threads):
    rng = np.random.default_rng(0)
    spec, arrays = make(rng, fmt)
    exe = Executable.from_spec(spec, arrays, n_threads=n_threads)
    per_sample = tuple(spec["buffers"][0]["shape"])
    # batch 0, 1, and for the conv threshold - 1 and threshold; for the linear (3 rows per
    # sample) 1 -> 3 rows (sparse), 2 -> 6 rows (dense); then a large batch
    for batch in (0, 1, 2, THRESHOLD - 1, THRESHOLD, 17):
        rows = _rows(spec, batch)
        want = large if rows >= THRESHOLD else small
        kernels = []
        x = randn(rng, batch, *per_sample)
        ref = run_reference(spec, arrays, [x], kernels=kernels)[0]
        assert kernels == [(0, want)]
        assert exe._plan.runs_dense(batch) == [want in ("dense", "dense-conv")]
        assert kernel_at(validate(spec, arrays).spec["ops"][0], rows) == want
        got = exe.run(x)
        assert got.shape == ref.shape
        if batch:
            assert_close(got, ref)


def test_switch_of_a_block_sparse_weight_builds_the_same_dense_weight():
    rng = np.random.default_rng(1)
    spec, arrays = linear_spec(rng, "bsr", dense_from=2, block=(4, 1))
    x = randn(rng, 7, 3, 16)
    assert_close(Executable.from_spec(spec, arrays).run(x), run_reference(spec, arrays, [x])[0])


def test_depthwise_switch():
    rng = np.random.default_rng(2)
    w = _sparse(rng, 6, 1, 3, 3, sparsity=0.4)
    arrays = _conv_sparse_arrays("d", *formats.conv_arrays(w), None)
    op = {"op": "conv2d", "in": 0, "out": 1, "weight": "d", "in_channels": 6, "out_channels": 6, "kernel": [3, 3],
          "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 6, "format": "depthwise",
          "dense_from": 3}
    spec = make_spec([[6, 9, 9], [6, 5, 5]], [0], [1], [op])
    exe = Executable.from_spec(spec, arrays, n_threads=2)
    for batch in (1, 2, 3, 8):
        x = randn(rng, batch, 6, 9, 9)
        assert exe._plan.runs_dense(batch) == [batch >= 3]
        assert_close(exe.run(x), run_reference(spec, arrays, [x])[0])


def test_the_switch_survives_save_and_load_and_the_profile_names_the_kernel(tmp_path):
    rng = np.random.default_rng(3)
    spec, arrays = conv_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    exe.save(tmp_path / "m.spx")
    back = load(tmp_path / "m.spx")
    assert back.spec["ops"][0]["dense_from"] == THRESHOLD
    assert back.layer_table()[0]["dense_from"] == THRESHOLD
    assert back.layer_table()[0]["format"] == "sparse-conv"
    for batch, want in ((THRESHOLD - 1, "sparse-conv"), (THRESHOLD, "dense-conv")):
        prof = back.profile(randn(rng, batch, 4, 6, 6), repeats=2, warmup=0)
        assert prof.rows[0].kernel == want


@pytest.mark.parametrize("bad", [1, 0, -3, 2**31 + 1, 2.5, "8", True, None, [8]])
@pytest.mark.parametrize("make", [conv_spec, linear_spec])
def test_bad_dense_from_is_a_spec_error_naming_the_field(make, bad):
    rng = np.random.default_rng(4)
    spec, arrays = make(rng)
    spec["ops"][0]["dense_from"] = bad
    with pytest.raises(SpecError, match="dense_from"):
        validate(spec, arrays)
    with pytest.raises(_C.SpecError, match="dense_from"):  # the native plan checks it on its own too
        _C.Plan(json.dumps(spec), arrays)


def test_dense_from_needs_a_sparse_format():
    rng = np.random.default_rng(5)
    w = randn(rng, 12, 16)
    arrays = {"l.weight": w}
    op = {"op": "linear", "in": 0, "out": 1, "weight": "l", "format": "dense", "block": [1, 1], "rows": 12,
          "cols": 16, "dense_from": 4}
    spec = make_spec([[16], [12]], [0], [1], [op])
    with pytest.raises(SpecError, match="dense_from needs a sparse format"):
        validate(spec, arrays)
    with pytest.raises(_C.SpecError, match="dense_from needs a sparse format"):
        _C.Plan(json.dumps(spec), arrays)


# --- the choice ------------------------------------------------------------------------------------


def test_pick_by_size_switches_only_when_sparse_wins_small_and_dense_large():
    # sparse: 0.1 ms + 0.05 ms per image; dense: 1 ms + 0.02 ms per image: equal at 30, and
    # sparse within the 1.05x tie up to 32 (1.70 vs 1.64 ms), not at 33 (1.75 vs 1.66)
    times = {"sparse-conv": {1: 0.15, 64: 3.3}, "dense-conv": {1: 1.02, 64: 2.28}}
    kernel, dense_from, why = _pick_by_size(times, "dense-conv", switch=True)
    assert (kernel, dense_from) == ("sparse-conv", 33)
    assert "dense-conv from 33" in why
    assert _pick_by_size(times, "dense-conv", switch=False)[1] is None  # convert: one kernel
    same = {"sparse-conv": {1: 0.1, 64: 1.0}, "dense-conv": {1: 1.0, 64: 3.0}}
    assert _pick_by_size(same, "dense-conv", switch=True)[:2] == ("sparse-conv", None)
    reverse = {"csr": {1: 2.0, 64: 1.0}, "dense": {1: 1.0, 64: 3.0}}  # dense small, sparse large: no switch
    assert _pick_by_size(reverse, "dense", switch=True)[1] is None
    # three sizes, dense from the middle one: the threshold lies between the first two
    three = {"csr": {1: 0.1, 8: 0.8, 64: 6.4}, "dense": {1: 0.5, 8: 0.6, 64: 1.0}}
    kernel, dense_from, _ = _pick_by_size(three, "dense", switch=True)
    assert kernel == "csr" and 2 <= dense_from <= 8


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _fake_times(dense_wins_large):
    """A _time_plans stand-in: sparse kernels 10x faster at the smallest size; at the largest,
    3x slower when `dense_wins_large`, else still faster."""
    def fake(plans, shapes, threads, dense, dense_reference, repeats):
        sizes = sorted(shapes)
        out = {}
        for name in plans:
            is_dense = name == dense
            small = 1.0 if is_dense else 0.1
            large = 10.0 if is_dense else (30.0 if dense_wins_large else 5.0)
            out[name] = {sizes[0]: small, **{s: large for s in sizes[1:]}}
        return out
    return fake


@pytest.mark.parametrize("dense_wins_large", [False, True])
def test_compile_stores_the_switch_only_when_the_measured_winners_differ(monkeypatch, dense_wins_large):
    torch.manual_seed(0)
    model = _ConvNet().eval()
    for layer in (model.conv, model.fc):
        sparseprune.prune.magnitude(layer, 0.9)
    monkeypatch.setattr(kernel_choice, "_time_plans", _fake_times(dense_wins_large))
    exe = sparseprune.compile(model, (torch.randn(1, 4, 6, 6),), batch_sizes=(1, 64))
    weighted = [op for op in exe.spec["ops"] if op["op"] in ("linear", "conv2d")]
    assert len(weighted) == 2
    for op in weighted:
        assert op.get("format", "sparse") in ("sparse", "pattern", "csr", "bsr")  # the file stores sparse arrays
        assert f"{op['weight']}.weight" not in exe._arrays
        if dense_wins_large:
            # lines through (1, 0.1), (64, 30) and (1, 1), (64, 10): sparse is within the 1.05 tie
            # up to 3.9, so dense from 4
            assert op["dense_from"] == 4
        else:
            assert "dense_from" not in op
    assert all(("dense_from" in row) == dense_wins_large for row in exe.metadata["layers"])
    with torch.no_grad():
        for batch in (1, 3, 4, 64):
            x = torch.randn(batch, 4, 6, 6)
            np.testing.assert_allclose(exe.run(x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_compile_with_one_batch_size_never_switches(monkeypatch):
    model = _ConvNet().eval()
    sparseprune.prune.magnitude(model.conv, 0.9)
    monkeypatch.setattr(kernel_choice, "_time_plans", _fake_times(True))
    exe = sparseprune.compile(model, (torch.randn(2, 4, 6, 6),))
    assert not any("dense_from" in op for op in exe.spec["ops"])


def test_switches_whose_dense_weights_outgrow_the_file_are_refused():
    # one nonzero in a 4096 x 4096 weight: the file holds a few bytes, the switch would build 64 MiB
    rng = np.random.default_rng(6)
    w = np.zeros((4096, 4096), np.float32)
    w[3, 5] = 1.0
    arrays = _sparse_arrays("l", *formats.csr_arrays(w), None)
    op = {"op": "linear", "in": 0, "out": 1, "weight": "l", "format": "csr", "block": [1, 1], "rows": 4096,
          "cols": 4096, "dense_from": 2}
    spec = make_spec([[4096], [4096]], [0], [1], [op])
    with pytest.raises(SpecError, match="dense_from switches need"):
        validate(spec, arrays)
    with pytest.raises(_C.SpecError, match="dense_from switches need"):
        _C.Plan(json.dumps(spec), arrays)
    del op["dense_from"]
    Executable.from_spec(spec, arrays).run(randn(rng, 1, 4096))  # without the switch: fine


def test_compile_keeps_one_kernel_where_a_switch_would_outgrow_the_budget(monkeypatch):
    model = nn.Sequential(nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[0].weight.mul_((torch.rand(512, 512) < 0.003).float())  # 99.7% sparse: dense is ~170x the CSR arrays
    monkeypatch.setattr(kernel_choice, "_time_plans", _fake_times(True))
    exe = sparseprune.compile(model, (torch.randn(1, 512),), batch_sizes=(1, 64))
    assert not any("dense_from" in op for op in exe.spec["ops"])
