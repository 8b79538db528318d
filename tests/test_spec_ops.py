"""The spec's tensor ops (dense linear, affine, matmul, attention, permute, cat, embedding) and
int64 inputs: the native plan against the numpy reference (and the reference against torch), edge
sizes around the GEMM's 6x16 tiles, run-time id checks, and validation errors naming the field,
in Python and in the native plan itself."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseprune import _native
from sparseprune.runtime import Executable, SpecError, load, run_reference, validate
from spec_edits import drop_field, set_field  # tests/spec_edits.py
from spec_helpers import assert_close, check, make_spec, randn, torch64  # tests/spec_helpers.py

_C = _native._C

F32 = np.float32


# --- helpers -------------------------------------------------------------------------------------


BATCHES = (0, 1, 3)
SIZES = (1, 5, 6, 7, 13, 16, 17, 33)  # below, at and above the 6-row and 16-column GEMM tiles


# --- dense linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(1, 1), (5, 7), (6, 16), (7, 17), (16, 6), (13, 33), (33, 13), (17, 1)])
@pytest.mark.parametrize("bias, act", [(True, None), (False, "relu"), (True, "gelu")])
def test_dense_linear(rng, rows, cols, bias, act):
    arrays = {"fc.weight": randn(rng, rows, cols)}
    if bias:
        arrays["fc.bias"] = randn(rng, rows)
    op = {"op": "linear", "in": 0, "out": 1, "weight": "fc", "format": "dense", "block": [1, 1], "rows": rows,
          "cols": cols}
    if act:
        op["activation"] = act
    spec = make_spec([[3, cols], [3, rows]], [0], [1], [op])
    for batch in (0, 1, 2, 7):  # 0, 3, 6 and 21 rows for the GEMM
        x = randn(rng, batch, 3, cols)
        (got,) = check(spec, arrays, [x])
        # the reference itself, against an independent formula
        want = x.astype(np.float64) @ arrays["fc.weight"].T.astype(np.float64) + arrays.get("fc.bias", 0.0)
        want = {None: lambda t: t, "relu": lambda t: np.maximum(t, 0),
                "gelu": lambda t: F.gelu(torch64(t)).numpy()}[act](want)
        assert_close(got, want)


def test_dense_linear_every_simd_path_and_threads(rng, simd_path):
    arrays = {"fc.weight": randn(rng, 37, 29), "fc.bias": randn(rng, 37)}
    spec = make_spec([[29], [37]], [0], [1], [
        {"op": "linear", "in": 0, "out": 1, "weight": "fc", "format": "dense", "block": [1, 1], "rows": 37,
         "cols": 29}])
    x = randn(rng, 45, 29)
    two = check(spec, arrays, [x], n_threads=2)[0]
    assert_close(check(spec, arrays, [x], n_threads=1)[0], two.astype(np.float64))


# --- affine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, shift, act", [(2, -1, None), (0.5, 0.25, "relu"), (-1.5, 3.0, "tanh"),
                                               (1.0, 0.0, None), (0, 7, "sigmoid")])
def test_affine(rng, scale, shift, act):
    op = {"op": "affine", "in": 0, "out": 1, "scale": scale, "shift": shift}
    if act:
        op["activation"] = act
    spec = make_spec([[4, 5], [4, 5]], [0], [1], [op])
    for batch in BATCHES:
        x = randn(rng, batch, 4, 5)
        (got,) = check(spec, arrays={}, inputs=[x])
        want = x.astype(np.float64) * scale + shift
        want = {None: want, "relu": np.maximum(want, 0), "tanh": np.tanh(want),
                "sigmoid": 1 / (1 + np.exp(-want))}[act]
        assert_close(got, want)


def test_affine_in_place_and_on_an_alias(rng):
    # op 0 writes buffer 1; op 1 runs in place on it; op 2 writes through an alias of the same storage.
    spec = make_spec([[6], [6], {"shape": [2, 3], "alias_of": 1}], [0], [2], [
        {"op": "activation", "kind": "relu", "in": 0, "out": 1},
        {"op": "affine", "in": 1, "out": 1, "scale": 3.0, "shift": 1.0},
        {"op": "affine", "in": 2, "out": 2, "scale": -2.0, "shift": 0.5, "activation": "relu6"},
    ])
    x = randn(rng, 4, 6)
    (got,) = check(spec, {}, [x])
    want = np.clip(-2.0 * (3.0 * np.maximum(x, 0) + 1.0) + 0.5, 0, 6).reshape(4, 2, 3)
    assert_close(got, want)
    assert np.count_nonzero(got) < got.size  # relu6 clipped some values: the test can tell


# --- matmul ------------------------------------------------------------------------------------------


MATMUL_CASES = [  # (group dims, M, K, N)
    ((), 1, 1, 1), ((), 6, 16, 7), ((), 7, 17, 16), ((), 13, 5, 33), ((2,), 5, 7, 6), ((3,), 17, 6, 13),
    ((2, 3), 6, 33, 17), ((1, 2), 1, 13, 5),
]


@pytest.mark.parametrize("groups, m, k, n", MATMUL_CASES)
@pytest.mark.parametrize("transpose_b, scale", [(False, 1.0), (True, 0.125), (False, -3), (True, 1)])
def test_matmul(rng, groups, m, k, n, transpose_b, scale):
    b_shape = groups + ((n, k) if transpose_b else (k, n))
    spec = make_spec([groups + (m, k), b_shape, groups + (m, n)], [0, 1], [2], [
        {"op": "matmul", "a": 0, "b": 1, "out": 2, "transpose_b": transpose_b, "scale": scale}])
    for batch in BATCHES:
        a, b = randn(rng, batch, *groups, m, k), randn(rng, batch, *b_shape)
        (got,) = check(spec, {}, [a, b])
        bt = torch64(b).transpose(-1, -2) if transpose_b else torch64(b)
        assert_close(got, (scale * (torch64(a) @ bt)).numpy())


def test_matmul_of_a_buffer_with_itself_on_every_simd_path(rng, simd_path):
    # x @ x^T reads one buffer twice; many groups take the parallel path.
    spec = make_spec([[3, 7, 9], [3, 7, 7]], [0], [1], [
        {"op": "matmul", "a": 0, "b": 0, "out": 1, "transpose_b": True, "scale": 0.5}])
    x = randn(rng, 40, 3, 7, 9)
    want = 0.5 * np.einsum("bgmk,bgnk->bgmn", x.astype(np.float64), x.astype(np.float64))
    assert_close(check(spec, {}, [x], n_threads=2)[0], want)
    assert_close(check(spec, {}, [x], n_threads=1)[0], want)


# --- attention ---------------------------------------------------------------------------------------


def torch_attention(q, k, v, scale, causal):
    return F.scaled_dot_product_attention(torch64(q), torch64(k), torch64(v), is_causal=causal, scale=scale).numpy()


@pytest.mark.parametrize("heads, L, S, D, Dv", [(1, 1, 1, 1, 1), (1, 5, 7, 6, 3), (3, 7, 5, 4, 6),
                                                 (2, 17, 17, 16, 8), (4, 6, 33, 5, 7), (2, 70, 13, 3, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_sequence_first(rng, heads, L, S, D, Dv, causal):
    scale = 1.0 / np.sqrt(D)
    spec = make_spec([[L, heads * D], [S, heads * D], [S, heads * Dv], [L, heads * Dv]], [0, 1, 2], [3], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "out": 3, "layout": "sequence_first", "heads": heads,
         "scale": scale, "causal": causal}])
    for batch in BATCHES:
        q, k, v = randn(rng, batch, L, heads * D), randn(rng, batch, S, heads * D), randn(rng, batch, S, heads * Dv)
        (got,) = check(spec, {}, [q, k, v])

        def split(t, d):  # (batch, rows, heads * d) -> (batch, heads, rows, d): head h at columns h*d..
            return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(0, 2, 1, 3)

        want = torch_attention(split(q, D), split(k, D), split(v, Dv), scale, causal)
        assert_close(got, want.transpose(0, 2, 1, 3).reshape(batch, L, heads * Dv))


@pytest.mark.parametrize("groups, L, S, D, Dv", [((), 1, 1, 1, 1), ((), 7, 5, 6, 16), ((3,), 5, 17, 7, 6),
                                                  ((2,), 13, 13, 16, 1), ((2, 3), 6, 7, 33, 5), ((2,), 70, 70, 4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_heads_first(rng, groups, L, S, D, Dv, causal):
    scale = 0.3
    spec = make_spec([groups + (L, D), groups + (S, D), groups + (S, Dv), groups + (L, Dv)], [0, 1, 2], [3], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "out": 3, "layout": "heads_first", "heads": 1,
         "scale": scale, "causal": causal}])
    for batch in BATCHES:
        q, k, v = randn(rng, batch, *groups, L, D), randn(rng, batch, *groups, S, D), randn(rng, batch, *groups, S, Dv)
        (got,) = check(spec, {}, [q, k, v])
        assert_close(got, torch_attention(q, k, v, scale, causal))


def test_causal_attention_masks_later_keys(rng):
    # With causal, query 0 sees key 0 only: its output is exactly v[0], whatever q and k.
    spec = make_spec([[4, 3], [6, 3], [6, 2], [4, 2]], [0, 1, 2], [3], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "out": 3, "layout": "heads_first", "heads": 1, "scale": 1,
         "causal": True}])
    q, k, v = randn(rng, 2, 4, 3), randn(rng, 2, 6, 3), randn(rng, 2, 6, 2)
    (got,) = check(spec, {}, [q, k, v])
    np.testing.assert_allclose(got[:, 0], v[:, 0], rtol=1e-6)
    assert not np.allclose(got[:, 1], v[:, 1])


def test_attention_threads_and_every_simd_path(rng, simd_path):
    spec = make_spec([[70, 12], [40, 12], [40, 9], [70, 9]], [0, 1, 2], [3], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "out": 3, "layout": "sequence_first", "heads": 3,
         "scale": 0.5, "causal": True}])
    xs = [randn(rng, 6, 70, 12), randn(rng, 6, 40, 12), randn(rng, 6, 40, 9)]
    first = check(spec, {}, xs, n_threads=2)[0]
    assert_close(check(spec, {}, xs, n_threads=1)[0], first.astype(np.float64))


# --- permute -----------------------------------------------------------------------------------------


PERMUTE_CASES = ([((5, 7), p) for p in itertools.permutations(range(2))]
                 + [((3, 1, 6), p) for p in itertools.permutations(range(3))]
                 + [((2, 3, 4, 5), p) for p in [(0, 1, 2, 3), (3, 2, 1, 0), (0, 2, 1, 3), (1, 3, 0, 2), (2, 0, 3, 1)]]
                 + [((17,), (0,))])


@pytest.mark.parametrize("shape, perm", PERMUTE_CASES)
def test_permute(rng, shape, perm):
    out_shape = [shape[p] for p in perm]
    spec = make_spec([shape, out_shape], [0], [1], [{"op": "permute", "in": 0, "out": 1, "perm": list(perm)}])
    for batch in BATCHES:
        x = randn(rng, batch, *shape)
        (got,) = check(spec, {}, [x])
        np.testing.assert_array_equal(got, torch.from_numpy(x).permute(0, *[p + 1 for p in perm]).numpy())


# --- cat ---------------------------------------------------------------------------------------------


def _cat_cases():
    cases = []
    for base in [(5,), (3, 7), (2, 4, 6)]:
        for axis in range(len(base)):
            for n in (1, 2, 3):
                shapes = [tuple(d + (i if a == axis else 0) for a, d in enumerate(base)) for i in range(n)]
                cases.append((shapes, axis))
    return cases


@pytest.mark.parametrize("shapes, axis", _cat_cases())
def test_cat(rng, shapes, axis):
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    n = len(shapes)
    spec = make_spec(list(shapes) + [out], list(range(n)), [n], [
        {"op": "cat", "inputs": list(range(n)), "out": n, "axis": axis}])
    for batch in BATCHES:
        xs = [randn(rng, batch, *s) for s in shapes]
        (got,) = check(spec, {}, xs)
        np.testing.assert_array_equal(got, torch.cat([torch.from_numpy(x) for x in xs], dim=axis + 1).numpy())


def test_cat_reads_one_buffer_twice(rng):
    spec = make_spec([[2, 3], [2, 6]], [0], [1], [{"op": "cat", "inputs": [0, 0], "out": 1, "axis": 1}])
    x = randn(rng, 4, 2, 3)
    (got,) = check(spec, {}, [x])
    np.testing.assert_array_equal(got, np.concatenate([x, x], axis=2))


# --- embedding and int64 inputs ----------------------------------------------------------------------


def embedding_spec(n_rows, dim, in_shape=(5,), int_input=True):
    top = {"input_dtypes": ["int64"]} if int_input else {}
    return make_spec([list(in_shape), list(in_shape) + [dim]], [0], [1],
                     [{"op": "embedding", "in": 0, "out": 1, "weight": "emb"}], **top)


@pytest.mark.parametrize("n_rows, dim", [(1, 1), (13, 7), (6, 17), (40, 16)])
@pytest.mark.parametrize("in_shape", [(5,), (2, 3)])
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32, np.uint8])
def test_embedding_with_int_inputs(rng, n_rows, dim, in_shape, id_dtype):
    arrays = {"emb.table": randn(rng, n_rows, dim)}
    spec = embedding_spec(n_rows, dim, in_shape)
    for batch in BATCHES:
        ids = rng.integers(0, n_rows, size=(batch, *in_shape)).astype(id_dtype)
        (got,) = check(spec, arrays, [ids])
        np.testing.assert_array_equal(got, arrays["emb.table"][ids.astype(np.int64)])


def test_embedding_of_float_ids_computed_in_the_graph(rng):
    # ids reach the embedding as floats from an op: 2 * x + 1 of float32 inputs.
    arrays = {"emb.table": randn(rng, 9, 4)}
    spec = make_spec([[3], [3], [3, 4]], [0], [2], [
        {"op": "affine", "in": 0, "out": 1, "scale": 2, "shift": 1},
        {"op": "embedding", "in": 1, "out": 2, "weight": "emb"}])
    x = np.array([[0, 1, 2], [3, 3, 0]], F32)
    (got,) = check(spec, arrays, [x])
    np.testing.assert_array_equal(got, arrays["emb.table"][(2 * x + 1).astype(int)])


@pytest.mark.parametrize("bad", [13.0, 100.0, -1.0, 2.5, 0.5, np.nan, np.inf])
def test_embedding_refuses_bad_ids_natively_and_in_the_reference(rng, bad):
    arrays = {"emb.table": randn(rng, 13, 4)}
    spec = embedding_spec(13, 4, int_input=False)  # float32 input: the ids reach the plan unchecked
    x = np.array([[0, 12, 3, 4, 5], [1, 2, 3, 4, 5]], F32)
    exe = Executable.from_spec(spec, arrays)
    np.testing.assert_array_equal(exe.run(x), arrays["emb.table"][x.astype(int)])
    x[1, 3] = bad
    shown = str(int(bad)) if np.isfinite(bad) and bad == int(bad) else ".*"
    # the op, its name and the input it reads; the sample, the value and where it is; the range
    with pytest.raises(ValueError, match=rf"^ops\[0\] \(embedding 'emb', reading input 0\): sample 1 holds {shown} at "
                                         r"index 3, not a row of the table \[0, 13\)$"):
        exe.run(x)
    with pytest.raises(ValueError, match=rf"\(embedding\): sample 1 holds {shown} at index 3, not a row of the table "
                                         r"\[0, 13\)"):
        run_reference(spec, arrays, [x])
    # the plan is still usable afterwards
    x[1, 3] = 4
    np.testing.assert_array_equal(exe.run(x), arrays["emb.table"][x.astype(int)])


def test_int64_ids_at_or_past_the_table_are_refused_by_the_plan(rng):
    arrays = {"emb.table": randn(rng, 13, 4)}
    exe = Executable.from_spec(embedding_spec(13, 4), arrays)
    for bad in (13, 2**24 - 1):  # valid int64 inputs, but not rows of the table
        ids = np.zeros((2, 5), np.int64)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match=rf"holds {bad} at \(0, 2\), not a row of embedding 'emb': ids must lie "
                                             r"in \[0, 13\)"):
            exe.run(ids)  # checked by run() with the input's name and the table's real range
        with pytest.raises(ValueError, match=rf"ops\[0\] \(embedding\): sample 0 holds {bad} at index 2, not a row of "
                                             r"the table \[0, 13\)"):
            exe._plan.run([ids.astype(np.float32)], 1, [])  # and by the native plan itself
        with pytest.raises(ValueError, match=r"not a row of the table \[0, 13\)"):
            run_reference(embedding_spec(13, 4), arrays, [ids])


def test_int64_input_checks_name_the_input(rng):
    arrays = {"emb.table": randn(rng, 13, 4)}
    spec = embedding_spec(13, 4)
    spec["buffers"][0]["name"] = "tokens"
    exe = Executable.from_spec(spec, arrays)
    assert exe.input_dtypes == ("int64",)
    name = r"input 0 \('tokens'\)"
    good = np.arange(10, dtype=np.int64).reshape(2, 5)
    np.testing.assert_array_equal(exe.run(good), arrays["emb.table"][good])
    for wrong in (good.astype(F32), good.astype(np.float64), good.astype(bool)):
        with pytest.raises(TypeError, match=rf"{name} must hold integer token ids .*got {wrong.dtype}"):
            exe.run(wrong)
    with pytest.raises(TypeError, match=rf"{name} must be an integer \(token id\) numpy array"):
        exe.run(good.tolist())
    for bad in (-1, 2**24, 2**40):
        ids = good.copy()
        ids[1, 1] = bad
        with pytest.raises(ValueError, match=rf"^{name} holds {bad} at \(1, 1\), not a row of embedding 'emb': ids "
                                             r"must lie in \[0, 13\)$"):
            exe.run(ids)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(batch, 5\)"):
        exe.run(np.zeros((2, 4), np.int64))
    assert exe.run(np.zeros((0, 5), np.int64)).shape == (0, 5, 4)
    assert exe.run(np.zeros((0, 5), np.uint64)).shape == (0, 5, 4)
    # float inputs keep their float32 rule
    spec2 = make_spec([[3], [3]], [0], [1], [{"op": "affine", "in": 0, "out": 1, "scale": 1, "shift": 0}],
                      input_dtypes=["float32"])
    with pytest.raises(TypeError, match=r"input 0 must be float32, got int64"):
        Executable.from_spec(spec2, {}).run(np.zeros((1, 3), np.int64))


# --- a small transformer block using every new op, end to end ---------------------------------------


def block_spec(rng):
    """ids (5,) -> embedding (5, 8) -> dense q/k and csr-free v projections -> sequence_first
    attention (2 heads, D 4, Dv 3) -> affine in place -> permute (6, 5) -> alias (2, 3, 5) ->
    matmul with itself (transpose_b) and heads_first causal attention -> cat along the last axis."""
    arrays = {"emb.table": randn(rng, 11, 8), "wq.weight": randn(rng, 8, 8), "wq.bias": randn(rng, 8),
              "wk.weight": randn(rng, 8, 8), "wv.weight": randn(rng, 6, 8), "wv.bias": randn(rng, 6)}

    def dense(name, out, rows):
        return {"op": "linear", "in": 1, "out": out, "weight": name, "format": "dense", "block": [1, 1],
                "rows": rows, "cols": 8}

    buffers = [[5], [5, 8], [5, 8], [5, 8], [5, 6], [5, 6], [6, 5], {"shape": [2, 3, 5], "alias_of": 6},
               [2, 3, 3], [2, 3, 5], [2, 3, 8]]
    ops = [
        {"op": "embedding", "in": 0, "out": 1, "weight": "emb", "name": "embed"},
        dense("wq", 2, 8), dense("wk", 3, 8), dense("wv", 4, 6),
        {"op": "attention", "q": 2, "k": 3, "v": 4, "out": 5, "layout": "sequence_first", "heads": 2,
         "scale": 0.5, "causal": False},
        {"op": "affine", "in": 5, "out": 5, "scale": 2.0, "shift": -0.5, "activation": "gelu"},
        {"op": "permute", "in": 5, "out": 6, "perm": [1, 0]},
        {"op": "matmul", "a": 7, "b": 7, "out": 8, "transpose_b": True, "scale": 0.25},
        {"op": "attention", "q": 7, "k": 7, "v": 7, "out": 9, "layout": "heads_first", "heads": 1, "scale": 1.0,
         "causal": True},
        {"op": "cat", "inputs": [8, 9], "out": 10, "axis": 2},
    ]
    return make_spec(buffers, [0], [10, 5], ops, input_dtypes=["int64"]), arrays


def test_block_of_every_new_op_matches_the_reference_and_torch(rng):
    spec, arrays = block_spec(rng)
    for batch in (0, 1, 4):
        ids = rng.integers(0, 11, size=(batch, 5))
        cat, attn = check(spec, arrays, [ids], n_threads=2)
        assert cat.shape == (batch, 2, 3, 8) and attn.shape == (batch, 5, 6)
        # the same block in torch
        x = torch64(arrays["emb.table"])[torch.from_numpy(ids)]
        q = x @ torch64(arrays["wq.weight"]).T + torch64(arrays["wq.bias"])
        k = x @ torch64(arrays["wk.weight"]).T
        v = x @ torch64(arrays["wv.weight"]).T + torch64(arrays["wv.bias"])
        def split(t):  # (batch, 5, 2 * d) -> (batch, 2 heads, 5, d)
            return t.reshape(t.shape[0], 5, 2, t.shape[-1] // 2).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=0.5).transpose(1, 2).reshape(batch, 5, 6)
        a = F.gelu(2.0 * a - 0.5)
        p = a.transpose(1, 2).reshape(batch, 2, 3, 5)
        mm = 0.25 * p @ p.transpose(-1, -2)
        hf = F.scaled_dot_product_attention(p, p, p, is_causal=True, scale=1.0)
        assert_close(attn, a.numpy())
        assert_close(cat, torch.cat([mm, hf], dim=-1).numpy())


def test_block_round_trips_through_a_file(rng, tmp_path):
    spec, arrays = block_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    exe.save(tmp_path / "block.safetensors")
    loaded = load(tmp_path / "block.safetensors")
    assert loaded.input_dtypes == ("int64",) and loaded.spec["input_dtypes"] == ["int64"]
    ids = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    for g, w in zip(loaded.run(ids), exe.run(ids)):
        np.testing.assert_array_equal(g, w)


def test_sizes_and_layer_table_count_dense_weights_and_tables(rng):
    spec, arrays = block_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    # all arrays are dense float32: stored bytes == dense bytes
    want = 4 * (11 * 8 + 8 * 8 + 8 + 8 * 8 + 6 * 8 + 6)
    assert exe.nbytes == want
    assert exe.dense_nbytes == want
    table = {row["name"]: row for row in exe.layer_table()}
    assert set(table) == {"embed", "wq", "wk", "wv"}
    assert table["embed"]["op"] == "embedding" and table["embed"]["format"] == "dense"
    assert table["wq"]["format"] == "dense" and table["wq"]["op"] == "linear"
    assert table["embed"]["sparsity"] == 0.0
    # zeros in a dense weight show as sparsity, in the dense byte count not at all
    arrays["wk.weight"][:, :6] = 0
    exe = Executable.from_spec(spec, arrays)
    row = {r["name"]: r for r in exe.layer_table()}["wk"]
    assert row["nnz"] == 16 and row["sparsity"] == pytest.approx(0.75)
    assert exe.dense_nbytes == want


def test_dense_nbytes_counts_shared_and_sparse_weights_once(rng):
    from sparseprune import formats

    w = randn(rng, 6, 8)
    w[w < 0.5] = 0
    csr = formats.csr_arrays(w)
    arrays = {"fc.indptr": csr.indptr, "fc.indices": csr.indices, "fc.values": csr.values, "fc.bias": randn(rng, 6),
              "emb.table": randn(rng, 4, 8)}
    lin = {"op": "linear", "weight": "fc", "format": "csr", "block": [1, 1], "rows": 6, "cols": 8}
    spec = make_spec([[2], [2, 8], [2, 6], [2, 6]], [0], [2, 3], [
        {"op": "embedding", "in": 0, "out": 1, "weight": "emb"},
        {**lin, "in": 1, "out": 2}, {**lin, "in": 1, "out": 3, "activation": "relu"}])
    exe = Executable.from_spec(spec, arrays)
    assert exe.dense_nbytes == 4 * (6 * 8 + 6 + 4 * 8)
    assert exe.nbytes == sum(a.nbytes for a in arrays.values())
    assert [r["format"] for r in exe.layer_table()] == ["dense", "csr", "csr"]
    ids = np.array([[0, 3]], F32)
    got = exe.run(ids)
    assert_close(got[1], run_reference(spec, arrays, [ids])[1])


def test_validate_reports_input_dtypes(rng):
    spec, arrays = block_spec(rng)
    layout = validate(spec, arrays)
    assert layout.input_dtypes == ("int64",) and layout.spec["input_dtypes"] == ["int64"]
    del spec["input_dtypes"]
    layout = validate(spec, arrays)
    assert layout.input_dtypes == ("float32",) and "input_dtypes" not in layout.spec
    # canonical numbers: scale as float, flags as bool
    ops = layout.spec["ops"]
    assert ops[7]["scale"] == 0.25 and ops[7]["transpose_b"] is True and ops[4]["causal"] is False


# --- validation: each malformed field is refused, naming it -------------------------------------------




def _array(name, value):
    def edit(spec, arrays):
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays.get(name)) if callable(value) else value
    return edit


# (edit, Python exception, Python message, native message or None when only Python checks it)
BAD = [
    # permute
    (set_field(["ops", 6, "perm"], [0]), SpecError, r"spec\.ops\[6\]\.perm must be a list of 2 ints", r"perm must list"),
    (set_field(["ops", 6, "perm"], [1, 1]), SpecError, r"spec\.ops\[6\]\.perm = \[1, 1\] is not a permutation of range\(2\)",
     r"perm is not a permutation"),
    (set_field(["ops", 6, "perm"], [0, 2]), SpecError, r"spec\.ops\[6\]\.perm = \[0, 2\] is not a permutation",
     r"perm is not a permutation"),
    (set_field(["ops", 6, "perm"], [True, 0]), SpecError, r"spec\.ops\[6\]\.perm must be a list of 2 ints", r"perm"),
    (set_field(["ops", 6, "perm"], [0, 1]), SpecError, r"spec\.ops\[6\]: output buffer 6 must have shape \(5, 6\)",
     r"output must have shape"),
    (set_field(["ops", 6, "out"], 5), SpecError, r"spec\.ops\[6\]: out must not share storage with in",
     r"must not share storage"),
    # cat
    (set_field(["ops", 9, "inputs"], [8, 4]), SpecError,
     r"spec\.ops\[9\]\.inputs\[1\]: buffer 4 \(5, 6\) must have the shape of inputs\[0\] \(2, 3, 3\) "
     r"except along axis 2",
     r"cat operands need the same rank"),
    (set_field(["buffers", 8, "shape"], [2, 4, 3]), SpecError, r"spec\.ops\[7\]: output buffer 8", None),
    (set_field(["ops", 9, "axis"], 3), SpecError, r"spec\.ops\[9\]\.axis = 3 is out of range for inputs of rank 3",
     r"axis out of range"),
    (set_field(["ops", 9, "axis"], 1), SpecError, r"spec\.ops\[9\]\.inputs\[1\]: buffer 9", r"differ outside the axis"),
    (set_field(["ops", 9, "inputs"], []), SpecError, r"spec\.ops\[9\]\.inputs must be a list of 1 to 64 buffer ids",
     r"cat needs at least one input"),
    (set_field(["ops", 9, "inputs"], [8, 99]), SpecError, r"spec\.ops\[9\]\.inputs\[1\] = 99 is not a buffer id",
     r"not a buffer id"),
    (set_field(["ops", 9, "inputs"], [8, 10]), SpecError, r"spec\.ops\[9\]\.inputs\[1\] = 10 reads a buffer that no input",
     None),
    (set_field(["ops", 9, "out"], 9), SpecError, r"spec\.ops\[9\]: out must not share storage with inputs\[1\]",
     r"must not share storage"),
    # attention
    (set_field(["ops", 4, "heads"], 3), SpecError,
     r"spec\.ops\[4\]\.heads = 3 must divide the last dims of q \(8\) and v \(6\)",
     r"do not fit 3 heads"),
    (set_field(["ops", 4, "heads"], 4), SpecError, r"spec\.ops\[4\]\.heads = 4 must divide", r"do not fit 4 heads"),
    (set_field(["ops", 4, "heads"], 0), SpecError, r"spec\.ops\[4\]\.heads = 0 is out of range", r"heads is out of range"),
    (set_field(["ops", 4, "heads"], 2.0), SpecError, r"spec\.ops\[4\]\.heads must be an int", r"heads must be an int"),
    (set_field(["ops", 4, "layout"], "batch_first"), SpecError, r"spec\.ops\[4\]\.layout must be one of",
     r"layout must be"),
    (set_field(["ops", 4, "causal"], 1), SpecError, r"spec\.ops\[4\]\.causal must be true or false",
     r"causal must be true or false"),
    (set_field(["ops", 4, "scale"], True), SpecError, r"spec\.ops\[4\]\.scale must be a finite number",
     r"scale must be a number"),
    (set_field(["ops", 4, "v"], 2), SpecError, r"spec\.ops\[4\]: output buffer 5 must have shape \(5, 8\)",
     r"output must be"),
    (set_field(["ops", 4, "k"], 4), SpecError, r"spec\.ops\[4\]: q and k must have the same last dim", r"do not fit"),
    (set_field(["ops", 4, "out"], 4), SpecError, r"spec\.ops\[4\]: out must not share storage with v",
     r"must not share storage"),
    (set_field(["ops", 8, "v"], 10), SpecError, r"spec\.ops\[8\]\.v = 10 reads a buffer that no input or earlier op writes",
     r"output must have shape"),
    (set_field(["ops", 8, "layout"], "sequence_first"), SpecError, r"layout 'sequence_first' needs q, k, v of rank 2",
     r"sequence_first q, k, v must be"),
    (set_field(["ops", 8, "k"], 6), SpecError, r"spec\.ops\[8\]: layout 'heads_first' needs q, k, v of the same rank",
     r"same rank"),
    # matmul
    (set_field(["ops", 7, "transpose_b"], False), SpecError,
     r"spec\.ops\[7\]: inner dims of a \(2, 3, 5\) and b \(2, 3, 5\) differ: a has K = 5, b's second-to-last dim is 3",
     r"matmul inner dimensions differ"),
    (set_field(["ops", 7, "b"], 5), SpecError, r"spec\.ops\[7\]: a \(2, 3, 5\) and b \(5, 6\) must have the same rank",
     r"same rank"),
    (set_field(["ops", 7, "transpose_b"], "yes"), SpecError, r"spec\.ops\[7\]\.transpose_b must be true or false",
     r"transpose_b must be true or false"),
    (set_field(["ops", 7, "scale"], True), SpecError, r"spec\.ops\[7\]\.scale must be a finite number",
     r"scale must be a number"),
    (set_field(["ops", 7, "scale"], float("nan")), SpecError, r"spec\.ops\[7\]\.scale must be a finite number",
     r"scale must be a finite float32"),
    (set_field(["ops", 7, "scale"], float("-inf")), SpecError, r"spec\.ops\[7\]\.scale must be a finite number",
     r"scale must be a finite float32"),
    (set_field(["ops", 7, "scale"], 1e39), SpecError, r"spec\.ops\[7\]\.scale must be a finite number",
     r"scale must be a finite float32"),
    (set_field(["ops", 7, "scale"], 10**400), SpecError, r"spec\.ops\[7\]\.scale must be a finite number", None),
    (set_field(["ops", 7, "scale"], "0.5"), SpecError, r"spec\.ops\[7\]\.scale must be a finite number",
     r"scale must be a number"),
    (set_field(["ops", 7, "out"], 6), SpecError, r"spec\.ops\[7\]: out must not share storage with a",
     r"must not share storage"),
    (set_field(["ops", 7, "out"], 7), SpecError, r"spec\.ops\[7\]: out must not share storage with a",
     r"must not share storage"),
    (drop_field(["ops", 7, "scale"]), SpecError, r"spec\.ops\[7\] has no field 'scale'", r"has no field 'scale'"),
    (set_field(["ops", 7, "in"], 7), SpecError, r"spec\.ops\[7\] has unknown field 'in'", None),
    # affine
    (set_field(["ops", 5, "shift"], float("nan")), SpecError, r"spec\.ops\[5\]\.shift must be a finite number",
     r"shift must be a finite float32"),
    (set_field(["ops", 5, "scale"], None), SpecError, r"spec\.ops\[5\]\.scale must be a finite number",
     r"scale must be a number"),
    (set_field(["ops", 5, "out"], 3), SpecError, r"spec\.ops\[5\]: output buffer 3 must have shape \(5, 6\)",
     r"input and output sizes differ"),
    (set_field(["ops", 5, "activation"], "swish"), SpecError, r"spec\.ops\[5\]\.activation", r"activation"),
    # embedding
    (_array("emb.table", None), SpecError, r"array 'emb\.table' \(float32 embedding table\) is missing",
     r"emb\.table"),
    (_array("emb.table", lambda t: t.astype(np.float64)), TypeError, r"array 'emb\.table' must be float32",
     r"emb\.table"),
    (_array("emb.table", lambda t: t.ravel().copy()), SpecError, r"array 'emb\.table' must be 2-D", r"emb\.table"),
    (_array("emb.table", np.zeros((0, 8), F32)), SpecError, r"array 'emb\.table' must have at least one row",
     r"emb\.table"),
    (_array("emb.table", lambda t: t[:, :7].copy()), SpecError,
     r"spec\.ops\[0\] \(embed\): output buffer 1 must have shape \(5, 7\)", r"output must have shape"),
    (set_field(["ops", 0, "weight"], "emb2"), SpecError, r"array 'emb2\.table' \(float32 embedding table\) is missing",
     r"emb2\.table"),
    # dense linear
    (_array("wq.weight", None), SpecError, r"array 'wq\.weight' \(float32 dense weight\) is missing", r"wq\.weight"),
    (_array("wq.weight", lambda w: w.T.copy()[:, :7]), SpecError,
     r"array 'wq\.weight' must have shape \(rows, cols\) = \(8, 8\), got \(8, 7\)", r"wq\.weight"),
    (_array("wv.weight", lambda w: w.ravel().copy()), SpecError, r"array 'wv\.weight' must be 2-D", r"wv\.weight"),
    (_array("wv.weight", lambda w: w.astype(np.float16)), TypeError, r"array 'wv\.weight' must be float32",
     r"wv\.weight"),
    (_array("wv.bias", lambda b: b[:5].copy()), SpecError, r"array 'wv\.bias' must have rows = 6 entries",
     r"wv\.bias"),
    (_array("wv.indptr", np.zeros(7, np.int64)), SpecError,
     r"array 'wv\.indptr' is not used: format 'dense' reads 'wv\.weight'", None),
    (set_field(["ops", 3, "block"], [4, 1]), SpecError, r"spec\.ops\[3\]\.block must be \[1, 1\] for format 'dense'", None),
    (set_field(["ops", 3, "format"], "Dense"), SpecError,
     r"spec\.ops\[3\]\.format must be 'csr' or 'bsr' \(sparse\) or 'dense'",
     None),
    (set_field(["ops", 3, "rows"], 7), SpecError, r"spec\.ops\[3\]: output buffer 4 must have shape \(5, 7\)",
     r"wv\.weight' must have shape \(7, 8\)"),
    # input_dtypes
    (set_field(["input_dtypes"], ["int32"]), SpecError, r"spec\.input_dtypes\[0\] must be one of \('float32', 'int64', 'bool'\)",
     None),
    (set_field(["input_dtypes"], ["int64", "int64"]), SpecError,
     r"spec\.input_dtypes must be a list with one entry per input",
     None),
    (set_field(["input_dtypes"], "int64"), SpecError, r"spec\.input_dtypes must be a list", None),
]


@pytest.mark.parametrize("edit, exc, match, native", BAD)
def test_malformed_fields_are_refused_naming_the_field(rng, edit, exc, match, native):
    spec, arrays = block_spec(rng)
    Executable.from_spec(spec, arrays)  # the unedited spec is valid
    edit(spec, arrays)
    with pytest.raises(exc, match=match):
        validate(spec, arrays)
    with pytest.raises(exc, match=match):
        Executable.from_spec(copy.deepcopy(spec), arrays)
    with pytest.raises(exc, match=match):
        run_reference(spec, arrays, [np.zeros((1, 5), np.int64)])
    if native is not None:  # the native plan, given the spec directly, refuses it too
        with pytest.raises((ValueError, TypeError), match=native):
            _C.Plan(json.dumps(spec), arrays)


def test_the_native_plan_accepts_the_valid_block(rng):
    spec, arrays = block_spec(rng)
    plan = _C.Plan(json.dumps(spec), arrays)
    ids = rng.integers(0, 11, size=(2, 5))
    got = plan.run([ids.astype(F32)])
    want = run_reference(spec, arrays, [ids])
    for g, w in zip(got, want):
        assert_close(g, w)


def test_read_before_write_and_in_place_rules(rng):
    # matmul reading a buffer nothing wrote
    spec = make_spec([[2, 3], [3, 2], [2, 2]], [0], [2], [
        {"op": "matmul", "a": 0, "b": 1, "out": 2, "transpose_b": False, "scale": 1}])
    with pytest.raises(SpecError, match=r"spec\.ops\[0\]\.b = 1 reads a buffer that no input or earlier op writes"):
        validate(spec, {})
    with pytest.raises(ValueError, match=r"reads buffer 1 before any op writes it"):
        _C.Plan(json.dumps(spec), {})
    # out aliasing an input of matmul through an alias buffer
    spec = make_spec([[2, 2], [2, 2], {"shape": [4], "alias_of": 1}, {"shape": [2, 2], "alias_of": 0}], [0, 1], [3], [
        {"op": "matmul", "a": 0, "b": 1, "out": 3, "transpose_b": False, "scale": 1}])
    with pytest.raises(SpecError, match=r"spec\.ops\[0\]: out must not share storage with a"):
        validate(spec, {})
    with pytest.raises(ValueError, match=r"must not share storage"):
        _C.Plan(json.dumps(spec), {})
    # elementwise ops may: affine into an alias of its input (same shape, as affine requires)
    spec = make_spec([[2, 2], {"shape": [2, 2], "alias_of": 0}], [0], [1], [
        {"op": "affine", "in": 0, "out": 1, "scale": -1, "shift": 0}])
    x = randn(rng, 3, 2, 2)
    (got,) = check(spec, {}, [x])
    np.testing.assert_array_equal(got, -x)
    spec["buffers"][1]["shape"] = [4]
    with pytest.raises(SpecError, match=r"spec\.ops\[0\]: output buffer 1 must have shape \(2, 2\), got \(4,\)"):
        validate(spec, {})


def test_heads_first_ignores_heads_and_number_types(rng):
    # heads is ignored for heads_first (producers write 1); scale may be an int or a numpy float
    spec = make_spec([[3, 4], [3, 4], [3, 4], [3, 4]], [0, 1, 2], [3], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "out": 3, "layout": "heads_first", "heads": 1, "scale": 2,
         "causal": False}])
    xs = [randn(rng, 2, 3, 4) for _ in range(3)]
    (base,) = check(spec, {}, xs)
    spec["ops"][0]["scale"] = np.float64(2.0)
    assert validate(spec, {}).spec["ops"][0]["scale"] == 2.0
    spec["ops"][0]["scale"] = np.float32(2.0)  # not JSON-serialisable as such: canonicalised to float
    np.testing.assert_array_equal(Executable.from_spec(spec, {}).run(*xs), base)
    assert_close(base, torch_attention(*xs, 2.0, False))
    spec["ops"][0]["heads"] = 3  # ignored for heads_first, even though 3 does not divide D = 4
    spec["ops"][0]["scale"] = 2
    np.testing.assert_array_equal(Executable.from_spec(spec, {}).run(*xs), base)


# --- dense conv2d (im2col panels + GEMM) ----------------------------------------------------------


def dense_conv_spec(cin, cout, k, stride, pad, dil, groups, hw, bias=True, act=None):
    h, w = hw
    oh = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    op = {"op": "conv2d", "format": "dense", "in": 0, "out": 1, "weight": "c", "in_channels": cin,
          "out_channels": cout, "kernel": list(k), "stride": list(stride), "padding": list(pad),
          "dilation": list(dil), "groups": groups}
    if act:
        op["activation"] = act
    return make_spec([(cin, h, w), (cout, oh, ow)], [0], [1], [op])


# (in, out, kernel, stride, padding, dilation, groups, input H x W): odd sizes, rows shorter and
# longer than the 16-pixel panel and than 12 (where panels switch from whole rows to spans),
# strides, dilation, groups, depthwise, 1x1, a 7x7 stem.
DENSE_CONV_CASES = [
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, (7, 9)),
    (4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, (11, 10)),
    (6, 6, (3, 3), (1, 1), (2, 2), (2, 2), 6, (9, 9)),
    (5, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, (5, 3)),
    (3, 8, (7, 7), (2, 2), (3, 3), (1, 1), 1, (33, 33)),
    (2, 13, (3, 1), (1, 2), (1, 0), (1, 1), 1, (12, 35)),
    (8, 4, (2, 3), (3, 1), (0, 1), (1, 2), 2, (17, 16)),
]


@pytest.mark.parametrize("case", DENSE_CONV_CASES)
@pytest.mark.parametrize("batch", BATCHES)
def test_dense_conv(rng, case, batch):
    cin, cout, k, stride, pad, dil, groups, hw = case
    spec = dense_conv_spec(cin, cout, k, stride, pad, dil, groups, hw, act="relu" if batch == 1 else None)
    arrays = {"c.weight": randn(rng, cout, cin // groups, *k), "c.bias": randn(rng, cout)}
    x = randn(rng, batch, cin, *hw)
    got = check(spec, arrays, [x])[0]
    ref = F.conv2d(torch64(x), torch64(arrays["c.weight"]), torch64(arrays["c.bias"]), stride, pad, dil, groups)
    assert_close(got, (ref.clamp(min=0) if batch == 1 else ref).numpy())


def test_dense_conv_without_bias_threads_and_every_simd_path(rng, simd_path):
    spec = dense_conv_spec(16, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1, (20, 19))
    arrays = {"c.weight": randn(rng, 24, 16, 3, 3)}
    x = randn(rng, 2, 16, 20, 19)
    ref = F.conv2d(torch64(x), torch64(arrays["c.weight"]), None, 1, 1).numpy()
    for threads in (1, 2, 3):
        assert_close(check(spec, arrays, [x], n_threads=threads)[0], ref)


@pytest.mark.parametrize("mutate, match", [
    (lambda s, a: a.update({"c.weight": a["c.weight"][:, :, :2]}), r"c\.weight.*must have shape"),
    (lambda s, a: a.update({"c.weight": a["c.weight"].astype(np.float64)}), r"c\.weight.*float32"),
    (lambda s, a: a.update({"c.weight": a["c.weight"].reshape(4, -1)}), r"c\.weight.*4-D"),
    (lambda s, a: a.pop("c.weight"), r"c\.weight.*missing"),
    (lambda s, a: a.update({"c.values": np.ones(3, F32)}), r"c\.values.*belongs to a sparse conv2d"),
    (lambda s, a: s["ops"][0].update({"format": "im2col"}), r"format must be 'sparse', 'pattern', 'depthwise' or 'dense'"),
])
def test_dense_conv_bad_specs(rng, mutate, match):
    spec = dense_conv_spec(2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, (5, 5))
    arrays = {"c.weight": randn(rng, 4, 2, 3, 3)}
    Executable.from_spec(spec, arrays)
    mutate(spec, arrays)
    with pytest.raises((SpecError, TypeError), match=match):
        Executable.from_spec(spec, arrays)
    if "belongs to" not in match:  # the native plan has its own checks (it ignores stray arrays)
        with pytest.raises((ValueError, TypeError)):
            _native._C.Plan(json.dumps(spec), arrays)


# --- conv2d with a residual (a ResNet shortcut fused into the convolution) -------------------------


def conv_residual_spec(cin, cout, k, stride, pad, hw, fmt, act):
    spec = dense_conv_spec(cin, cout, k, stride, pad, (1, 1), 1, hw, act=act)
    out_shape = spec["buffers"][1]["shape"]
    spec["buffers"].append({"shape": out_shape})
    spec["buffers"][1], spec["buffers"][2] = spec["buffers"][2], spec["buffers"][1]  # residual is buffer 1
    spec["inputs"] = [0, 1]
    spec["outputs"] = [2]
    op = spec["ops"][0]
    op.update({"out": 2, "residual": 1})
    if fmt == "sparse":
        del op["format"]
    return spec


def conv_arrays(rng, cout, cin, k, fmt, sparsity=0.7):
    w = randn(rng, cout, cin, *k)
    w[rng.random(w.shape) < sparsity] = 0.0
    arrays = {"c.bias": randn(rng, cout)}
    if fmt == "dense":
        arrays["c.weight"] = w
    else:
        flat = w.reshape(cout, -1)
        arrays["c.row_ptr"] = np.concatenate([[0], np.cumsum((flat != 0).sum(axis=1))]).astype(np.int64)
        arrays["c.taps"] = np.nonzero(flat)[1].astype(np.int32)
        arrays["c.values"] = flat[flat != 0].astype(F32)
    return w, arrays


# 3x3 (grid + crop path), 1x1 stride 1 (the direct path that writes the output in place), strided
@pytest.mark.parametrize("cin, cout, k, stride, pad, hw", [
    (3, 5, (3, 3), (1, 1), (1, 1), (7, 9)), (6, 4, (1, 1), (1, 1), (0, 0), (4, 4)), (4, 6, (3, 3), (2, 2), (1, 1), (9, 8))])
@pytest.mark.parametrize("fmt", ["sparse", "dense"])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_conv_with_residual(rng, cin, cout, k, stride, pad, hw, fmt, act, batch):
    spec = conv_residual_spec(cin, cout, k, stride, pad, hw, fmt, act)
    w, arrays = conv_arrays(rng, cout, cin, k, fmt)
    x = randn(rng, batch, cin, *hw)
    r = randn(rng, batch, *spec["buffers"][1]["shape"])
    got = check(spec, arrays, [x, r])[0]
    y = F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), stride, pad) + torch64(r)
    y = {None: y, "relu": y.clamp(min=0), "gelu": F.gelu(y)}[act]
    assert_close(got, y.numpy())


# Images of several 128-pixel tiles whose edges fall inside grid rows, and enough output channels
# to split each tile into channel chunks: each task crops its own part of the grid, adding the
# residual (sparse_conv.cpp's finish), whether the threads share one image or take whole images.
@pytest.mark.parametrize("cin, cout, k, stride, pad, hw", [
    (5, 40, (3, 3), (1, 1), (1, 1), (21, 23)), (7, 24, (1, 1), (1, 1), (0, 0), (16, 24)),
    (4, 24, (3, 3), (2, 2), (1, 1), (33, 29)), (8, 24, (1, 1), (2, 2), (0, 0), (30, 27))])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_conv_with_residual_over_many_tiles(rng, cin, cout, k, stride, pad, hw, batch, n_threads):
    spec = conv_residual_spec(cin, cout, k, stride, pad, hw, "sparse", "relu")
    w, arrays = conv_arrays(rng, cout, cin, k, "sparse")
    x = randn(rng, batch, cin, *hw)
    r = randn(rng, batch, *spec["buffers"][1]["shape"])
    got = check(spec, arrays, [x, r], n_threads=n_threads)[0]
    y = F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), stride, pad) + torch64(r)
    assert_close(got, y.clamp(min=0).numpy())


def test_conv_with_residual_and_a_non_finite_input_matches_dense_math(rng):
    spec = conv_residual_spec(3, 4, (3, 3), (1, 1), (1, 1), (6, 6), "sparse", "relu")
    w, arrays = conv_arrays(rng, 4, 3, (3, 3), "sparse")
    x = randn(rng, 2, 3, 6, 6)
    x[1, 0, 2, 3] = np.inf  # dense math spreads it (0 * inf = NaN) to every output that reads it
    r = randn(rng, 2, 4, 6, 6)
    got = Executable.from_spec(spec, arrays).run(x, r)
    y = (F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), 1, 1) + torch64(r)).clamp(min=0).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(y))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(y))
    assert np.isnan(y).any() or np.isinf(y).any()
    finite = np.isfinite(y)
    assert_close(got[finite], y[finite])


# A 1x1 convolution of stride 2 reads one pixel in four: a NaN or an infinity elsewhere reaches no
# output, in torch or here (only the phase the kernel reads is repacked and checked).
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_strided_1x1_conv_ignores_non_finite_pixels_it_never_reads(rng, bad):
    spec = conv_residual_spec(5, 6, (1, 1), (2, 2), (0, 0), (9, 8), "sparse", None)
    w, arrays = conv_arrays(rng, 6, 5, (1, 1), "sparse", sparsity=0.5)
    x = randn(rng, 2, 5, 9, 8)
    x[1, 2, 3, 5] = bad  # odd row and column: outside every output's window
    x[0, 4, 1, 0] = bad
    r = randn(rng, 2, *spec["buffers"][1]["shape"])
    got = Executable.from_spec(spec, arrays).run(x, r)
    y = (F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), 2, 0) + torch64(r)).numpy()
    assert np.isfinite(y).all()
    assert_close(got, y)
    x[1, 2, 4, 6] = bad  # even row and column: read, so it spreads as in dense math
    got = Executable.from_spec(spec, arrays).run(x, r)
    y = (F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), 2, 0) + torch64(r)).numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(y))
    assert not np.isfinite(y).all()


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s["buffers"].__setitem__(1, {"shape": [4, 6, 5]}), r"residual.*must have the output's shape"),
    (lambda s: s["ops"][0].update({"residual": 2}), r"residual.*reads a buffer that no input or earlier op writes|"
                                                    r"out must not share storage with residual"),
    (lambda s: s["ops"][0].update({"residual": 9}), r"residual = 9 is not a buffer id"),
])
def test_conv_residual_bad_specs(rng, mutate, match):
    spec = conv_residual_spec(3, 4, (3, 3), (1, 1), (1, 1), (6, 6), "dense", None)
    _, arrays = conv_arrays(rng, 4, 3, (3, 3), "dense")
    Executable.from_spec(spec, arrays)
    mutate(spec)
    with pytest.raises(SpecError, match=match):
        Executable.from_spec(spec, arrays)
    with pytest.raises(ValueError):
        _native._C.Plan(json.dumps(spec), arrays)


# --- pooling (vectorised per SIMD path, planes split among threads) --------------------------------


@pytest.mark.parametrize("k, s, p", [((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 1), (0, 1)), ((3, 2), (3, 2), (1, 0)),
                                     ((1, 1), (1, 1), (0, 0)), ((5, 5), (3, 3), (2, 2))])
@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
def test_pooling_matches_torch(rng, k, s, p, kind, simd_path):
    c, h, w = 5, 13, 17
    oh, ow = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
    spec = make_spec([(c, h, w), (c, oh, ow)], [0], [1],
                     [{"op": kind, "in": 0, "out": 1, "kernel": list(k), "stride": list(s), "padding": list(p)}])
    x = randn(rng, 3, c, h, w)
    x[0, 1, 4, 5] = np.nan  # max pooling propagates NaN like torch
    got = Executable.from_spec(spec, {}).run(x, n_threads=2)
    pool = F.max_pool2d if kind == "maxpool2d" else F.avg_pool2d
    ref = pool(torch64(x), k, s, p).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    keep = ~np.isnan(ref)
    assert_close(got[keep], ref[keep])
    assert got.shape == (3, c, oh, ow)


# --- conv2d format "pattern": the sparse arrays, run by the pattern kernel -----------------------


def pattern_conv_spec(cin, cout, hw, n_patterns, rng, k=(3, 3)):
    spec = dense_conv_spec(cin, cout, k, (1, 1), (k[0] // 2, k[1] // 2), (1, 1), 1, hw)
    spec["ops"][0]["format"] = "pattern"
    masks = rng.random((n_patterns, k[0] * k[1])) < 0.5
    masks[:, 0] = True  # no empty pattern
    choice = rng.integers(0, n_patterns, (cout, cin))
    w = randn(rng, cout, cin, k[0] * k[1]) * masks[choice]
    flat = w.reshape(cout, -1)
    arrays = {"c.row_ptr": np.concatenate([[0], np.cumsum((flat != 0).sum(axis=1))]).astype(np.int64),
              "c.taps": np.nonzero(flat)[1].astype(np.int32), "c.values": flat[flat != 0].astype(F32),
              "c.bias": randn(rng, cout)}
    return spec, arrays, w.reshape(cout, cin, *k)


@pytest.mark.parametrize("n_patterns", [1, 4, 64])
def test_pattern_conv(rng, n_patterns):
    spec, arrays, w = pattern_conv_spec(12, 16, (9, 11), n_patterns, rng)
    x = randn(rng, 2, 12, 9, 11)
    exe = Executable.from_spec(spec, arrays)
    assert exe.layer_table()[0]["format"] == "pattern-conv"
    got = check(spec, arrays, [x])[0]
    assert_close(got, F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), 1, 1).numpy())


def test_pattern_conv_refuses_too_many_patterns_and_large_kernels(rng):
    spec, arrays, _ = pattern_conv_spec(16, 16, (6, 6), 200, rng)  # 256 kernels, ~200 patterns
    with pytest.raises(SpecError, match=r"at most 64 distinct kernel patterns, the weight has \d+"):
        Executable.from_spec(spec, arrays)
    with pytest.raises(ValueError, match="patterns"):
        _native._C.Plan(json.dumps(spec), arrays)
    spec, arrays, _ = pattern_conv_spec(2, 2, (12, 12), 2, rng, k=(9, 9))
    with pytest.raises(SpecError, match="at most 64 taps"):
        Executable.from_spec(spec, arrays)
    with pytest.raises(ValueError, match="64 taps"):
        _native._C.Plan(json.dumps(spec), arrays)


# --- constant: one sample's values written into every sample ---------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_constant_op(rng, batch):
    spec = make_spec([(2, 3), (2, 3), (2, 3)], [0], [2], [
        {"op": "constant", "out": 1, "weight": "p"},
        {"op": "mul", "a": 0, "b": 1, "out": 2, "activation": "relu"}])
    arrays = {"p.value": randn(rng, 6)}
    x = randn(rng, batch, 2, 3)
    got = check(spec, arrays, [x])[0]
    assert_close(got, np.maximum(x * arrays["p.value"].reshape(2, 3), 0))
    assert Executable.from_spec(spec, arrays).dense_nbytes == 24


def test_constant_op_bad_specs(rng):
    spec = make_spec([(2, 3), (2, 3)], [0], [1], [{"op": "constant", "out": 1, "weight": "p"}])
    with pytest.raises(SpecError, match=r"must hold one sample of out \(2, 3\): 6 values, got 5"):
        Executable.from_spec(spec, {"p.value": randn(rng, 5)})
    with pytest.raises(ValueError, match="one sample"):
        _native._C.Plan(json.dumps(spec), {"p.value": randn(rng, 5)})
    with pytest.raises(SpecError, match=r"p\.value.*missing"):
        Executable.from_spec(spec, {})


# --- slice ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis, start, step, n", [
    ((7,), 0, 0, 1, 7), ((7,), 0, 2, 3, 2), ((4, 9), 1, 8, 1, 1), ((4, 9), 0, 1, 2, 2), ((3, 5, 6), 2, 1, 2, 3),
    ((3, 5, 6), 1, 0, 4, 2)])
@pytest.mark.parametrize("batch", BATCHES)
def test_slice(rng, shape, axis, start, step, n, batch):
    out = list(shape)
    out[axis] = n
    spec = make_spec([shape, out], [0], [1], [{"op": "slice", "in": 0, "out": 1, "axis": axis, "start": start,
                                                "step": step}])
    x = randn(rng, batch, *shape)
    got = check(spec, {}, [x])[0]
    index = [slice(None)] * (len(shape) + 1)
    index[axis + 1] = slice(start, start + (n - 1) * step + 1, step)
    np.testing.assert_array_equal(got, x[tuple(index)])


@pytest.mark.parametrize("edit, match", [
    ({"start": 5}, r"leave the input's 9 entries"), ({"step": 0}, r"step"), ({"axis": 2}, r"axis = 2 is out of range"),
    ({"start": -1}, r"start"),
])
def test_slice_bad_specs(edit, match):
    spec = make_spec([(4, 9), (4, 3)], [0], [1], [{"op": "slice", "in": 0, "out": 1, "axis": 1, "start": 2, "step": 3}])
    Executable.from_spec(spec, {})
    spec["ops"][0].update(edit)
    with pytest.raises(SpecError, match=match):
        Executable.from_spec(spec, {})
    with pytest.raises(ValueError):
        _native._C.Plan(json.dumps(spec), {})


# --- conv2d format "depthwise" -------------------------------------------------------------------


@pytest.mark.parametrize("c, k, stride, pad, dil, hw", [
    (3, (3, 3), (1, 1), (1, 1), (1, 1), (7, 9)), (5, (3, 3), (2, 2), (1, 1), (1, 1), (20, 37)),
    (4, (5, 5), (1, 1), (2, 2), (2, 2), (13, 11)), (2, (3, 1), (3, 2), (0, 0), (1, 1), (10, 33)),
    (6, (1, 1), (1, 1), (0, 0), (1, 1), (4, 17)), (3, (7, 7), (2, 2), (3, 3), (1, 1), (40, 41))])
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_depthwise_conv(rng, c, k, stride, pad, dil, hw, sparsity, simd_path):
    spec = dense_conv_spec(c, c, k, stride, pad, dil, c, hw, act="relu6")
    spec["ops"][0]["format"] = "depthwise"
    w, arrays = conv_arrays(rng, c, 1, k, "sparse", sparsity=sparsity)
    for batch in (0, 1, 3):
        x = randn(rng, batch, c, *hw)
        got = check(spec, arrays, [x], n_threads=2)[0]
        ref = F.conv2d(torch64(x), torch64(w), torch64(arrays["c.bias"]), stride, pad, dil, c).clamp(0, 6)
        assert_close(got, ref.numpy())
    assert Executable.from_spec(spec, arrays).layer_table()[0]["format"] == "depthwise-conv"


def test_depthwise_format_needs_a_depthwise_layer(rng):
    spec = dense_conv_spec(4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, (6, 6))  # groups 2: not depthwise
    spec["ops"][0]["format"] = "depthwise"
    _, arrays = conv_arrays(rng, 4, 2, (3, 3), "sparse")
    with pytest.raises(SpecError, match="format 'depthwise' needs groups == in_channels == out_channels"):
        Executable.from_spec(spec, arrays)
    with pytest.raises(ValueError, match="depthwise"):
        _native._C.Plan(json.dumps(spec), arrays)


# --- attention key padding masks -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sequence_first", "heads_first"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_mask(rng, layout, causal):
    L, S, H, D = 5, 7, 2, 4
    if layout == "sequence_first":
        shapes = [(L, H * D), (S, H * D), (S, H * D)]
        out = (L, H * D)
    else:
        shapes = [(H, L, D), (H, S, D), (H, S, D)]
        out = (H, L, D)
    spec = make_spec(shapes + [(S,), out], [0, 1, 2, 3], [4], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "key_mask": 3, "out": 4, "layout": layout, "heads": H,
         "scale": 0.5, "causal": causal}], input_dtypes=["float32", "float32", "float32", "bool"])
    q, k, v = (randn(rng, 3, *s) for s in shapes)
    mask = np.zeros((3, S), bool)
    mask[1, 4:] = True
    mask[2, 1:] = True  # only key 0 left
    got = Executable.from_spec(spec, {}).run(q, k, v, mask)
    ref = run_reference(spec, {}, [q, k, v, mask.astype(F32)])[0]
    assert_close(got, ref)
    unmasked = Executable.from_spec(spec, {}).run(q, k, v, np.zeros((3, S), bool))
    assert np.array_equal(got[0], unmasked[0]) and not np.allclose(got[2], unmasked[2])
    # every key of a sample masked: NaN, as torch gives
    all_masked = np.zeros((3, S), bool)
    all_masked[0] = True
    got = Executable.from_spec(spec, {}).run(q, k, v, all_masked)
    assert np.isnan(got[0]).all() and not np.isnan(got[1:]).any()


def test_attention_key_mask_checks(rng):
    spec = make_spec([(5, 8), (7, 8), (7, 8), (6,), (5, 8)], [0, 1, 2, 3], [4], [
        {"op": "attention", "q": 0, "k": 1, "v": 2, "key_mask": 3, "out": 4, "layout": "sequence_first",
         "heads": 2, "scale": 0.5, "causal": False}], input_dtypes=["float32", "float32", "float32", "bool"])
    with pytest.raises(SpecError, match=r"key_mask: buffer 3 \(6,\) must have one entry per key: \(7,\)"):
        Executable.from_spec(spec, {})
    with pytest.raises(ValueError, match="key_mask"):
        _native._C.Plan(json.dumps(spec), {})
    spec["buffers"][3]["shape"] = [7]
    exe = Executable.from_spec(spec, {})
    args = [randn(rng, 1, 5, 8), randn(rng, 1, 7, 8), randn(rng, 1, 7, 8)]
    with pytest.raises(TypeError, match=r"input 3 must be a bool \(or integer 0/1\) mask, got float32"):
        exe.run(*args, np.zeros((1, 7), F32))


@pytest.mark.parametrize("kind", ["relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish"])
def test_activations_keep_nan_like_torch(kind, simd_path):
    spec = make_spec([(11,), (11,)], [0], [1], [{"op": "activation", "kind": kind, "in": 0, "out": 1}])
    x = np.array([[np.nan, 1.0, -1.0, 0.0, 7.0, -7.0, 3.0, -3.0, 0.5, np.nan, 100.0]], F32)
    got = Executable.from_spec(spec, {}).run(x)
    fn = {"relu": torch.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
          "tanh": torch.tanh, "hardswish": F.hardswish}[kind]
    ref = fn(torch64(x)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))  # relu6's clamp used to turn NaN into 6
    assert_close(got[~np.isnan(ref)], ref[~np.isnan(ref)])
