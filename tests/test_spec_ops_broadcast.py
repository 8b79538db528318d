"""The spec's broadcasting and shape ops (add/sub/mul/div with numpy broadcasting, the newer
activations, attention masks, reduce, pad, expand): the native plan against the numpy reference
and both against torch, on odd sizes, batch 0/1/3, 1 vs 2 threads and both SIMD paths, NaN/Inf
as torch gives them, and bad specs refused naming the field in Python and in the native plan."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseprune import _native
from sparseprune.runtime import Executable, SpecError, run_reference, validate
from spec_helpers import assert_close, check, make_spec, randn, run_native, torch64  # tests/spec_helpers.py

_C = _native._C
F32 = np.float32
BATCHES = (0, 1, 3)


def refused(spec, arrays, match, native_match):
    """SpecError naming the problem from validate(), and a ValueError from the native plan built
    directly from the JSON (no Python validation in front of it)."""
    with pytest.raises(SpecError, match=match):
        validate(spec, arrays)
    with pytest.raises(ValueError, match=native_match):
        _C.Plan(json.dumps(spec), arrays)


@pytest.fixture
def isa(simd_path):
    """Every SIMD path this CPU can run, in turn (tests/conftest.py)."""
    return simd_path


# --- broadcasting binary ops -------------------------------------------------------------------------

BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
BROADCAST_CASES = [  # (a, b): per-sample shapes
    ((5, 7), (5, 7)),                      # equal: one contiguous run
    ((3, 5, 7), (3, 1, 1)),                # squeeze-excitation scale
    ((3, 1, 1), (3, 5, 7)),                # ... either side
    ((9, 17), (17,)),                      # layer scale / bias over the last dim
    ((17,), (9, 17)),
    ((2, 7, 7), (1, 1, 7)),                # an attention mask row
    ((4, 1, 6), (1, 5, 1)),                # both sides stretch
    ((2, 3, 1, 5), (3, 4, 1)),             # ranks differ, size-1 in the middle
    ((1,), (6, 5)),                        # one value
    ((1, 1), (1,)),                        # one element in all
    ((33, 2), (33, 1)),                    # a column
    ((2, 1, 3, 1, 9), (1, 4, 1, 5, 1)),    # alternating
]


def binary_spec(op, sa, sb, act=None):
    out = np.broadcast_shapes(sa, sb)
    o = {"op": op, "a": 0, "b": 1, "out": 2}
    if act:
        o["activation"] = act
    return make_spec([sa, sb, out], [0, 1], [2], [o]), out


@pytest.mark.parametrize("sa, sb", BROADCAST_CASES)
@pytest.mark.parametrize("op", list(BINARY))
def test_broadcast_binary_matches_reference_and_torch(rng, op, sa, sb):
    spec, out = binary_spec(op, sa, sb)
    for batch in BATCHES:
        a, b = randn(rng, batch, *sa), randn(rng, batch, *sb)
        (got,) = check(spec, {}, [a, b])
        # torch broadcasts the batched tensors with the per-sample dims right-aligned
        ta = torch64(a).reshape((batch,) + (1,) * (len(out) - len(sa)) + sa)
        tb = torch64(b).reshape((batch,) + (1,) * (len(out) - len(sb)) + sb)
        assert_close(got, BINARY[op](ta, tb).numpy())


@pytest.mark.parametrize("sa, sb", [((3, 5, 7), (3, 1, 1)), ((9, 17), (17,)), ((8, 40, 40), (1, 1, 40)),
                                    ((70000,), (70000,)), ((3, 70000), (3, 1)), ((2, 1, 3, 1, 9), (1, 4, 1, 5, 1))])
@pytest.mark.parametrize("act", [None, "gelu_tanh", "relu"])
def test_broadcast_binary_threads_and_simd_paths(rng, sa, sb, act, isa):
    # Long rows and few of them split inside a row across threads: the same values on 1 and 2 threads.
    spec, _ = binary_spec("mul", sa, sb, act)
    a, b = randn(rng, 3, *sa), randn(rng, 3, *sb)
    one = check(spec, {}, [a, b], n_threads=1)[0]
    two = run_native(spec, {}, [a, b], n_threads=2)[0]
    np.testing.assert_array_equal(one, two)


def test_binary_nan_inf_and_division_by_zero_as_torch(rng, isa):
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -2.5, 3e38, -3e38], F32)
    a = np.tile(vals, (9, 1)).reshape(1, 9, 9)          # a[i, j] = vals[j]
    b = vals.reshape(1, 9, 1)                           # b[i] = vals[i]
    for op, fn in BINARY.items():
        spec, _ = binary_spec(op, (9, 9), (9, 1))
        (got,) = check(spec, {}, [a, b])
        want = fn(torch.from_numpy(a), torch.from_numpy(b)).numpy()  # float32, as the plan computes
        np.testing.assert_array_equal(got, want)  # inf - inf, 0 / 0, x / 0, overflow: bit for bit


def test_binary_in_place_on_the_full_sized_operand(rng):
    # out = a (same buffer), b broadcast: allowed; also through an alias of a's storage.
    spec = make_spec([[4, 6], [6], {"shape": [24], "alias_of": 0}], [0, 1], [2], [
        {"op": "sub", "a": 0, "b": 1, "out": 0},
        {"op": "div", "a": 2, "b": 2, "out": 2, "activation": "sqrt"},
    ])
    a, b = randn(rng, 3, 4, 6) + 5, randn(rng, 3, 6)
    (got,) = check(spec, {}, [a, b])
    d = a.astype(np.float64) - b[:, None, :]
    assert_close(got, np.sqrt(d / d).reshape(3, 24))


BINARY_BAD = [
    # (a, b, out, message, native message)
    ((3, 4), (5,), (3, 4), r"a \(3, 4\) and b \(5,\) do not broadcast", r"\(3, 4\) and \(5\) do not broadcast"),
    ((3, 1), (1, 4), (3, 1), r"output buffer 2 must have the broadcast shape \(3, 4\), got \(3, 1\)",
     r"broadcast shape \(3, 4\), got \(3, 1\)"),
    ((4,), (3, 4), (4,), r"must have the broadcast shape \(3, 4\)", r"broadcast shape \(3, 4\)"),
    ((3, 4), (4,), (1, 3, 4), r"must have the broadcast shape \(3, 4\), got \(1, 3, 4\)",
     r"broadcast shape \(3, 4\), got \(1, 3, 4\)"),
]


@pytest.mark.parametrize("sa, sb, so, match, native", BINARY_BAD)
@pytest.mark.parametrize("op", list(BINARY))
def test_binary_bad_shapes(op, sa, sb, so, match, native):
    spec = make_spec([sa, sb, so], [0, 1], [2], [{"op": op, "a": 0, "b": 1, "out": 2}])
    refused(spec, {}, match, native)


def test_binary_in_place_through_an_alias_of_another_shape(rng):
    # out (1, 12) is b's storage under another shape; a (12,) broadcasts to (1, 12) without stretching.
    spec = make_spec([[12], [3, 4], {"shape": [1, 12], "alias_of": 1}], [0, 1], [2], [
        {"op": "mul", "a": 0, "b": 2, "out": 2}])
    a, b = randn(rng, 3, 12), randn(rng, 3, 3, 4)
    (got,) = check(spec, {}, [a, b])
    assert_close(got, (a.astype(np.float64) * b.reshape(3, 12)).reshape(3, 1, 12))


# --- activations ------------------------------------------------------------------------------------

NEW_ACTIVATIONS = {
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "hardsigmoid": F.hardsigmoid,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "exp": torch.exp,
}
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 2.9, -3.1, 0.5, 7.0, -7.0, 50.0, -50.0,
            87.5, 88.5, 89.0, -87.1, -87.5, -100.0, -104.0, 1e20, -1e20, 1e-30, 100.0, 5e-39]


@pytest.mark.parametrize("kind", list(NEW_ACTIVATIONS))
def test_new_activations_special_values_as_torch(kind, isa):
    x = np.array([SPECIALS], F32)
    spec = make_spec([(x.shape[1],), (x.shape[1],)], [0], [1], [{"op": "activation", "kind": kind, "in": 0, "out": 1}])
    (got,) = check(spec, {}, [x])
    with np.errstate(over="ignore"):  # torch in float64 on the same float32 inputs, rounded to float32
        want = NEW_ACTIVATIONS[kind](torch64(x)).numpy().astype(F32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    np.testing.assert_array_equal(np.signbit(got[want == 0]), np.signbit(want[want == 0]))  # -0 where torch has it
    ok = np.isfinite(want)
    # atol: float64 torch loses gelu_tanh's tail to cancellation in 1 + tanh(u) (x = -7: 1e-17 of 2e-15)
    np.testing.assert_allclose(got[ok], want[ok], rtol=3e-6, atol=1e-12)


@pytest.mark.parametrize("kind", list(NEW_ACTIVATIONS))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 70001])
def test_new_activations_on_random_values(rng, kind, n, isa):
    spec = make_spec([(n,), (n,)], [0], [1], [{"op": "activation", "kind": kind, "in": 0, "out": 1}])
    x = randn(rng, 3, n) * 4
    if kind in ("sqrt", "rsqrt"):
        x = np.abs(x)
    one = check(spec, {}, [x], n_threads=1)[0]
    np.testing.assert_array_equal(one, run_native(spec, {}, [x], n_threads=2)[0])
    assert_close(one, NEW_ACTIVATIONS[kind](torch64(x)).numpy(), rtol=2e-6)
    assert_close(run_native(spec, {}, [x[:0]])[0], np.zeros((0, n), F32))


@pytest.mark.parametrize("kind", list(NEW_ACTIVATIONS))
def test_new_activations_fuse_into_ops(rng, kind):
    # as a fused "activation" of linear, affine and a broadcasting add
    w = randn(rng, 5, 7)
    spec = make_spec([[4, 7], [4, 5], [5], [4, 5], [4, 5]], [0, 2], [3, 4], [
        {"op": "linear", "in": 0, "out": 1, "weight": "fc", "format": "dense", "block": [1, 1], "rows": 5,
         "cols": 7, "activation": kind},
        {"op": "add", "a": 1, "b": 2, "out": 3, "activation": kind},
        {"op": "affine", "in": 3, "out": 4, "scale": 0.5, "shift": 2.0, "activation": kind},
    ])
    x, c = randn(rng, 3, 4, 7), np.abs(randn(rng, 3, 5)) + 1
    y1, y2 = check(spec, {"fc.weight": w}, [x, c])
    fn = NEW_ACTIVATIONS[kind]
    h = fn(torch64(x) @ torch64(w).T)
    h = fn(h + torch64(c)[:, None, :])
    assert_close(y1, h.numpy())
    assert_close(y2, fn(h * 0.5 + 2.0).numpy())


def test_unknown_activation_is_refused():
    spec = make_spec([[3], [3]], [0], [1], [{"op": "activation", "kind": "gelu_erf", "in": 0, "out": 1}])
    refused(spec, {}, r"spec\.ops\[0\]\.kind must be one of", "unknown activation")
    spec = make_spec([[3], [3], [3]], [0, 1], [2], [{"op": "div", "a": 0, "b": 1, "out": 2, "activation": "log"}])
    refused(spec, {}, r"spec\.ops\[0\]\.activation must be null or one of", "unknown activation")


# --- attention masks ---------------------------------------------------------------------------------


def attention_spec(layout, heads, L, S, D, Dv, mask_shape, mask_kind, causal=False, key_mask=False):
    if layout == "sequence_first":
        shapes = [(L, heads * D), (S, heads * D), (S, heads * Dv)]
        out = (L, heads * Dv)
    else:
        shapes = [(heads, L, D), (heads, S, D), (heads, S, Dv)]
        out = (heads, L, Dv)
    buffers = shapes + [mask_shape] + ([(S,)] if key_mask else []) + [out]
    op = {"op": "attention", "q": 0, "k": 1, "v": 2, "out": len(buffers) - 1, "layout": layout, "heads": heads,
          "scale": 1.0 / np.sqrt(D), "causal": causal, "mask": 3, "mask_kind": mask_kind}
    if key_mask:
        op["key_mask"] = 4
    dtypes = ["float32"] * 4 + (["bool"] if key_mask else [])
    return make_spec(buffers, list(range(len(buffers) - 1)), [len(buffers) - 1], [op], input_dtypes=dtypes), shapes


def to_heads(x, layout, heads):
    """(batch, rows, heads * d) -> (batch, heads, rows, d) for sequence_first; heads_first as is."""
    if layout == "heads_first":
        return x
    n, rows, e = x.shape
    return x.reshape(n, rows, heads, e // heads).transpose(0, 2, 1, 3)


def from_heads(y, layout):
    if layout == "heads_first":
        return y
    n, h, rows, d = y.shape
    return y.transpose(0, 2, 1, 3).reshape(n, rows, h * d)


def torch_sdpa(q, k, v, mask, mask_kind, layout, heads, scale):
    """torch's SDPA in float64 with a mask of per-sample shape right-aligned to [heads, L, S]."""
    tq, tk, tv = (torch64(to_heads(t, layout, heads)) for t in (q, k, v))
    m = torch.from_numpy(mask.reshape((mask.shape[0],) + (1,) * (4 - mask.ndim) + mask.shape[1:]))
    m = m != 0 if mask_kind == "bool" else m.double()
    return from_heads(F.scaled_dot_product_attention(tq, tk, tv, attn_mask=m, scale=scale).numpy(), layout)


MASK_SHAPES = ["k", "qk", "11k", "1qk", "hqk", "1q1"]


def mask_shape(code, heads, L, S):
    return {"k": (S,), "qk": (L, S), "11k": (1, 1, S), "1qk": (1, L, S), "hqk": (heads, L, S), "1q1": (1, L, 1)}[code]


def random_mask(rng, kind, shape):
    if kind == "bool":
        m = rng.random(shape) < 0.7
        return m.astype(F32)
    m = np.where(rng.random(shape) < 0.3, np.finfo(F32).min, randn(rng, *shape)).astype(F32)
    return m


@pytest.mark.parametrize("layout", ["sequence_first", "heads_first"])
@pytest.mark.parametrize("code", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("heads, L, S, D", [(2, 5, 7, 4), (3, 1, 17, 8), (1, 70, 9, 3)])
def test_attention_mask_matches_torch_sdpa(rng, layout, code, kind, heads, L, S, D):
    ms = mask_shape(code, heads, L, S)
    spec, shapes = attention_spec(layout, heads, L, S, D, D + 1, ms, kind)
    for batch in BATCHES:
        q, k, v = (randn(rng, batch, *s) for s in shapes)
        mask = random_mask(rng, kind, (batch,) + ms)
        (got,) = check(spec, {}, [q, k, v, mask])
        if batch:
            assert_close(got, torch_sdpa(q, k, v, mask, kind, layout, heads, 1.0 / np.sqrt(D)))


@pytest.mark.parametrize("layout", ["sequence_first", "heads_first"])
def test_attention_padding_and_causal_padding_masks_like_transformers(rng, layout):
    # a [N, 1, 1, S] padding mask and a [N, 1, S, S] causal + padding mask, bool and additive
    # (finfo.min where masked, as transformers' eager masks); sample 2 is all padding.
    N, H, S, D = 3, 2, 6, 4
    pad = np.ones((N, S), bool)
    pad[1, 4:] = False
    pad[2, :] = False
    causal = np.tril(np.ones((S, S), bool))
    for allowed, ms in [(pad[:, None, :], (1, 1, S)), (causal[None] & pad[:, None, :], (1, S, S))]:
        allowed = allowed.reshape((N,) + ms)
        for kind in ("bool", "additive"):
            mask = allowed.astype(F32) if kind == "bool" else np.where(allowed, 0, np.finfo(F32).min).astype(F32)
            spec, shapes = attention_spec(layout, H, S, S, D, D, ms, kind)
            q, k, v = (randn(rng, N, *s) for s in shapes)
            (got,) = check(spec, {}, [q, k, v, mask])
            want = torch_sdpa(q, k, v, mask, kind, layout, H, 0.5)
            assert_close(got, want)
            if kind == "bool":  # no key for any query of sample 2: zeros, as torch's SDPA gives
                assert not np.isnan(want).any() and (got[2] == 0).all()
            else:  # finfo.min everywhere: uniform weights over the keys, also as torch
                assert np.isfinite(got).all() and not (got[2] == 0).all()


def test_attention_fully_masked_rows_give_zeros_and_minus_inf_additive_too(rng):
    H, L, S, D = 2, 4, 5, 3
    for kind, off in (("bool", 0.0), ("additive", -np.inf)):
        spec, shapes = attention_spec("heads_first", H, L, S, D, D, (H, L, S), kind)
        q, k, v = (randn(rng, 2, *s) for s in shapes)
        mask = np.full((2, H, L, S), 1.0 if kind == "bool" else 0.0, F32)
        mask[0, 1, 2, :] = off  # one row of one head
        mask[1, :, :, 1:] = off  # only key 0 left: all weight on it
        (got,) = check(spec, {}, [q, k, v, mask])
        assert_close(got, torch_sdpa(q, k, v, mask, kind, "heads_first", H, 1.0 / np.sqrt(D)))
        assert (got[0, 1, 2] == 0).all() and np.isfinite(got).all()
        assert_close(got[1], np.broadcast_to(v[1, :, :1, :], (H, L, D)))


@pytest.mark.parametrize("layout", ["sequence_first", "heads_first"])
def test_attention_mask_with_causal_and_key_mask(rng, layout):
    # all three: the reference applies them in its own way; a fully masked row gives zeros
    H, L, S, D = 2, 6, 6, 4
    spec, shapes = attention_spec(layout, H, L, S, D, D, (1, L, S), "additive", causal=True, key_mask=True)
    q, k, v = (randn(rng, 3, *s) for s in shapes)
    mask = randn(rng, 3, 1, L, S)
    key_mask = np.zeros((3, S), bool)
    key_mask[1, 0] = True  # query 0 of sample 1 sees only key 0 (causal), which is padding
    got = Executable.from_spec(spec, {}).run(q, k, v, mask, key_mask)
    ref = run_reference(spec, {}, [q, k, v, mask, key_mask.astype(F32)])[0]
    assert_close(got, ref)
    row0 = got[1, 0] if layout == "sequence_first" else got[1, :, 0]
    assert (row0 == 0).all() and np.isfinite(got).all()
    tq, tk, tv = (torch64(to_heads(t, layout, H)) for t in (q, k, v))
    allowed = torch.from_numpy(np.tril(np.ones((L, S), bool))[None, None] & ~key_mask[:, None, None, :])
    m = torch.where(allowed, torch.from_numpy(mask).double(), -torch.inf)
    want = from_heads(F.scaled_dot_product_attention(tq, tk, tv, attn_mask=m, scale=0.5).numpy(), layout)
    assert_close(got, want)


def test_attention_mask_threads_and_simd_paths(rng, isa):
    spec, shapes = attention_spec("heads_first", 4, 70, 33, 16, 8, (4, 70, 33), "additive")
    q, k, v = (randn(rng, 5, *s) for s in shapes)
    mask = random_mask(rng, "additive", (5, 4, 70, 33))
    one = check(spec, {}, [q, k, v, mask], n_threads=1)[0]
    np.testing.assert_array_equal(one, run_native(spec, {}, [q, k, v, mask], n_threads=2)[0])


ATTENTION_MASK_BAD = [
    # (edit, python message, native message)
    (lambda o, b: o.pop("mask_kind"), r"mask and mask_kind come together, got only mask", "come together"),
    (lambda o, b: o.pop("mask"), r"mask and mask_kind come together, got only mask_kind", "come together"),
    (lambda o, b: o.update(mask_kind="float"), r"mask_kind must be one of \('bool', 'additive'\)", "mask_kind"),
    (lambda o, b: o.update(mask_kind=True), r"mask_kind must be one of", "mask_kind must be a string"),
    (lambda o, b: o.update(mask=9), r"ops\[0\]\.mask = 9 is not a buffer id", "mask is out of range|not a buffer"),
    (lambda o, b: b.__setitem__(3, {"shape": [6]}), r"mask: buffer 3 \(6,\) must broadcast to .* \(2, 5, 7\)",
     "mask .* must broadcast"),
    (lambda o, b: b.__setitem__(3, {"shape": [2, 1, 5, 7]}), r"mask: buffer 3 \(2, 1, 5, 7\) must broadcast",
     "must broadcast"),
    (lambda o, b: b.__setitem__(3, {"shape": [3, 5, 7]}), r"must broadcast", "must broadcast"),
    (lambda o, b: b.__setitem__(3, {"shape": [4, 7]}), r"must broadcast", "must broadcast"),
]


@pytest.mark.parametrize("edit, match, native", ATTENTION_MASK_BAD)
def test_attention_mask_bad_specs(rng, edit, match, native):
    spec, _ = attention_spec("sequence_first", 2, 5, 7, 4, 4, (1, 1, 7), "bool")
    validate(spec, {})
    edit(spec["ops"][0], spec["buffers"])
    refused(spec, {}, match, native)


def test_attention_mask_group_dims_all_or_nothing():
    # heads_first with two leading dims (2, 3): a mask over both or neither, not over one
    def spec_with(ms):
        buffers = [(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4), ms, (2, 3, 5, 4)]
        return make_spec(buffers, [0, 1, 2, 3], [4], [
            {"op": "attention", "q": 0, "k": 1, "v": 2, "mask": 3, "mask_kind": "bool", "out": 4,
             "layout": "heads_first", "heads": 1, "scale": 1.0, "causal": False}])
    for ok in [(2, 3, 5, 7), (1, 1, 5, 7), (5, 7), (7,), (2, 3, 1, 7)]:
        validate(spec_with(ok), {})
        _C.Plan(json.dumps(spec_with(ok)), {})
    for bad in [(3, 5, 7), (2, 1, 5, 7), (1, 3, 1, 7)]:
        refused(spec_with(bad), {}, "must broadcast", "must broadcast")


# --- reduce ------------------------------------------------------------------------------------------

REDUCE_CASES = [  # (per-sample shape, axes)
    ((9, 17), [1]),              # LayerNorm-style mean over the last dim
    ((5, 7, 9), [0]),            # over channels of [C, H, W] (ConvNeXt's channels-first norm)
    ((5, 7, 9), [1, 2]),         # global pooling as a mean
    ((33,), [0]),
    ((1, 1, 8), [0, 1]),         # only size-1 axes: a copy
    ((4, 1, 6), [1, 2]),
    ((2, 3, 4, 5), [0, 2]),      # two groups apart
    ((2, 3, 4, 5), [1, 3]),
    ((2, 3, 4, 5), [0, 1, 2, 3]),
    ((3, 40, 1, 50), [1, 3]),
    ((6, 5, 4), [0, 1]),
]


@pytest.mark.parametrize("shape, axes", REDUCE_CASES)
@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_reduce_matches_reference_and_torch(rng, shape, axes, kind):
    out = tuple(1 if d in axes else n for d, n in enumerate(shape))
    spec = make_spec([shape, out], [0], [1], [{"op": "reduce", "kind": kind, "in": 0, "out": 1, "axes": axes}])
    fn = torch.mean if kind == "mean" else torch.sum
    for batch in BATCHES:
        x = randn(rng, batch, *shape)
        (got,) = check(spec, {}, [x])
        if batch:
            assert_close(got, fn(torch64(x), dim=[a + 1 for a in axes], keepdim=True).numpy())


@pytest.mark.parametrize("shape, axes", [((768, 56, 56), [0]), ((197, 768), [1]), ((3, 64, 70000), [0]),
                                         ((96, 56, 56), [1, 2]), ((4, 30, 5, 300), [1, 3]), ((2, 70000), [0])])
def test_reduce_threads_and_simd_paths(rng, shape, axes, isa):
    out = tuple(1 if d in axes else n for d, n in enumerate(shape))
    spec = make_spec([shape, out], [0], [1], [{"op": "reduce", "kind": "mean", "in": 0, "out": 1, "axes": axes}])
    x = randn(rng, 2, *shape)
    one = check(spec, {}, [x], n_threads=1)[0]
    np.testing.assert_array_equal(one, run_native(spec, {}, [x], n_threads=2)[0])


def test_reduce_nan_and_inf_as_torch(rng, isa):
    for shape, axes, partner in [((4, 9), [1], 1), ((4, 9), [0], 9), ((4, 3, 9), [0, 2], 1)]:
        out = tuple(1 if d in axes else n for d, n in enumerate(shape))
        spec = make_spec([shape, out], [0], [1], [{"op": "reduce", "kind": "sum", "in": 0, "out": 1, "axes": axes}])
        x = randn(rng, 3, *shape)
        x.reshape(3, -1)[0, 5] = np.nan
        x.reshape(3, -1)[1, 2] = np.inf
        x.reshape(3, -1)[2, 0], x.reshape(3, -1)[2, partner] = np.inf, -np.inf  # one sum: inf - inf = NaN
        (got,) = check(spec, {}, [x])
        want = torch.sum(torch.from_numpy(x), dim=[a + 1 for a in axes], keepdim=True).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        assert np.isnan(got).sum() >= 2 and np.isinf(got).any()


REDUCE_BAD = [
    (dict(kind="max"), r"ops\[0\]\.kind must be one of \('mean', 'sum'\)", "kind must be 'mean' or 'sum'"),
    (dict(axes=[]), r"ops\[0\]\.axes must be a list of 1 to 3 ints", "1 to rank axes"),
    (dict(axes=2), r"ops\[0\]\.axes must be a list", "axes must be a list"),
    (dict(axes=[3]), r"ops\[0\]\.axes = \[3\] holds an axis out of range \[0, 3\)", "in range"),
    (dict(axes=[2, 1]), r"must be sorted and unique", "sorted, unique"),
    (dict(axes=[1, 1]), r"must be sorted and unique", "sorted, unique"),
    (dict(axes=[True]), r"ops\[0\]\.axes must be a list of 1 to 3 ints", "must hold ints"),
    (dict(axes=[0, 1]), r"output buffer 1 must have shape \(1, 1, 6\)", r"output must have shape \(1, 1, 6\)"),
]


@pytest.mark.parametrize("edit, match, native", REDUCE_BAD)
def test_reduce_bad_specs(edit, match, native):
    spec = make_spec([(4, 5, 6), (4, 1, 6)], [0], [1], [{"op": "reduce", "kind": "mean", "in": 0, "out": 1, "axes": [1]}])
    validate(spec, {})
    spec["ops"][0].update(edit)
    refused(spec, {}, match, native)


# --- pad ---------------------------------------------------------------------------------------------

PAD_CASES = [  # (per-sample shape, pads)
    ((3, 5, 7), [[0, 0], [0, 1], [0, 1]]),   # TF "same" padding: more after
    ((3, 5, 7), [[0, 0], [2, 2], [1, 3]]),
    ((7,), [[3, 0]]),
    ((4, 6), [[0, 0], [0, 0]]),              # nothing: a copy
    ((1, 1), [[1, 1], [2, 0]]),
    ((2, 3, 4, 5), [[1, 0], [0, 2], [1, 1], [0, 0]]),
]


@pytest.mark.parametrize("shape, pads", PAD_CASES)
@pytest.mark.parametrize("value", [0.0, -1.5])
def test_pad_matches_reference_and_torch(rng, shape, pads, value):
    out = tuple(n + b + a for n, (b, a) in zip(shape, pads))
    spec = make_spec([shape, out], [0], [1], [{"op": "pad", "in": 0, "out": 1, "pads": pads, "value": value}])
    torch_pad = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dim first
    for batch in BATCHES:
        x = randn(rng, batch, *shape)
        x.reshape(-1)[:1] = np.nan  # copied as is
        (got,) = check(spec, {}, [x])
        np.testing.assert_array_equal(got, F.pad(torch.from_numpy(x), torch_pad, value=value).numpy())


def test_pad_threads(rng):
    spec = make_spec([(16, 112, 112), (16, 113, 113)], [0], [1], [
        {"op": "pad", "in": 0, "out": 1, "pads": [[0, 0], [0, 1], [0, 1]], "value": 0}])
    x = randn(rng, 3, 16, 112, 112)
    one = check(spec, {}, [x], n_threads=1)[0]
    np.testing.assert_array_equal(one, run_native(spec, {}, [x], n_threads=2)[0])


PAD_BAD = [
    (dict(pads=[[0, 0], [1, 1]]), r"ops\[0\]\.pads must be a list of 3 \[before, after\] pairs",
     "one pair per dim"),
    (dict(pads=[[0, 0], [1, 1], [0]]), r"ops\[0\]\.pads\[2\] must be a list of 2 ints", "pairs"),
    (dict(pads=[[0, 0], [1, -1], [0, 0]]), r"ops\[0\]\.pads\[1\]\[1\] = -1 is out of range", "out-of-range"),
    (dict(pads=[[0, 0], [1, 1.5], [0, 0]]), r"ops\[0\]\.pads\[1\]\[1\] must be an int", "must hold ints"),
    (dict(pads="same"), r"ops\[0\]\.pads must be a list", "pads must be a list"),
    (dict(value=float("nan")), r"ops\[0\]\.value must be a finite number", "value must be a finite"),
    (dict(value=True), r"ops\[0\]\.value must be a finite number", "value must be a number"),
    (dict(pads=[[0, 0], [1, 1], [0, 0]]), r"output buffer 1 must have shape \(4, 7, 6\)", r"must have shape \(4, 7, 6\)"),
]


@pytest.mark.parametrize("edit, match, native", PAD_BAD)
def test_pad_bad_specs(edit, match, native):
    spec = make_spec([(4, 5, 6), (4, 6, 7)], [0], [1], [
        {"op": "pad", "in": 0, "out": 1, "pads": [[0, 0], [0, 1], [1, 0]], "value": 0.0}])
    validate(spec, {})
    spec["ops"][0].update(edit)
    refused(spec, {}, match, native)


# --- expand ------------------------------------------------------------------------------------------

EXPAND_CASES = [((1, 7), (3, 7)), ((5, 1, 1), (5, 6, 7)), ((9,), (4, 9)), ((1,), (3, 4)), ((2, 5), (2, 5)),
                ((4, 1, 6), (2, 4, 3, 6)), ((1, 1), (1, 1))]


@pytest.mark.parametrize("shape, out", EXPAND_CASES)
def test_expand_matches_reference_and_torch(rng, shape, out):
    spec = make_spec([shape, out], [0], [1], [{"op": "expand", "in": 0, "out": 1}])
    for batch in BATCHES:
        x = randn(rng, batch, *shape)
        (got,) = check(spec, {}, [x])
        t = torch.from_numpy(x).reshape((batch,) + (1,) * (len(out) - len(shape)) + shape)
        np.testing.assert_array_equal(got, t.expand((batch,) + out).numpy())


def test_expand_threads(rng):
    spec = make_spec([(64, 1), (64, 4000)], [0], [1], [{"op": "expand", "in": 0, "out": 1}])
    x = randn(rng, 3, 64, 1)
    np.testing.assert_array_equal(check(spec, {}, [x], n_threads=2)[0], np.broadcast_to(x, (3, 64, 4000)))


@pytest.mark.parametrize("shape, out", [((3, 7), (2, 7)), ((2, 3), (3,)), ((3, 1), (3, 2, 1)), ((1, 1, 4), (1, 4))])
def test_expand_bad_specs(shape, out):
    spec = make_spec([shape, out], [0], [1], [{"op": "expand", "in": 0, "out": 1}])
    refused(spec, {}, r"ops\[0\]: input .* does not broadcast to output buffer 1", "does not broadcast to the output")


def test_shape_ops_do_not_run_in_place():
    for op in ({"op": "expand", "in": 0, "out": 1}, {"op": "reduce", "kind": "sum", "in": 0, "out": 1, "axes": [0]},
               {"op": "pad", "in": 0, "out": 1, "pads": [[0, 0]], "value": 0}):
        spec = make_spec([(1,), {"shape": [1], "alias_of": 0}], [0], [1], [op])
        refused(spec, {}, "out must not share storage with in", "must not share storage")


def test_a_block_of_the_new_ops_matches_torch(rng):
    # squeeze-excitation by mean + mul, a manual layer norm (mean, sub, mul, mean, add eps, rsqrt),
    # TF-same padding, an expand, and a masked attention, chained in one plan.
    C, H, W, D = 6, 5, 7, 6
    spec = make_spec([
        (C, H, W), (C, 1, 1), (C, 1, 1), (C, H, W),          # 0-3
        (C, H + 1, W + 1),                                   # 4
        {"shape": [C * (H + 1) * (W + 1) // D, D], "alias_of": 4},  # 5: rows of D (8 x 6 = 48 x 6)
        (48, 1), (48, D), (48, D), (48, 1), (48, 1), (48, D),  # 6-11
        (D,), (48, D),                                        # 12-13
        (1, 1, 48), (48, D),                                  # 14-15
    ], [0, 12, 14], [15], [
        {"op": "reduce", "kind": "mean", "in": 0, "out": 1, "axes": [1, 2]},
        {"op": "activation", "kind": "hardsigmoid", "in": 1, "out": 2},
        {"op": "mul", "a": 0, "b": 2, "out": 3},
        {"op": "pad", "in": 3, "out": 4, "pads": [[0, 0], [0, 1], [0, 1]], "value": 0.0},
        {"op": "reduce", "kind": "mean", "in": 5, "out": 6, "axes": [1]},
        {"op": "sub", "a": 5, "b": 6, "out": 7},
        {"op": "mul", "a": 7, "b": 7, "out": 8},
        {"op": "reduce", "kind": "mean", "in": 8, "out": 9, "axes": [1]},
        {"op": "affine", "in": 9, "out": 10, "scale": 1.0, "shift": 1e-5, "activation": "rsqrt"},
        {"op": "mul", "a": 7, "b": 10, "out": 11},
        {"op": "expand", "in": 12, "out": 13},
        {"op": "attention", "q": 11, "k": 11, "v": 13, "out": 15, "layout": "sequence_first", "heads": 1,
         "scale": 0.5, "causal": False, "mask": 14, "mask_kind": "additive"},
    ])
    x, g, m = randn(rng, 2, C, H, W), randn(rng, 2, D), randn(rng, 2, 1, 1, 48)
    (got,) = check(spec, {}, [x, g, m])
    t = torch64(x)
    t = t * F.hardsigmoid(t.mean(dim=(2, 3), keepdim=True))
    t = F.pad(t, [0, 1, 0, 1]).reshape(2, 48, D)
    t = (t - t.mean(-1, keepdim=True)) * torch.rsqrt(((t - t.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + 1e-5)
    v = torch64(g)[:, None, :].expand(2, 48, D)
    want = F.scaled_dot_product_attention(t[:, None], t[:, None], v[:, None], attn_mask=torch64(m), scale=0.5)[:, 0]
    assert_close(got, want.numpy())


def test_compile_passes_know_the_mask_reads_and_the_new_binary_ops():
    from sparseprune.compile.passes import _drop_dead_ops, _fuse_activations

    buffers = [{"shape": s, "alias_of": None} for s in ([4, 8], [4], [1, 4, 4], [4, 8], [4, 8], [4, 8])]
    ops = [{"op": "expand", "in": 1, "out": 2},  # read only as the attention's mask
           {"op": "attention", "q": 0, "k": 0, "v": 0, "out": 3, "layout": "sequence_first", "heads": 2,
            "scale": 1.0, "causal": False, "mask": 2, "mask_kind": "additive"},
           {"op": "sub", "a": 3, "b": 0, "out": 4, "activation": None},
           {"op": "activation", "kind": "exp", "in": 4, "out": 5}]
    kept = _drop_dead_ops(buffers, list(ops), [5])
    assert [op["op"] for op in kept] == ["expand", "attention", "sub", "activation"]
    fused = _fuse_activations(buffers, [dict(op) for op in kept], [5])
    assert [op["op"] for op in fused] == ["expand", "attention", "sub"]
    assert fused[-1]["activation"] == "exp" and fused[-1]["out"] == 5
