"""Arrays whose address or strides are not multiples of their element size (np.frombuffer at an
odd offset, a view into a byte buffer, torch.frombuffer): every native entry point refuses them
with a ValueError naming the argument, since the kernels' typed loads from them would be
undefined behaviour (the ASan+UBSan job of .ci/run aborts on those), and the Python API passes
aligned copies, so its results do not depend on where the caller's bytes start."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sparseprune import formats
from sparseprune._native import _C, aligned
from sparseprune.nn.sparse_conv import SparseConv2d
from sparseprune.nn.sparse_linear import SparseLinear
from sparseprune.runtime import Executable


def misaligned(a) -> np.ndarray:
    """A writable copy of `a` that starts one byte past an aligned address (a view into a uint8
    buffer, as np.frombuffer(buf, dtype, offset=1) gives)."""
    a = np.ascontiguousarray(a)
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
    view = buf[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned and np.array_equal(view, a)
    return view


def sparse_weight(rng, rows, cols, density=0.4):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w * (rng.random((rows, cols)) < density)


def test_aligned_copies_only_misaligned_arrays(rng):
    a = rng.standard_normal(9).astype(np.float32)
    assert aligned(a) is a
    m = misaligned(a)
    c = aligned(m)
    assert c.flags.aligned and np.array_equal(c, a) and not np.shares_memory(c, m)


# --- PackedLinear -------------------------------------------------------------------------------

@pytest.fixture
def linear_args(rng):
    w = sparse_weight(rng, 6, 11)
    indptr, indices, values = formats.csr_arrays(w)
    return w, {"indptr": indptr, "indices": indices.astype(np.int32), "values": values,
               "bias": rng.standard_normal(6).astype(np.float32)}


def make_linear(args):
    return _C.PackedLinear("csr", 1, 1, 6, 11, args["indptr"], args["indices"], args["values"], args["bias"])


@pytest.mark.parametrize("name", ["indptr", "indices", "values", "bias"])
def test_packed_linear_refuses_misaligned_arrays(linear_args, name):
    _, args = linear_args
    make_linear(args)  # aligned: accepted
    args[name] = misaligned(args[name])
    with pytest.raises(ValueError, match=rf"^{name} is not aligned: .* multiples of \d bytes"):
        make_linear(args)


def test_packed_linear_forward_refuses_misaligned_x_and_out(rng, linear_args):
    w, args = linear_args
    p = make_linear(args)
    x = rng.standard_normal((5, 11)).astype(np.float32)
    want = p.forward(x)
    np.testing.assert_allclose(want, x @ w.T + args["bias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^x is not aligned"):
        p.forward(misaligned(x))
    with pytest.raises(ValueError, match=r"^out is not aligned"):
        p.forward(x, out=misaligned(np.zeros((5, 6), np.float32)))
    np.testing.assert_array_equal(p.forward(aligned(misaligned(x))), want)


def test_pack_copies_a_misaligned_bias(rng, linear_args):
    w, args = linear_args
    p = formats.pack(w, misaligned(args["bias"]))
    np.testing.assert_array_equal(p.bias, args["bias"])


def test_sparse_linear_copies_misaligned_input(rng):
    lin = nn.Linear(11, 6)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(6, 11) < 0.4)
    sparse = SparseLinear.from_dense(lin)
    x = rng.standard_normal((3, 11)).astype(np.float32)
    with torch.no_grad():
        want = sparse(torch.from_numpy(x))
        t = torch.from_numpy(misaligned(x))  # torch keeps the odd address
        assert t.data_ptr() % 4 != 0
        torch.testing.assert_close(sparse(t), want, rtol=0, atol=0)
        torch.testing.assert_close(want, lin(torch.from_numpy(x)), rtol=1e-5, atol=1e-5)


# --- PackedConv ---------------------------------------------------------------------------------

@pytest.fixture
def conv_args(rng):
    w = (rng.standard_normal((4, 3, 3, 3)) * (rng.random((4, 3, 3, 3)) < 0.5)).astype(np.float32)
    row_ptr, taps, values = formats.conv_arrays(w)
    return w, {"row_ptr": row_ptr, "taps": taps, "values": values,
               "bias": rng.standard_normal(4).astype(np.float32)}


def make_conv(args):
    return _C.PackedConv(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, args["row_ptr"], args["taps"], args["values"],
                         args["bias"])


@pytest.mark.parametrize("name", ["row_ptr", "taps", "values", "bias"])
def test_packed_conv_refuses_misaligned_arrays(conv_args, name):
    _, args = conv_args
    make_conv(args)
    args[name] = misaligned(args[name])
    with pytest.raises(ValueError, match=rf"^{name} is not aligned"):
        make_conv(args)


def test_packed_conv_forward_refuses_misaligned_x(rng, conv_args):
    _, args = conv_args
    p = make_conv(args)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    p.forward(x)
    with pytest.raises(ValueError, match=r"^x is not aligned"):
        p.forward(misaligned(x))


def test_sparse_conv_copies_misaligned_input(rng):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.5)
    sparse = SparseConv2d.from_dense(conv)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    with torch.no_grad():
        want = sparse(torch.from_numpy(x))
        t = torch.from_numpy(misaligned(x))
        assert t.data_ptr() % 4 != 0
        torch.testing.assert_close(sparse(t), want, rtol=0, atol=0)
        torch.testing.assert_close(want, conv(torch.from_numpy(x)), rtol=1e-5, atol=1e-5)


# --- Plan and Executable ------------------------------------------------------------------------

def plan_case(rng):
    """A spec with a sparse and a dense linear, a sparse and a dense conv and a layernorm (every
    kind of array the plan reads: int and float vectors, matrices, 4-D weights), its arrays, and
    one input."""
    fc = sparse_weight(rng, 6, 8)
    indptr, indices, values = formats.csr_arrays(fc)
    cw = sparse_weight(rng, 4, 27).reshape(4, 3, 3, 3)
    row_ptr, taps, cvalues = formats.conv_arrays(cw)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    arrays = {"fc.indptr": indptr, "fc.indices": indices.astype(np.int32), "fc.values": values, "fc.bias": f32(6),
              "dn.weight": f32(8, 6), "dn.bias": f32(8),
              "c.row_ptr": row_ptr, "c.taps": taps, "c.values": cvalues, "c.bias": f32(4),
              "dc.weight": f32(2, 4, 1, 1), "dc.bias": f32(2),
              "ln.gamma": f32(8), "ln.beta": f32(8)}
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    spec = {"format": "sparseprune.executable", "version": 1,
            "buffers": [{"shape": [3, 2, 2]}, {"shape": [4, 2, 2]}, {"shape": [2, 2, 2]},
                        {"shape": [8], "alias_of": 2}, {"shape": [6]}, {"shape": [8]}, {"shape": [8]}],
            "inputs": [0], "outputs": [6],
            "ops": [
                {"op": "conv2d", "in": 0, "out": 1, "weight": "c", "in_channels": 3, "out_channels": 4,
                 "kernel": [3, 3], **conv, "activation": "relu"},
                {"op": "conv2d", "in": 1, "out": 2, "weight": "dc", "format": "dense", "in_channels": 4,
                 "out_channels": 2, "kernel": [1, 1], **conv, "padding": [0, 0]},
                {"op": "linear", "in": 3, "out": 4, "weight": "fc", "format": "csr", "block": [1, 1], "rows": 6,
                 "cols": 8, "activation": "gelu"},
                {"op": "linear", "in": 4, "out": 5, "weight": "dn", "format": "dense", "block": [1, 1], "rows": 8,
                 "cols": 6},
                {"op": "layernorm", "in": 5, "out": 6, "weight": "ln", "eps": 1e-5},
            ]}
    return spec, arrays, f32(3, 3, 2, 2)


@pytest.mark.parametrize("name", ["fc.indptr", "fc.indices", "fc.values", "fc.bias", "dn.weight", "dn.bias",
                                  "c.row_ptr", "c.taps", "c.values", "c.bias", "dc.weight", "dc.bias",
                                  "ln.gamma", "ln.beta"])
def test_plan_refuses_misaligned_arrays_and_executable_copies_them(rng, name):
    spec, arrays, x = plan_case(rng)
    want = _C.Plan(json.dumps(spec), arrays).run([x])[0]
    arrays[name] = misaligned(arrays[name])
    with pytest.raises(ValueError, match=rf"^array '{name}' is not aligned"):
        _C.Plan(json.dumps(spec), arrays)
    np.testing.assert_array_equal(Executable.from_spec(spec, arrays).run(x), want)


def test_plan_run_refuses_misaligned_input_and_executable_copies_it(rng):
    spec, arrays, x = plan_case(rng)
    plan = _C.Plan(json.dumps(spec), arrays)
    want = plan.run([x])[0]
    with pytest.raises(ValueError, match=r"^input 0 is not aligned"):
        plan.run([misaligned(x)])
    seconds = misaligned(np.zeros(plan.n_ops))
    with pytest.raises(ValueError, match=r"^op_seconds is not aligned"):
        plan.run([x], 1, [], seconds)
    exe = Executable.from_spec(spec, arrays)
    np.testing.assert_array_equal(exe.run(misaligned(x)), want)
    np.testing.assert_array_equal(exe.run(np.frombuffer(b"\0" + x.tobytes(), np.float32, offset=1).reshape(x.shape)),
                                  want)
