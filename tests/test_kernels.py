"""The native PackedLinear (CSR and block-sparse kernels) against a slow, obviously correct
reference: dense float64 numpy, y = relu?(x @ W.T + b), on a grid of edge cases.

Every numerical test runs once per SIMD path (baseline and AVX2/FMA). Speed is never asserted.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from concurrency import run_in_threads  # tests/concurrency.py

from sparseprune import _native, formats
from sparseprune._native import _C, PackedLinear

# ("csr", (1, 1)) and ("bsr", shape) for every compiled block shape.
FORMATS = [("csr", (1, 1))] + [("bsr", shape) for shape in formats.BLOCK_SHAPES]
FORMAT_IDS = ["csr"] + [f"bsr{r}x{c}" for r, c in formats.BLOCK_SHAPES]

# Odd sizes, sizes not divisible by any block shape, and sizes at a tile.
SHAPES = [(1, 1), (3, 5), (13, 7), (37, 129), (64, 64), (100, 300)]
# Batch tiles are 8 / 16 / 32 / 64 columns wide: below, at and above each edge, and 0 (empty).
BATCHES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]

# Unit roundoff of float32. Results are compared with a rigorous per-output bound on rounding
# error rather than a blanket rtol: see fp32_error_bound.
EPS32 = 2.0**-24


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """The float64 references are small matmuls: one BLAS thread is faster for them, and the
    machine's cores are shared with kernel timings. (The kernels' own threads are not limited.)"""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture
def isa(simd_path):
    """Forces each SIMD path in turn (tests/conftest.py), skipping those this CPU cannot run."""
    assert _native.active_isa() == {"avx2": "avx2+fma"}.get(simd_path, simd_path)
    return simd_path


# --------------------------------------------------------------------------- helpers


def sparse_weight(rng, n_rows, n_cols, sparsity):
    """A float32 matrix with exactly round(sparsity * size) zeros at random places."""
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w[w == 0] = 1.0  # (never happens in practice; keeps the zero count exact)
    n_zero = int(round(sparsity * w.size))
    w.reshape(-1)[rng.choice(w.size, n_zero, replace=False)] = 0.0
    return w


def random_x(rng, batch, n_cols):
    return rng.standard_normal((batch, n_cols)).astype(np.float32)


def random_bias(rng, n_rows, with_bias):
    return rng.standard_normal(n_rows).astype(np.float32) if with_bias else None


def reference(x, w, b, relu):
    """Dense float64 math: relu?(x @ W.T + b). np.maximum keeps NaN, as torch.relu does."""
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y = y + b.astype(np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    return y


def fp32_error_bound(x, w, b):
    """Per output, a bound on |fp32 result - exact result| valid for any summation order (serial,
    SIMD lanes, pairwise, with or without FMA): gamma_n * sum_k |x_k w_k| (+ |b|), where n counts
    the products plus the bias and gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1). x and W are exact float32 values, and relu is 1-Lipschitz, so it
    holds after relu too. The factor 2 is a safety margin. Observed errors are ~100x smaller; the
    bound is tight enough that dropping or doubling one typical weight fails the comparison."""
    s = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        s = s + np.abs(b.astype(np.float64))
    n = w.shape[1] + 2
    gamma = n * EPS32 / (1.0 - n * EPS32)
    return 2.0 * gamma * s


def assert_within(y, ref, bound, msg=""):
    """NaN where ref is NaN, the same infinities, and |y - ref| <= bound everywhere else."""
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=f"NaN mask differs {msg}")
    inf = np.isinf(ref)
    np.testing.assert_array_equal(y[inf], ref[inf], err_msg=f"infinities differ {msg}")
    finite = ~(np.isnan(ref) | inf)
    err = np.abs(y[finite].astype(np.float64) - ref[finite])
    limit = bound[finite]
    if not np.all(err <= limit):
        k = int(np.argmax(err - limit))
        raise AssertionError(
            f"{msg}: {int(np.sum(err > limit))} of {err.size} outputs off by more than the fp32 "
            f"bound; worst: got {y[finite][k]!r}, expected {ref[finite][k]!r}, "
            f"error {err[k]:.3g} > bound {limit[k]:.3g}"
        )


def linear_parts(x, w, b):
    """(x @ W.T + b in float64, its fp32 error bound): the costly part of a check, shared by
    the relu=False / relu=True checks of one input."""
    return reference(x, w, b, relu=False), fp32_error_bound(x, w, b)


def assert_linear(y, x, w, b, relu, msg="", parts=None):
    n_rows = w.shape[0]
    assert isinstance(y, np.ndarray), msg
    assert y.dtype == np.float32, msg
    assert y.shape == (x.shape[0], n_rows), msg
    assert y.flags.c_contiguous, msg
    ref, bound = parts if parts is not None else linear_parts(x, w, b)
    assert_within(y, np.maximum(ref, 0.0) if relu else ref, bound, msg)


def run(p, x, relu=False, n_threads=1, **kw):
    """One thread unless a test is about threads: the machine is shared, and a small call
    would use one thread anyway."""
    return p.forward(x, relu=relu, n_threads=n_threads, **kw)


# --------------------------------------------------------------------------- the main grid


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_matches_dense_reference(isa, rng, fmt, block, shape, sparsity, with_bias):
    n_rows, n_cols = shape
    w = sparse_weight(rng, n_rows, n_cols, sparsity)
    b = random_bias(rng, n_rows, with_bias)
    p = formats.pack(w, b, fmt, block)
    assert p.shape == shape
    assert p.index_bits == 16
    if sparsity == 0.0:
        assert np.count_nonzero(w) == w.size  # a fully dense matrix, stored sparse
    for batch in BATCHES:
        x = random_x(rng, batch, n_cols)
        parts = linear_parts(x, w, b)
        for relu in (False, True):
            y = run(p, x, relu=relu)
            assert_linear(y, x, w, b, relu, f"{fmt}{block} {shape} batch={batch} relu={relu}", parts)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_all_zero_weight_gives_bias_or_zeros(isa, rng, fmt, block):
    """Sparsity 1.0: no stored values at all; the output is exactly the bias (relu'd), or 0."""
    w = np.zeros((37, 129), dtype=np.float32)
    b = random_bias(rng, 37, True)
    for bias in (None, b):
        p = formats.pack(w, bias, fmt, block)
        assert p.n_stored == 0
        for batch in (1, 9, 65):
            x = random_x(rng, batch, 129)
            expected = np.zeros((batch, 37), np.float32) if bias is None else np.tile(bias, (batch, 1))
            np.testing.assert_array_equal(run(p, x), expected)
            np.testing.assert_array_equal(run(p, x, relu=True), np.maximum(expected, 0))


def weight_with_pattern(rng, pattern, block):
    """Weights whose structure stresses the kernels' row and column bookkeeping."""
    n_rows, n_cols = 37, 129
    if pattern == "empty_rows_and_cols":
        w = sparse_weight(rng, n_rows, n_cols, 0.5)
        w[[0, 1, 17, 35, 36], :] = 0.0  # empty first, last and inner rows
        w[:, [0, 5, 64, 127, 128]] = 0.0  # empty first, last and inner columns
    elif pattern == "every_other_row_empty":
        w = sparse_weight(rng, n_rows, n_cols, 0.3)
        w[::2] = 0.0
    elif pattern == "one_nonzero_per_row":
        w = np.zeros((n_rows, n_cols), np.float32)
        w[np.arange(n_rows), rng.integers(0, n_cols, n_rows)] = rng.standard_normal(n_rows) + 3.0
    elif pattern == "single_dense_row":
        w = np.zeros((n_rows, n_cols), np.float32)
        w[20] = rng.standard_normal(n_cols)
    elif pattern == "single_dense_column":
        w = np.zeros((n_rows, n_cols), np.float32)
        w[:, 128] = rng.standard_normal(n_rows)  # the last column: in an edge block for 1x4
    elif pattern == "whole_blocks":
        r, c = block
        keep = rng.random((-(-n_rows // r), -(-n_cols // c))) < 0.3
        mask = np.kron(keep, np.ones((r, c), bool))[:n_rows, :n_cols]
        w = np.where(mask, rng.standard_normal((n_rows, n_cols)), 0.0).astype(np.float32)
    elif pattern == "long_and_short_rows":  # very uneven work per row (thread partition)
        w = np.zeros((n_rows, n_cols), np.float32)
        for r in range(n_rows):
            length = n_cols if r % 7 == 0 else r % 3
            w[r, rng.choice(n_cols, length, replace=False)] = rng.standard_normal(length)
    else:  # pragma: no cover
        raise AssertionError(pattern)
    return w


PATTERNS = [
    "empty_rows_and_cols",
    "every_other_row_empty",
    "one_nonzero_per_row",
    "single_dense_row",
    "single_dense_column",
    "whole_blocks",
    "long_and_short_rows",
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_structured_patterns(isa, rng, fmt, block, pattern):
    w = weight_with_pattern(rng, pattern, block)
    b = random_bias(rng, w.shape[0], True)
    for bias in (None, b):
        p = formats.pack(w, bias, fmt, block)
        for batch in (1, 2, 7, 8, 9, 17, 64, 65):
            x = random_x(rng, batch, w.shape[1])
            parts = linear_parts(x, w, bias)
            for relu in (False, True):
                assert_linear(run(p, x, relu=relu), x, w, bias, relu, f"batch={batch} relu={relu}", parts)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 129), (9, 0)])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_zero_rows_or_zero_columns(isa, rng, fmt, block, shape):
    """n_rows = 0 gives a (batch, 0) result; n_cols = 0 gives the bias (nothing to sum)."""
    n_rows, n_cols = shape
    w = np.zeros(shape, np.float32)
    for bias in (None, rng.standard_normal(n_rows).astype(np.float32)):
        p = formats.pack(w, bias, fmt, block)
        assert p.shape == shape
        for batch in (0, 1, 9, 65):
            x = random_x(rng, batch, n_cols)
            for relu in (False, True):
                y = run(p, x, relu=relu)
                assert y.shape == (batch, n_rows) and y.dtype == np.float32
                expected = np.zeros((batch, n_rows), np.float32)
                if bias is not None:
                    expected += bias
                if relu:
                    expected = np.maximum(expected, 0)
                np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_empty_batch(isa, rng, fmt, block):
    w = sparse_weight(rng, 13, 7, 0.5)
    p = formats.pack(w, random_bias(rng, 13, True), fmt, block)
    for x in (np.zeros((0, 7), np.float32), np.zeros((7, 0), np.float32).T):
        y = run(p, x)
        assert y.shape == (0, 13) and y.dtype == np.float32
        out = np.empty((0, 13), np.float32)
        assert run(p, x, out=out).shape == (0, 13)


# --------------------------------------------------------------------------- 16 / 32-bit indices


def wide_case(fmt, block, n_cols, rng):
    """A very sparse 9-row matrix whose nonzeros sit at the 16-bit boundary and the far end."""
    r, c = block
    n_rows = 9  # two block rows for 8x1, an edge block row for 4x1
    w = np.zeros((n_rows, n_cols), np.float32)
    # block columns around 2**16 and the last one; c * block column = first column of that block
    block_cols = [0, 1, 65534, 65535, 65536, 65537, -(-n_cols // c) - 1]
    cols = sorted({bc * c + off for bc in block_cols for off in range(c) if bc * c + off < n_cols})
    for row in range(n_rows):
        pick = rng.choice(len(cols), size=min(len(cols), 4), replace=False)
        w[row, np.asarray(cols)[pick]] = rng.standard_normal(len(pick))
    w[:, rng.integers(0, n_cols, 40)] += rng.standard_normal((n_rows, 40)).astype(np.float32)
    w[:, cols[-1]] = 2.0  # the very last column is stored by every row
    w[3] = 0.0  # an empty row
    return w


WIDE_CASES = [
    ("csr", (1, 1), 65536, 16),
    ("csr", (1, 1), 65537, 32),
    ("csr", (1, 1), 70000, 32),
    ("bsr", (1, 4), 4 * 65536, 16),  # 65536 block columns: still 16-bit
    ("bsr", (1, 4), 4 * 65536 + 1, 32),  # one more (edge) block column
    ("bsr", (4, 1), 65536, 16),
    ("bsr", (4, 1), 70000, 32),
    ("bsr", (8, 1), 65537, 32),
]


@pytest.mark.parametrize(
    "fmt,block,n_cols,bits", WIDE_CASES, ids=[f"{f}{b[0]}x{b[1]}-{n}" for f, b, n, _ in WIDE_CASES]
)
def test_index_width(isa, rng, fmt, block, n_cols, bits):
    w = wide_case(fmt, block, n_cols, rng)
    b = random_bias(rng, w.shape[0], True)
    p = formats.pack(w, b, fmt, block)
    assert p.index_bits == bits
    # the stored indices really use the high range
    n_block_cols = -(-n_cols // block[1])
    assert p.indices.max() == n_block_cols - 1
    assert p.indices.max() >= 65535
    np.testing.assert_array_equal(formats.unpack(p), w)
    for batch in (1, 2, 9):
        x = random_x(rng, batch, n_cols)
        parts = linear_parts(x, w, b)
        for relu in (False, True):
            assert_linear(run(p, x, relu=relu), x, w, b, relu, f"batch={batch} relu={relu}", parts)
    # a non-finite input in a high column: the "as dense" fix-up reads the wide indices too
    x = random_x(rng, 2, n_cols)
    x[0, n_cols - 1] = np.inf  # stored by every row except the empty row 3
    x[1, n_cols - 2] = np.inf  # stored by fewer rows
    assert_nonfinite_as_dense(run(p, x), x, w, b, relu=False)


# --------------------------------------------------------------------------- NaN and infinity


def dense_nonfinite_reference(x, w, b, relu):
    """torch's dense linear on the weight with its zeros present (0 * inf = NaN), in float64."""
    xt = torch.from_numpy(x.astype(np.float64))
    wt = torch.from_numpy(w.astype(np.float64))
    bt = None if b is None else torch.from_numpy(b.astype(np.float64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products; torch's thread pool only adds waiting on a busy machine
    try:
        y = torch.nn.functional.linear(xt, wt, bt)
    finally:
        torch.set_num_threads(threads)
    if relu:
        y = torch.relu(y)
    return y.numpy()


def assert_nonfinite_as_dense(y, x, w, b, relu, msg=""):
    ref = dense_nonfinite_reference(x, w, b, relu)
    assert y.shape == ref.shape, msg
    finite_x = np.where(np.isfinite(x), x, 0).astype(np.float32)
    assert_within(y, ref, fp32_error_bound(finite_x, w, b), msg)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_nonfinite_inputs_as_dense(isa, rng, fmt, block, sparsity, layout):
    """A NaN or infinity in x acts as in dense math: every output whose row does not store that
    column becomes NaN (0 * inf), rows storing it get +-inf or NaN by the usual rules."""
    n_rows, n_cols = 37, 29
    w = sparse_weight(rng, n_rows, n_cols, sparsity)
    w[5] = 0.0  # an empty row
    w[:, 3] = 0.0  # an empty column
    b = random_bias(rng, n_rows, True)
    for batch in (1, 2, 9, 65):
        x = random_x(rng, batch, n_cols)
        x[0, 11] = np.inf
        if batch > 1:
            x[1, 11] = np.nan
            x[batch - 1, 3] = -np.inf  # in the empty column: every output NaN
        if batch > 2:
            x[2, 11] = np.inf  # two infinities in one row: NaN unless both stored, same sign
            x[2, 20] = -np.inf
        if layout == "transposed":
            x = np.ascontiguousarray(x.T).T
        for bias in (None, b):
            p = formats.pack(w, bias, fmt, block)
            for relu in (False, True):
                y = run(p, x, relu=relu)
                assert_nonfinite_as_dense(y, x, w, bias, relu, msg=f"batch={batch} relu={relu}")
                # rows without a non-finite value are untouched by it
                clean = np.isfinite(x).all(axis=1)
                assert_linear(np.ascontiguousarray(y[clean]), x[clean], w, bias, relu)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_nonfinite_covers_only_inputs_that_matter(isa, rng, fmt, block):
    """With a fully stored weight (no zeros to multiply), an infinity gives +-inf, not NaN."""
    w = np.abs(sparse_weight(rng, 16, 8, 0.0)) + 0.5  # all positive, dense
    p = formats.pack(w, None, fmt, block)
    for batch in (1, 9):
        x = random_x(rng, batch, 8)
        x[0, 2] = np.inf
        y = run(p, x)
        assert np.all(y[0] == np.inf)
        assert np.all(np.isfinite(y[1:]))
        x[0, 2] = -np.inf
        y = run(p, x, relu=True)
        np.testing.assert_array_equal(y[0], np.zeros(16, np.float32))  # relu(-inf) = 0


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_infinity_in_first_column_with_uneven_rows(isa, rng, fmt, block):
    """Every row stores column 0 (positive) and rows have very different lengths: an infinity in
    column 0 gives +inf everywhere. A kernel that pads short rows with (index 0, value 0)
    entries must not turn them into 0 * inf = NaN."""
    n_rows, n_cols = 40, 64
    w = np.zeros((n_rows, n_cols), np.float32)
    for r in range(n_rows):
        length = 1 + (r * 7) % n_cols
        w[r, rng.choice(np.arange(1, n_cols), length - 1, replace=False)] = rng.standard_normal(length - 1)
    w[:, 0] = np.abs(rng.standard_normal(n_rows)).astype(np.float32) + 0.5
    p = formats.pack(w, random_bias(rng, n_rows, True), fmt, block)
    for batch in (1, 2, 9):
        x = random_x(rng, batch, n_cols)
        x[0, 0] = np.inf
        for relu in (False, True):
            y = run(p, x, relu=relu)
            np.testing.assert_array_equal(y[0], np.full(n_rows, np.inf, np.float32))
            assert np.isfinite(y[1:]).all()


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_many_rows_of_uneven_length(isa, rng, fmt, block):
    """More rows than any row-grouping window (e.g. 256), lengths from 0 to all columns."""
    n_rows, n_cols = 601, 50
    w = np.zeros((n_rows, n_cols), np.float32)
    for r in range(n_rows):
        length = (r * 13) % (n_cols + 1)
        w[r, rng.choice(n_cols, length, replace=False)] = rng.standard_normal(length)
    b = random_bias(rng, n_rows, True)
    p = formats.pack(w, b, fmt, block)
    for batch in (1, 2, 9, 65):
        x = random_x(rng, batch, n_cols)
        parts = linear_parts(x, w, b)
        for relu in (False, True):
            assert_linear(run(p, x, relu=relu), x, w, b, relu, f"batch={batch} relu={relu}", parts)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_relu_keeps_nan(isa, rng, fmt, block):
    """relu(NaN) stays NaN, as torch.relu: through the kernels themselves (dense weight, so every
    row stores the NaN column) and through a NaN bias."""
    n_rows, n_cols = 13, 7
    w = sparse_weight(rng, n_rows, n_cols, 0.0)
    b = random_bias(rng, n_rows, True)
    b[4] = np.nan
    p = formats.pack(w, b, fmt, block)
    for batch in (1, 2, 9, 17, 65):
        x = random_x(rng, batch, n_cols)
        x[batch // 2, 6] = np.nan
        for relu in (False, True):
            y = run(p, x, relu=relu)
            expected = dense_nonfinite_reference(x, w, b, relu)
            np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
            assert np.isnan(y[:, 4]).all()
            assert np.isnan(y[batch // 2]).all()
            assert np.count_nonzero(np.isnan(y)) == batch + n_rows - 1


# --------------------------------------------------------------------------- strides and threads


def strided_views(x, rng):
    """Views of the same values as `x` with other strides (and the contiguous copy is `x`)."""
    batch, n_cols = x.shape
    views = {}
    views["transposed"] = np.ascontiguousarray(x.T).T
    wide = rng.standard_normal((batch, 2 * n_cols)).astype(np.float32)
    wide[:, ::2] = x
    views["col_sliced"] = wide[:, ::2]
    tall = rng.standard_normal((3 * batch, n_cols)).astype(np.float32)
    tall[::3] = x
    views["row_sliced"] = tall[::3]
    views["reversed"] = np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1]
    big = rng.standard_normal((batch + 4, n_cols + 6)).astype(np.float32)
    big[2 : 2 + batch, 3 : 3 + n_cols] = x
    views["offset_block"] = big[2 : 2 + batch, 3 : 3 + n_cols]
    # (a view that is not 4-byte aligned is refused: tests/test_alignment.py)
    for name, v in views.items():
        np.testing.assert_array_equal(v, x, err_msg=name)
    return views


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_strided_inputs_match_contiguous_copy(isa, rng, fmt, block):
    n_rows, n_cols = 37, 129
    w = sparse_weight(rng, n_rows, n_cols, 0.7)
    b = random_bias(rng, n_rows, True)
    p = formats.pack(w, b, fmt, block)
    for batch in (1, 2, 7, 9, 64, 65):
        x = random_x(rng, batch, n_cols)
        expected = run(p, x)
        assert_linear(expected, x, w, b, False)
        for name, view in strided_views(x, rng).items():
            if batch > 1:
                assert not view.flags.c_contiguous, name
            # the same values reach the same kernel: the result is bitwise the same
            np.testing.assert_array_equal(run(p, view), expected, err_msg=f"{name} batch={batch}")


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_broadcast_inputs(isa, rng, fmt, block):
    """Stride-0 views (np.broadcast_to) along the batch or the feature axis."""
    n_rows, n_cols = 13, 7
    w = sparse_weight(rng, n_rows, n_cols, 0.5)
    p = formats.pack(w, None, fmt, block)
    row = random_x(rng, 1, n_cols)
    col = random_x(rng, 9, 1)
    for x in (np.broadcast_to(row, (9, n_cols)), np.broadcast_to(col, (9, n_cols)),
              np.broadcast_to(row, (1, n_cols)), np.broadcast_to(col[:1], (1, n_cols))):
        assert 0 in x.strides or x.shape[0] == 1
        y = run(p, x)
        np.testing.assert_array_equal(y, run(p, np.ascontiguousarray(x)))
        assert_linear(y, np.ascontiguousarray(x), w, None, False)


def test_byte_strides_that_are_not_whole_floats_are_refused(rng):
    w = sparse_weight(rng, 3, 4, 0.5)
    p = formats.pack(w, None)
    buf = np.zeros(64, np.uint8)
    x = np.lib.stride_tricks.as_strided(buf[:48].view(np.float32), shape=(2, 4), strides=(18, 4))
    with pytest.raises(ValueError, match=r"\bx\b.*stride"):
        p.forward(x)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_thread_counts_give_identical_results(isa, rng, fmt, block):
    """Each output row is summed by one thread in a fixed order, so any thread count gives the
    bitwise same answer on one SIMD path. The matrix is big enough that 2+ threads really run
    (the kernels use one thread below ~20k multiply-adds)."""
    n_rows, n_cols = 300, 512
    w = sparse_weight(rng, n_rows, n_cols, 0.5)
    w[::5] = 0.0
    w[1, :] = rng.standard_normal(n_cols)  # one long row: uneven work per row
    b = random_bias(rng, n_rows, True)
    p = formats.pack(w, b, fmt, block)
    for batch in (1, 9, 65):
        x = random_x(rng, batch, n_cols)
        parts = linear_parts(x, w, b)
        for relu in (False, True):
            single = run(p, x, relu=relu, n_threads=1)
            assert_linear(single, x, w, b, relu, parts=parts)
            for n_threads in (2, 3, 8, 0):
                np.testing.assert_allclose(
                    run(p, x, relu=relu, n_threads=n_threads), single, rtol=0, atol=0,
                    err_msg=f"n_threads={n_threads} batch={batch} relu={relu}",
                )


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_few_rows_many_threads(isa, rng, fmt, block):
    """More threads than rows (or block rows), with enough work that they are started."""
    w = sparse_weight(rng, 3, 20000, 0.2)
    b = random_bias(rng, 3, True)
    p = formats.pack(w, b, fmt, block)
    for batch in (1, 2, 9):
        x = random_x(rng, batch, 20000)
        single = run(p, x, n_threads=1)
        assert_linear(single, x, w, b, False)
        for n_threads in (2, 8):
            np.testing.assert_array_equal(run(p, x, n_threads=n_threads), single)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_concurrent_calls_from_python_threads(rng, fmt, block):
    """The GIL is released around the kernel and scratch memory is per calling thread: calls
    running at the same time from several Python threads do not disturb each other."""
    n_rows, n_cols = 64, 200
    w = sparse_weight(rng, n_rows, n_cols, 0.6)
    b = random_bias(rng, n_rows, True)
    p = formats.pack(w, b, fmt, block)
    inputs = [random_x(rng, batch, n_cols) for batch in (1, 3, 9, 17, 40, 65, 2, 33)]
    expected = [run(p, x, n_threads=1) for x in inputs]

    def worker(k):
        for rep in range(15):
            i = (k + rep) % len(inputs)
            np.testing.assert_array_equal(run(p, inputs[i], n_threads=1), expected[i])

    run_in_threads(worker, 4)


@pytest.mark.parametrize("path", ["avx2", "avx2_w16", "avx512"])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_simd_paths_agree(rng, fmt, block, path):
    reason = _native.simd_paths()[path]
    if reason is not None:
        pytest.skip(reason)
    w = sparse_weight(rng, 37, 129, 0.5)
    b = random_bias(rng, 37, True)
    p = formats.pack(w, b, fmt, block)
    try:
        for batch in (1, 9, 17, 65):
            x = random_x(rng, batch, 129)
            _native.set_isa("baseline")
            y_base = run(p, x)
            _native.set_isa(path)
            y_path = run(p, x)
            # both within the bound of the exact result, so within twice of each other
            np.testing.assert_array_less(np.abs(y_path - y_base), 2 * fp32_error_bound(x, w, b) + 1e-30)
            assert_linear(y_path, x, w, b, False)
            assert_linear(y_base, x, w, b, False)
    finally:
        _native.set_isa("auto")


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa"):
        _native.set_isa("avx512-turbo")
    _native.set_isa("auto")
    assert _native.active_isa() in ("baseline", "avx2+fma", "avx512")


# --------------------------------------------------------------------------- out=


@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_out_is_written_in_place(isa, rng, fmt, block):
    n_rows, n_cols = 37, 129
    w = sparse_weight(rng, n_rows, n_cols, 0.9)
    w[[0, 7, 36]] = 0.0  # empty rows must be written too
    for bias in (None, random_bias(rng, n_rows, True)):
        p = formats.pack(w, bias, fmt, block)
        for batch in (1, 9, 65):
            x = random_x(rng, batch, n_cols)
            for relu in (False, True):
                out = np.full((batch, n_rows), np.nan, np.float32)  # garbage to overwrite
                y = run(p, x, relu=relu, out=out)
                assert np.shares_memory(y, out)
                np.testing.assert_array_equal(out, run(p, x, relu=relu))
                assert_linear(out, x, w, bias, relu)


@pytest.fixture
def small_packed(rng):
    w = sparse_weight(rng, 5, 7, 0.5)
    return formats.pack(w, random_bias(rng, 5, True)), random_x(rng, 4, 7)


@pytest.mark.parametrize(
    "out",
    [
        pytest.param(lambda: np.zeros((4, 6), np.float32), id="wrong_cols"),
        pytest.param(lambda: np.zeros((3, 5), np.float32), id="wrong_batch"),
        pytest.param(lambda: np.zeros((5, 4), np.float32), id="swapped"),
        pytest.param(lambda: np.zeros(20, np.float32), id="1d"),
        pytest.param(lambda: np.zeros((4, 5, 1), np.float32), id="3d"),
        pytest.param(lambda: np.zeros((5, 4), np.float32).T, id="transposed"),
        pytest.param(lambda: np.zeros((4, 10), np.float32)[:, ::2], id="col_sliced"),
        pytest.param(lambda: np.zeros((8, 5), np.float32)[::2], id="row_sliced"),
    ],
)
def test_out_rejects_wrong_shape_or_layout(small_packed, out):
    p, x = small_packed
    with pytest.raises(ValueError, match="out"):
        p.forward(x, out=out())


def test_out_rejects_read_only(small_packed):
    p, x = small_packed
    out = np.zeros((4, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        p.forward(x, out=out)
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, ">f4"])
def test_out_rejects_wrong_dtype(small_packed, dtype):
    p, x = small_packed
    out = np.zeros((4, 5), dtype)
    with pytest.raises(TypeError, match="out"):
        p.forward(x, out=out)


# --------------------------------------------------------------------------- bad forward input


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, ">f4", np.bool_])
def test_x_wrong_dtype(small_packed, dtype):
    p, x = small_packed
    with pytest.raises(TypeError, match=r"\bx\b.*float32"):
        p.forward(x.astype(dtype))


@pytest.mark.parametrize("shape", [(7,), (1, 4, 7), (), (2, 2, 2, 7)], ids=["1d", "3d", "0d", "4d"])
def test_x_wrong_ndim(small_packed, shape):
    p, _ = small_packed
    with pytest.raises(ValueError, match=r"\bx\b.*2-D"):
        p.forward(np.zeros(shape, np.float32))


@pytest.mark.parametrize("n_features", [0, 6, 8, 14])
def test_x_wrong_feature_count(small_packed, n_features):
    p, _ = small_packed
    with pytest.raises(ValueError, match=r"\bx\b.*7 features"):
        p.forward(np.zeros((4, n_features), np.float32))


def test_negative_threads(small_packed):
    p, x = small_packed
    with pytest.raises(ValueError, match="n_threads"):
        p.forward(x, n_threads=-1)
    assert run(p, x, n_threads=1).shape == (4, 5)  # still usable


# --------------------------------------------------------------------------- hostile packed data


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


# A valid 2 x 3 CSR matrix [[1, 0, 0], [0, 0, 2]], then one thing broken at a time.
GOOD = dict(format="csr", block_rows=1, block_cols=1, n_rows=2, n_cols=3,
            indptr=i64(0, 1, 2), indices=i64(0, 2), values=f32(1, 2), bias=None)

HOSTILE = [
    ("indptr_too_short", dict(indptr=i64(0, 2)), ValueError, "indptr"),
    ("indptr_too_long", dict(indptr=i64(0, 1, 2, 2)), ValueError, "indptr"),
    ("indptr_empty", dict(indptr=i64()), ValueError, "indptr"),
    ("indptr_first_not_zero", dict(indptr=i64(1, 1, 2)), ValueError, r"indptr\[0\]"),
    ("indptr_decreasing", dict(indptr=i64(0, 2, 1)), ValueError, "indptr.*non-decreasing"),
    ("indptr_huge_jump", dict(indptr=i64(0, 2**62, 2)), ValueError, "indptr"),
    ("indptr_last_too_big", dict(indptr=i64(0, 1, 3)), ValueError, r"indptr\[-1\]"),
    ("indptr_last_too_small", dict(indptr=i64(0, 1, 1)), ValueError, r"indptr\[-1\]"),
    ("indptr_2d", dict(indptr=np.array([[0, 1, 2]], np.int64)), ValueError, "indptr"),
    ("index_equals_n_cols", dict(indices=i64(0, 3)), ValueError, "indices"),
    ("index_far_out", dict(indices=i64(0, 2**33)), ValueError, "indices"),
    ("index_negative", dict(indices=i64(-1, 2)), ValueError, "indices"),
    ("index_negative_int32", dict(indices=np.array([0, -5], np.int32)), ValueError, "indices"),
    ("indices_2d", dict(indices=np.array([[0, 2]], np.int64)), ValueError, "indices"),
    ("indices_float", dict(indices=np.array([0.0, 2.0])), TypeError, "indices"),
    ("indices_float32", dict(indices=np.array([0.0, 2.0], np.float32)), TypeError, "indices"),
    ("indices_bool", dict(indices=np.array([0, 1], bool)), TypeError, "indices"),
    ("indices_uint64", dict(indices=np.array([0, 2], np.uint64)), TypeError, "indices"),
    ("indptr_float", dict(indptr=np.array([0.0, 1.0, 2.0])), TypeError, "indptr"),
    ("values_too_long", dict(values=f32(1, 2, 3)), ValueError, "values"),
    ("values_too_short", dict(values=f32(1)), ValueError, "values"),
    ("values_float64", dict(values=np.array([1.0, 2.0])), TypeError, "values"),
    ("values_2d", dict(values=np.array([[1, 2]], np.float32)), ValueError, "values"),
    ("values_strided", dict(values=f32(1, 0, 2)[::2]), ValueError, "values"),
    ("bias_too_short", dict(bias=f32(1)), ValueError, "bias"),
    ("bias_too_long", dict(bias=f32(1, 2, 3)), ValueError, "bias"),
    ("bias_float64", dict(bias=np.array([1.0, 2.0])), TypeError, "bias"),
    ("bias_2d", dict(bias=np.ones((2, 1), np.float32)), ValueError, "bias"),
    ("negative_rows", dict(n_rows=-1, indptr=i64(0), indices=i64(), values=f32()), ValueError, "n_rows"),
    ("negative_cols", dict(n_cols=-3), ValueError, "n_cols"),
    ("huge_cols", dict(n_cols=2**40), ValueError, "n_cols"),
    ("csr_with_block", dict(block_rows=4), ValueError, "block shape"),
    ("format_coo", dict(format="coo"), ValueError, "format"),
    ("format_upper", dict(format="CSR"), ValueError, "format"),
    ("bsr_2x2", dict(format="bsr", block_rows=2, block_cols=2), ValueError, "block shape"),
    ("bsr_0x0", dict(format="bsr", block_rows=0, block_cols=0), ValueError, "block shape"),
    ("bsr_negative_block", dict(format="bsr", block_rows=-1, block_cols=4), ValueError, "block shape"),
    ("bsr_1x1", dict(format="bsr"), ValueError, "block shape"),
    # BSR 4x1 of a 5 x 3 matrix: 2 block rows, so indptr needs 3 entries and values 4 per block
    ("bsr_indptr_length", dict(format="bsr", block_rows=4, n_rows=5, indptr=i64(0, 1),
                               indices=i64(0), values=f32(1, 2, 3, 4), bias=None), ValueError, "indptr"),
    ("bsr_values_not_whole_blocks", dict(format="bsr", block_rows=4, n_rows=4, indptr=i64(0, 1),
                                         indices=i64(0), values=f32(1, 2, 3)), ValueError, "values"),
    # BSR 1x4 of 1 x 8: block columns are 0 and 1, so 2 is out of range even though 2 < n_cols
    ("bsr_block_index_out_of_range", dict(format="bsr", block_cols=4, n_rows=1, n_cols=8,
                                          indptr=i64(0, 1), indices=i64(2), values=f32(1, 2, 3, 4)),
     ValueError, "indices"),
]


@pytest.mark.parametrize("changes,exc,match", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_packed_data_is_refused(changes, exc, match):
    args = {**GOOD, **changes}
    with pytest.raises(exc, match=match):
        PackedLinear(**args)
    # the interpreter and the extension are still fine
    p = PackedLinear(**GOOD)
    np.testing.assert_array_equal(p.forward(f32(1, 5, 7)[None]), [[1.0, 14.0]])


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32, np.uint16])
def test_direct_construction_and_properties(index_dtype):
    """Integer index arrays of any accepted width (and strides) are widened exactly."""
    indices = np.array([0, 9, 2, 9], dtype=index_dtype)[::2]  # strided: [0, 2]
    p = PackedLinear("csr", 1, 1, 2, 3, np.array([0, 1, 2], index_dtype), indices, f32(1, 2), f32(10, 20))
    assert p.format == "csr"
    assert p.block_shape == (1, 1)
    assert p.shape == (2, 3)
    assert p.n_stored == 2
    assert p.index_bits == 16
    assert p.nbytes > 0
    np.testing.assert_array_equal(p.indptr, [0, 1, 2])
    np.testing.assert_array_equal(p.indices, [0, 2])
    np.testing.assert_array_equal(p.values, [1, 2])
    np.testing.assert_array_equal(p.bias, [10, 20])
    np.testing.assert_array_equal(p.forward(f32(1, 5, 7)[None]), [[11.0, 34.0]])
    assert PackedLinear("csr", 1, 1, 2, 3, i64(0, 1, 2), i64(0, 2), f32(1, 2)).bias is None


def test_explicit_zeros_given_directly_are_kept(isa):
    """A stored zero is part of the weight: it contributes nothing to finite results, and the
    kernel's 0 * inf = NaN matches dense math."""
    p = PackedLinear("csr", 1, 1, 2, 3, i64(0, 2, 2), i64(0, 1), f32(0, 2))
    assert p.n_stored == 2
    np.testing.assert_array_equal(p.forward(f32(3, 5, 7)[None]), [[10.0, 0.0]])
    y = p.forward(f32(np.inf, 1, 1)[None])
    assert np.isnan(y).all()  # 0 * inf in row 0; row 1 does not store column 0 at all


# --------------------------------------------------------------------------- non-canonical input


def scipy_dense(fmt, block, shape, indptr, indices, values):
    """The dense matrix scipy makes of the same arrays (duplicate entries are summed)."""
    if fmt == "csr":
        return scipy.sparse.csr_matrix((values, indices, indptr), shape=shape).toarray()
    r, c = block
    n_rows, n_cols = shape
    padded = (-(-n_rows // r) * r, -(-n_cols // c) * c)
    data = values.reshape(-1, c, r).transpose(0, 2, 1)  # our blocks are column-major inside
    full = scipy.sparse.bsr_matrix((data, indices, indptr), shape=padded).toarray()
    return full[:n_rows, :n_cols].astype(np.float32)


# Rows with unsorted column indices, and (separately) rows storing one column twice.
UNSORTED = {
    "csr": ((1, 1), (3, 4), i64(0, 3, 5, 6), i64(3, 0, 2, 1, 0, 2), f32(1, 2, 3, 4, 5, 6)),
    "bsr4x1": ((4, 1), (6, 3), i64(0, 2, 3), i64(2, 0, 1), np.arange(1, 13, dtype=np.float32)),
}
DUPLICATES = {
    "csr": ((1, 1), (3, 4), i64(0, 3, 5, 6), i64(0, 0, 2, 1, 1, 2), f32(1, 2, 3, 4, -4, 6)),
    "bsr4x1": ((4, 1), (6, 3), i64(0, 2, 3), i64(0, 0, 2), np.arange(1, 13, dtype=np.float32)),
}


def check_against_scipy(isa_name, case, inputs):
    fmt = "csr" if case[0] == (1, 1) else "bsr"
    block, shape, indptr, indices, values = case
    p = PackedLinear(fmt, block[0], block[1], shape[0], shape[1], indptr, indices, values)
    dense = scipy_dense(fmt, block, shape, indptr, indices, values)
    for x in inputs:
        for batch_x in (x[None], np.tile(x, (9, 1))):
            y = run(p, batch_x)
            assert_within(
                y, dense_nonfinite_reference(batch_x, dense, None, False),
                fp32_error_bound(np.where(np.isfinite(batch_x), batch_x, 0).astype(np.float32), dense, None),
                msg=f"{isa_name} x={x}",
            )


@pytest.mark.parametrize("name", list(UNSORTED))
def test_unsorted_indices_within_a_row(isa, name):
    n_cols = UNSORTED[name][1][1]
    inputs = [np.arange(1, n_cols + 1, dtype=np.float32)]
    for k in range(n_cols):
        x = inputs[0].copy()
        x[k] = np.inf
        inputs.append(x)
    check_against_scipy(isa, UNSORTED[name], inputs)


def duplicate_case_or_refusal(name):
    block, shape, indptr, indices, values = DUPLICATES[name]
    fmt = "csr" if block == (1, 1) else "bsr"
    try:
        PackedLinear(fmt, block[0], block[1], shape[0], shape[1], indptr, indices, values)
    except ValueError as exc:  # refusing duplicates is an acceptable contract too
        assert "indices" in str(exc)
        return None
    return DUPLICATES[name]


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_duplicate_indices_finite(isa, name):
    """Arrays given straight to PackedLinear may store one column twice in a row: either they are
    refused (ValueError naming indices) or the entries add up, as scipy treats them."""
    case = duplicate_case_or_refusal(name)
    if case is not None:
        n_cols = case[1][1]
        check_against_scipy(isa, case, [np.arange(1, n_cols + 1, dtype=np.float32)])


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_duplicate_indices_nonfinite(isa, name):
    case = duplicate_case_or_refusal(name)
    if case is None:
        return
    n_cols = case[1][1]
    inputs = []
    for k in range(n_cols):
        for j in range(n_cols):
            x = np.arange(1, n_cols + 1, dtype=np.float32)
            x[k] = np.inf
            x[j] = np.inf
            inputs.append(x)
    check_against_scipy(isa, case, inputs)


@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FORMAT_IDS)
def test_out_aliasing_x(rng, fmt, block, batch):
    w = sparse_weight(rng, 64, 64, 0.5)
    p = formats.pack(w, None, fmt, block)
    x = random_x(rng, batch, 64)
    x[0, 3] = np.inf
    expected = run(p, x.copy())
    aliased = x.copy()
    try:
        y = run(p, aliased, out=aliased)
    except ValueError as exc:
        assert "out" in str(exc)
        return
    np.testing.assert_array_equal(y, expected)
