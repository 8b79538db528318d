"""SparseLinear (the nn.Module) against the dense nn.Linear it replaces, and the weight formats
(formats.pack / unpack / csr_arrays / bsr_arrays / block_fill) against slow references."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from sparseprune import formats
from sparseprune.nn.sparse_linear import SparseLinear

FORMATS = [("csr", (1, 1))] + [("bsr", shape) for shape in formats.BLOCK_SHAPES]
FORMAT_IDS = ["csr"] + [f"bsr{r}x{c}" for r, c in formats.BLOCK_SHAPES]
KERNEL_NAMES = ["csr"] + [f"bsr{r}x{c}" for r, c in formats.BLOCK_SHAPES]
EPS32 = 2.0**-24


def fp32_error_bound(abs_sum, n_terms):
    """Rigorous bound on fp32 rounding error for any summation order: 2 * gamma_n * sum|terms|
    (see tests/test_kernels.py::fp32_error_bound for the derivation)."""
    n = n_terms + 2
    return 2.0 * n * EPS32 / (1.0 - n * EPS32) * abs_sum


# --------------------------------------------------------------------------- helpers


def sparse_weight(rng, n_rows, n_cols, sparsity):
    """A float32 matrix with exactly round(sparsity * size) zeros at random places."""
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w[w == 0] = 1.0
    n_zero = int(round(sparsity * w.size))
    w.reshape(-1)[rng.choice(w.size, n_zero, replace=False)] = 0.0
    return w


def make_linear(rng, in_features, out_features, bias=True, sparsity=0.6):
    with warnings.catch_warnings():  # torch warns when initialising zero-size weights
        warnings.simplefilter("ignore", UserWarning)
        lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(sparse_weight(rng, out_features, in_features, sparsity)))
        if bias:
            lin.bias.copy_(torch.from_numpy(rng.standard_normal(out_features).astype(np.float32)))
    return lin


def dense_reference(lin, x, relu=False):
    """The nn.Linear in float64 (x is float32)."""
    w = lin.weight.detach().double()
    b = None if lin.bias is None else lin.bias.detach().double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products; torch's thread pool only adds waiting on a busy machine
    try:
        y = torch.nn.functional.linear(x.double(), w, b)
    finally:
        torch.set_num_threads(threads)
    return torch.relu(y) if relu else y


def assert_within(y, ref, bound):
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), (
        f"{int(np.sum(err > bound))} outputs beyond the fp32 bound; worst error "
        f"{float(np.max(err - bound, initial=0.0)):.3g} over it"
    )


def assert_close_to_dense(y, lin, x, relu=False):
    ref = dense_reference(lin, x, relu)
    abs_sum = x.double().abs() @ lin.weight.detach().double().abs().T
    if lin.bias is not None:
        abs_sum = abs_sum + lin.bias.detach().double().abs()
    assert y.dtype == torch.float32
    assert y.shape == ref.shape
    assert_within(y.numpy(), ref.numpy(), fp32_error_bound(abs_sum.numpy(), lin.in_features))


# --------------------------------------------------------------------------- SparseLinear


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_from_dense_matches_linear(rng, fmt, block, bias, relu):
    lin = make_linear(rng, 37, 29, bias=bias)
    s = SparseLinear.from_dense(lin, fmt=fmt, block=block, relu=relu)
    assert (s.in_features, s.out_features) == (37, 29)
    for batch in (1, 2, 9, 65):
        x = torch.from_numpy(rng.standard_normal((batch, 37)).astype(np.float32))
        y = s(x)
        assert_close_to_dense(y, lin, x, relu)
        assert y.is_contiguous()
        assert not y.requires_grad


@pytest.mark.parametrize("lead", [(), (5,), (2, 3, 4), (0,), (2, 0, 3), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_leading_batch_shapes(rng, fmt, block, lead):
    lin = make_linear(rng, 13, 7)
    s = SparseLinear.from_dense(lin, fmt=fmt, block=block)
    x = torch.from_numpy(rng.standard_normal((*lead, 13)).astype(np.float32))
    y = s(x)
    assert y.shape == (*lead, 7)
    assert_close_to_dense(y, lin, x)


def torch_views(x):
    """Non-contiguous tensors holding the values of `x` (batch, in)."""
    batch, n = x.shape
    views = {"transposed": x.t().contiguous().t()}
    wide = torch.randn(batch, 2 * n)
    wide[:, ::2] = x
    views["col_sliced"] = wide[:, ::2]
    tall = torch.randn(3 * batch, n)
    tall[::3] = x
    views["row_sliced"] = tall[::3]
    big = torch.randn(batch + 3, n + 5)
    big[1 : 1 + batch, 2 : 2 + n] = x
    views["offset_block"] = big[1 : 1 + batch, 2 : 2 + n]
    views["permuted_3d"] = x.reshape(batch, 1, n).permute(1, 0, 2).contiguous().permute(1, 0, 2)
    for name, v in views.items():
        assert torch.equal(v.reshape(batch, n), x), name
    return views


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_non_contiguous_input_same_as_contiguous(rng, fmt, block):
    lin = make_linear(rng, 37, 29)
    s = SparseLinear.from_dense(lin, fmt=fmt, block=block, num_threads=1)
    for batch in (1, 9, 65):
        x = torch.from_numpy(rng.standard_normal((batch, 37)).astype(np.float32))
        expected = s(x)
        assert_close_to_dense(expected, lin, x)
        for name, view in torch_views(x).items():
            y = s(view)
            assert y.shape == view.shape[:-1] + (29,)
            assert torch.equal(y.reshape(batch, 29), expected), f"{name} batch={batch}"


def test_expanded_input(rng):
    """A stride-0 (expand) input reaches the kernel as is and still gives every batch row."""
    lin = make_linear(rng, 13, 7)
    s = SparseLinear.from_dense(lin)
    row = torch.from_numpy(rng.standard_normal((1, 13)).astype(np.float32))
    y = s(row.expand(6, 13))
    assert torch.equal(y, s(row.expand(6, 13).contiguous()))
    assert torch.equal(y[1:], y[0].expand(5, 7))
    assert_close_to_dense(y, lin, row.expand(6, 13).contiguous())


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool]
)
def test_input_wrong_dtype(rng, dtype):
    s = SparseLinear.from_dense(make_linear(rng, 8, 3))
    with pytest.raises(TypeError, match=r"\binput\b.*float32"):
        s(torch.zeros(4, 8).to(dtype))


def test_input_not_a_tensor(rng):
    s = SparseLinear.from_dense(make_linear(rng, 8, 3))
    with pytest.raises(TypeError, match=r"\binput\b"):
        s(np.zeros((4, 8), np.float32))


@pytest.mark.parametrize("shape", [(4, 7), (4, 9), (8, 4), (4, 8, 1), (0,), ()], ids=str)
def test_input_wrong_last_dim(rng, shape):
    s = SparseLinear.from_dense(make_linear(rng, 8, 3))
    with pytest.raises(ValueError, match=r"\binput\b.*\(\.\.\., 8\)"):
        s(torch.zeros(shape))


def test_input_requiring_grad_is_refused_with_grad_enabled(rng):
    lin = make_linear(rng, 8, 3)
    s = SparseLinear.from_dense(lin)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference"):
        s(x)
    with torch.no_grad():
        y = s(x)
    assert not y.requires_grad
    assert_close_to_dense(y, lin, x.detach())
    with torch.inference_mode():
        x_inf = torch.randn(4, 8)
        y_inf = s(x_inf)
        assert not y_inf.requires_grad
        assert_close_to_dense(y_inf, lin, x_inf)
    # grad enabled, but the input needs no grad: fine
    assert_close_to_dense(s(x.detach()), lin, x.detach())


def test_output_is_fresh_memory(rng):
    """Each call returns new memory: an earlier result is not overwritten by a later call."""
    s = SparseLinear.from_dense(make_linear(rng, 13, 7))
    x1, x2 = torch.randn(9, 13), torch.randn(9, 13)
    y1 = s(x1)
    y1_copy = y1.clone()
    y2 = s(x2)
    assert torch.equal(y1, y1_copy)
    assert y1.data_ptr() != y2.data_ptr()
    assert not np.shares_memory(y1.numpy(), x1.numpy())


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_to_dense_round_trip(rng, fmt, block):
    for bias in (True, False):
        lin = make_linear(rng, 37, 29, bias=bias, sparsity=0.8)
        s = SparseLinear.from_dense(lin, fmt=fmt, block=block)
        back = s.to_dense()
        assert isinstance(back, nn.Linear)
        assert torch.equal(back.weight, lin.weight)  # exactly the masked weight
        if bias:
            assert torch.equal(back.bias, lin.bias)
        else:
            assert back.bias is None
        x = torch.randn(5, 37)
        assert_close_to_dense(s(x), back, x)


@pytest.mark.parametrize("remove", [False, True], ids=["masked", "removed"])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_module_pruned_with_torch_prune(rng, fmt, block, remove):
    lin = make_linear(rng, 64, 48, sparsity=0.0)
    prune.l1_unstructured(lin, "weight", amount=0.75)
    if remove:
        prune.remove(lin, "weight")
        assert not hasattr(lin, "weight_mask")
    else:
        assert hasattr(lin, "weight_mask")
    n_zero = int(round(0.75 * 64 * 48))
    assert int((lin.weight == 0).sum()) == n_zero
    s = SparseLinear.from_dense(lin, fmt=fmt, block=block)
    assert s.nnz == 64 * 48 - n_zero
    assert s.sparsity == pytest.approx(0.75, abs=1e-12)
    with torch.no_grad():
        for batch in (1, 9):
            x = torch.randn(batch, 64)
            assert_close_to_dense(s(x), lin, x)  # lin.weight is orig * mask here
    assert torch.equal(s.to_dense().weight, lin.weight.detach())


@pytest.mark.parametrize("fmt,block,kernel", [f + (k,) for f, k in zip(FORMATS, KERNEL_NAMES)], ids=FORMAT_IDS)
def test_properties_and_repr(rng, fmt, block, kernel):
    w = sparse_weight(rng, 29, 37, 0.0)
    w[:, :30] = 0.0  # 7 of 37 columns kept
    lin = make_linear(rng, 37, 29)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    s = SparseLinear.from_dense(lin, fmt=fmt, block=block, relu=True)
    assert s.kernel == kernel
    assert s.nnz == 29 * 7  # true nonzeros, not the zeros a block stores
    assert s.sparsity == pytest.approx(30 / 37, abs=1e-12)
    text = repr(s)
    assert f"kernel={kernel}" in text
    assert "in_features=37" in text and "out_features=29" in text
    assert "sparsity=0.811" in text and "relu=True" in text


def test_all_zero_weight_properties(rng):
    lin = make_linear(rng, 8, 3, sparsity=1.0)
    s = SparseLinear.from_dense(lin)
    assert s.nnz == 0
    assert s.sparsity == 1.0
    x = torch.randn(4, 8)
    assert torch.equal(s(x), lin.bias.detach().expand(4, 3))


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_thread_counts_identical(rng, fmt, block):
    lin = make_linear(rng, 512, 256, sparsity=0.5)
    x = torch.randn(33, 512)
    ys = [SparseLinear.from_dense(lin, fmt=fmt, block=block, num_threads=n)(x) for n in (1, 2, None)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    assert_close_to_dense(ys[0], lin, x)


@pytest.mark.parametrize("num_threads", [0, -1, 1.5, True])
def test_bad_num_threads(rng, num_threads):
    # Checked once, when the module is built (not on every call).
    with pytest.raises(ValueError, match="num_threads"):
        SparseLinear.from_dense(make_linear(rng, 8, 3), num_threads=num_threads)


def test_from_dense_refuses_other_modules():
    with pytest.raises(TypeError, match="linear"):
        SparseLinear.from_dense(nn.Conv1d(3, 3, 1))


def test_from_dense_of_float64_linear(rng):
    lin = make_linear(rng, 13, 7).double()
    s = SparseLinear.from_dense(lin)
    x = torch.randn(5, 13)
    assert_close_to_dense(s(x), lin, x)


def test_zero_out_features(rng):
    s = SparseLinear.from_dense(make_linear(rng, 4, 0))
    assert s(torch.randn(5, 4)).shape == (5, 0)
    assert s(torch.randn(2, 0, 4)).shape == (2, 0, 0)


def test_zero_in_features(rng):
    lin = make_linear(rng, 0, 3)
    s = SparseLinear.from_dense(lin)
    x = torch.zeros(5, 0)
    with torch.no_grad():
        assert torch.equal(s(x), lin(x))


# --------------------------------------------------------------------------- formats

FORMAT_SHAPES = [(1, 1), (3, 5), (13, 7), (9, 9), (37, 129), (8, 4), (0, 5), (5, 0), (0, 0)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", FORMAT_SHAPES, ids=[f"{r}x{c}" for r, c in FORMAT_SHAPES])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_unpack_pack_round_trip(rng, fmt, block, shape, sparsity):
    w = sparse_weight(rng, *shape, sparsity)
    p = formats.pack(w, None, fmt, block)
    back = formats.unpack(p)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, w)
    assert p.format == fmt and p.block_shape == block and p.shape == shape


def test_unpack_pack_special_values(rng):
    """-0.0 counts as zero and is dropped; NaN and inf weights are stored like any other."""
    w = sparse_weight(rng, 9, 11, 0.5)
    w[0, 0], w[1, 1], w[2, 2], w[3, 3] = -0.0, np.nan, np.inf, -np.inf
    for fmt, block in FORMATS:
        p = formats.pack(w, None, fmt, block)
        back = formats.unpack(p)
        np.testing.assert_array_equal(back, w)  # (NaNs compare equal position by position)
        if fmt == "csr":
            assert p.n_stored == np.count_nonzero(w) == np.count_nonzero(np.isnan(w) | (w != 0))


def test_pack_non_contiguous_weight(rng):
    base = sparse_weight(rng, 20, 30, 0.6)
    for w in (base.T, base[:, ::3], base[::2, 1:]):
        assert not w.flags.c_contiguous
        for fmt, block in FORMATS:
            np.testing.assert_array_equal(formats.unpack(formats.pack(w, None, fmt, block)), w)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (13, 7), (37, 129), (0, 4), (4, 0)], ids=str)
def test_csr_arrays_match_scipy(rng, shape, sparsity):
    w = sparse_weight(rng, *shape, sparsity)
    a = formats.csr_arrays(w)
    ref = scipy.sparse.csr_matrix(w)
    ref.sort_indices()
    assert a.indptr.dtype == np.int64 and a.indices.dtype == np.int64 and a.values.dtype == np.float32
    np.testing.assert_array_equal(a.indptr, ref.indptr)
    np.testing.assert_array_equal(a.indices, ref.indices)
    np.testing.assert_array_equal(a.values, ref.data)


def bsr_reference(w, r, c):
    """Block rows in order, block columns ascending, each kept block stored column-major with
    zero padding past the matrix edge: the layout csrc/kernels/linear_args.h documents."""
    n_rows, n_cols = w.shape
    indptr, indices, values = [0], [], []
    for i in range(-(-n_rows // r)):
        for j in range(-(-n_cols // c)):
            blk = np.zeros((r, c), np.float32)
            part = w[i * r : (i + 1) * r, j * c : (j + 1) * c]
            blk[: part.shape[0], : part.shape[1]] = part
            if np.any(blk != 0):
                indices.append(j)
                values.extend(blk[rr, cc] for cc in range(c) for rr in range(r))
        indptr.append(len(indices))
    return np.array(indptr), np.array(indices, dtype=np.int64), np.array(values, dtype=np.float32)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (13, 7), (9, 17), (0, 3), (3, 0)], ids=str)
@pytest.mark.parametrize("block", formats.BLOCK_SHAPES, ids=[f"{r}x{c}" for r, c in formats.BLOCK_SHAPES])
def test_bsr_arrays_match_slow_reference(rng, block, shape, sparsity):
    w = sparse_weight(rng, *shape, sparsity)
    a = formats.bsr_arrays(w, *block)
    indptr, indices, values = bsr_reference(w, *block)
    assert a.indptr.dtype == np.int64 and a.indices.dtype == np.int64 and a.values.dtype == np.float32
    np.testing.assert_array_equal(a.indptr, indptr)
    np.testing.assert_array_equal(a.indices, indices)
    np.testing.assert_array_equal(a.values, values)
    p = formats.pack(w, None, "bsr", block)
    assert p.n_stored == len(values)


def whole_block_weight(rng, n_rows, n_cols, block, density=0.4):
    r, c = block
    keep = rng.random((-(-n_rows // r), -(-n_cols // c))) < density
    keep[0, 0] = True
    mask = np.kron(keep, np.ones((r, c), bool))
    w = np.where(mask, rng.standard_normal(mask.shape) + 5.0, 0.0).astype(np.float32)  # no zeros
    return w[:n_rows, :n_cols], int(keep.sum())


@pytest.mark.parametrize("block", formats.BLOCK_SHAPES, ids=[f"{r}x{c}" for r, c in formats.BLOCK_SHAPES])
def test_block_fill(rng, block):
    r, c = block
    w, n_blocks = whole_block_weight(rng, 32, 64, block)
    assert formats.block_fill(w, r, c) == 1.0
    p = formats.pack(w, None, "bsr", block)
    assert p.n_stored == np.count_nonzero(w) == n_blocks * r * c
    # one value removed from a full block: that block now stores one zero
    w2 = w.copy()
    w2[0, 0] = 0.0
    assert formats.block_fill(w2, r, c) == pytest.approx((n_blocks * r * c - 1) / (n_blocks * r * c))


def test_block_fill_values():
    four_by_one, _ = whole_block_weight(np.random.default_rng(1), 16, 12, (4, 1))
    assert formats.block_fill(four_by_one, 4, 1) == 1.0
    # 8x1 blocks over 4x1 ones: each 8-row block holds at least one whole 4x1 block
    fill8 = formats.block_fill(four_by_one, 8, 1)
    assert 0.5 <= fill8 <= 1.0
    assert fill8 == np.count_nonzero(four_by_one) / formats.pack(four_by_one, None, "bsr", (8, 1)).n_stored
    dense = np.ones((6, 5), np.float32)  # edge blocks count their padding
    assert formats.block_fill(dense, 4, 1) == pytest.approx(30 / 40)
    assert formats.block_fill(dense, 1, 4) == pytest.approx(30 / 48)
    assert formats.block_fill(np.zeros((6, 5), np.float32), 4, 1) == 1.0
    diagonal = np.eye(8, dtype=np.float32)
    assert formats.block_fill(diagonal, 8, 1) == pytest.approx(1 / 8)
    assert formats.block_fill(diagonal, 1, 4) == pytest.approx(1 / 4)


BAD_WEIGHTS = [
    ("float64", np.zeros((3, 4)), TypeError),
    ("float16", np.zeros((3, 4), np.float16), TypeError),
    ("int32", np.zeros((3, 4), np.int32), TypeError),
    ("tensor", torch.zeros(3, 4), TypeError),
    ("list", [[0.0] * 4] * 3, TypeError),
    ("1d", np.zeros(4, np.float32), ValueError),
    ("3d", np.zeros((2, 3, 4), np.float32), ValueError),
    ("0d", np.zeros((), np.float32), ValueError),
]
FUNCTIONS = {
    "csr_arrays": lambda w: formats.csr_arrays(w),
    "bsr_arrays": lambda w: formats.bsr_arrays(w, 4, 1),
    "block_fill": lambda w: formats.block_fill(w, 4, 1),
    "pack_csr": lambda w: formats.pack(w, None),
    "pack_bsr": lambda w: formats.pack(w, None, "bsr", (1, 4)),
}


@pytest.mark.parametrize("func", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize("weight,exc", [b[1:] for b in BAD_WEIGHTS], ids=[b[0] for b in BAD_WEIGHTS])
def test_formats_reject_bad_weights(func, weight, exc):
    with pytest.raises(exc, match="weight"):
        FUNCTIONS[func](weight)


def test_pack_argument_errors(rng):
    w = sparse_weight(rng, 5, 8, 0.5)
    with pytest.raises(ValueError, match="fmt"):
        formats.pack(w, None, "coo")
    with pytest.raises(ValueError, match="block"):
        formats.pack(w, None, "bsr", (2, 2))
    with pytest.raises(ValueError, match="block"):
        formats.bsr_arrays(w, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        formats.pack(w, np.zeros(4, np.float32))
    # a float64 bias is converted (pack normalises arguments; only the native layer is strict)
    p = formats.pack(w, np.arange(5, dtype=np.float64))
    assert p.bias.dtype == np.float32
    np.testing.assert_array_equal(p.bias, np.arange(5))


@settings(max_examples=60, deadline=None, database=None)
@given(
    n_rows=st.integers(0, 20),
    n_cols=st.integers(0, 20),
    density=st.floats(0.0, 1.0),
    fmt_index=st.integers(0, len(FORMATS) - 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(n_rows, n_cols, density, fmt_index, seed):
    """unpack(pack(W)) == W, the stored layout matches the slow reference, and forward matches
    dense math, for any shape and density."""
    local = np.random.default_rng(seed)
    w = np.where(local.random((n_rows, n_cols)) < density,
                 local.standard_normal((n_rows, n_cols)), 0.0).astype(np.float32)
    fmt, block = FORMATS[fmt_index]
    p = formats.pack(w, None, fmt, block)
    np.testing.assert_array_equal(formats.unpack(p), w)
    if fmt == "bsr":
        indptr, indices, values = bsr_reference(w, *block)
        np.testing.assert_array_equal(p.indices, indices)
        np.testing.assert_array_equal(p.values, values)
    x = local.standard_normal((3, n_cols)).astype(np.float32)
    y = p.forward(x, n_threads=1)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    abs_sum = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    assert y.shape == (3, n_rows) and y.dtype == np.float32
    assert_within(y, ref, fp32_error_bound(abs_sum, n_cols))
