"""Dynamic (symbolic) per-sample dims: one executable serves every sequence length in a range,
doing only the work of the length it runs at. Validation (spec.py), the numpy reference, the
native plan's per-assignment instances and their cache, Executable's checks and files."""
import copy
import json

import numpy as np
import pytest
from concurrency import run_in_threads  # tests/concurrency.py
from spec_edits import drop_field, set_field  # tests/spec_edits.py

from sparseprune import _native, formats
from sparseprune.runtime import Executable, SpecError, load, run_reference, validate

_C = _native._C
F32 = np.float32
D, HEADS, VOCAB, MAX_LEN = 16, 2, 50, 40


def _csr(rng, name, rows, cols, sparsity=0.6):
    w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(F32)
    w[rng.random(w.shape) < sparsity] = 0
    a = formats.csr_arrays(w)
    return {f"{name}.indptr": a.indptr, f"{name}.indices": a.indices, f"{name}.values": a.values,
            f"{name}.bias": rng.standard_normal(rows).astype(F32)}


def transformer_spec(rng, causal=False, max_len=MAX_LEN):
    """ids [seq] -> token + position embedding (a constant at max_len) -> dense qkv linear -> three
    slices -> sequence_first attention -> csr linear -> residual add -> layernorm; beside it the
    same heads done by hand (views, permutes, matmuls, a [2, seq, seq] mask constant, softmax) and
    by a heads_first attention, then cat along the features and along the rows ([2, "seq"])."""
    dh = D // HEADS
    arrays = {
        "tok.table": rng.standard_normal((VOCAB, D)).astype(F32),
        "pos.value": rng.standard_normal(max_len * D).astype(F32),
        "qkv.weight": (rng.standard_normal((3 * D, D)) / np.sqrt(D)).astype(F32),
        "qkv.bias": rng.standard_normal(3 * D).astype(F32),
        **_csr(rng, "proj", D, D),
        "ln.gamma": (rng.random(D) + 0.5).astype(F32), "ln.beta": rng.standard_normal(D).astype(F32),
        "ln2.gamma": (rng.random(D) + 0.5).astype(F32), "ln2.beta": rng.standard_normal(D).astype(F32),
        # a mask over [2 heads, query, key], stored at max_len: a run at length L reads its [:, :L, :L]
        "mask.value": (rng.standard_normal((HEADS, max_len, max_len)) * 2).astype(F32).ravel(),
    }
    shapes = [
        ["seq"], ["seq", D], ["seq", D], ["seq", D], ["seq", 3 * D],                   # 0-4
        ["seq", D], ["seq", D], ["seq", D], ["seq", D], ["seq", D], ["seq", D], ["seq", D],  # 5-11
        ["seq", HEADS, dh], ["seq", HEADS, dh], [HEADS, "seq", dh], [HEADS, "seq", dh],   # 12-15
        [HEADS, "seq", "seq"], [HEADS, "seq", "seq"], [HEADS, "seq", "seq"], [HEADS, "seq", "seq"],  # 16-19
        ["seq", HEADS, dh], [HEADS, "seq", dh], [HEADS, "seq", dh], ["seq", HEADS, dh], ["seq", D],  # 20-24
        ["seq", 2 * D], [[2, "seq"], D], [[2, "seq"], D], [HEADS, "seq", dh],           # 25-28
    ]
    buffers = [{"shape": s} for s in shapes]
    buffers[0]["name"] = "input_ids"
    for view, of in ((12, 5), (13, 6), (20, 7), (24, 23)):
        buffers[view]["alias_of"] = of
    lin = {"format": "dense", "block": [1, 1]}
    ops = [
        {"op": "embedding", "in": 0, "out": 1, "weight": "tok"},
        {"op": "constant", "out": 2, "weight": "pos", "shape": [max_len, D]},
        {"op": "add", "a": 1, "b": 2, "out": 3},
        {"op": "linear", "in": 3, "out": 4, "weight": "qkv", **lin, "rows": 3 * D, "cols": D},
        *({"op": "slice", "in": 4, "out": 5 + j, "axis": 1, "start": j * D, "step": 1} for j in range(3)),
        {"op": "attention", "q": 5, "k": 6, "v": 7, "out": 8, "layout": "sequence_first", "heads": HEADS,
         "scale": dh ** -0.5, "causal": causal},
        {"op": "linear", "in": 8, "out": 9, "weight": "proj", "format": "csr", "block": [1, 1], "rows": D, "cols": D},
        {"op": "add", "a": 9, "b": 3, "out": 10},
        {"op": "layernorm", "in": 10, "out": 11, "weight": "ln", "eps": 1e-5},
        {"op": "permute", "in": 12, "out": 14, "perm": [1, 0, 2]},
        {"op": "permute", "in": 13, "out": 15, "perm": [1, 0, 2]},
        {"op": "matmul", "a": 14, "b": 15, "out": 16, "transpose_b": True, "scale": dh ** -0.5},
        {"op": "constant", "out": 17, "weight": "mask", "shape": [HEADS, max_len, max_len]},
        {"op": "add", "a": 16, "b": 17, "out": 18},
        {"op": "softmax", "in": 18, "out": 19},
        {"op": "permute", "in": 20, "out": 21, "perm": [1, 0, 2]},
        {"op": "matmul", "a": 19, "b": 21, "out": 22, "transpose_b": False, "scale": 1.0},
        {"op": "permute", "in": 22, "out": 23, "perm": [1, 0, 2]},
        {"op": "cat", "inputs": [11, 24], "out": 25, "axis": 1},
        {"op": "cat", "inputs": [11, 24], "out": 26, "axis": 0},
        {"op": "layernorm", "in": 26, "out": 27, "weight": "ln2", "eps": 1e-5},
        {"op": "attention", "q": 14, "k": 15, "v": 21, "out": 28, "layout": "heads_first", "heads": 1,
         "scale": dh ** -0.5, "causal": causal},
    ]
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"seq": {"min": 1, "max": max_len}},
            "buffers": buffers, "inputs": [0], "outputs": [11, 25, 27, 28], "ops": ops, "input_dtypes": ["int64"]}
    return spec, arrays


def cross_attention_spec():
    """Two dims: queries x [tgt, 8], keys/values mem [src, 8] with a key padding mask [src]."""
    spec = {"format": "sparseprune.executable", "version": 1,
            "dims": {"tgt": {"min": 1, "max": 12}, "src": {"min": 2, "max": 20}},
            "buffers": [{"shape": ["tgt", 8]}, {"shape": ["src", 8]}, {"shape": ["src"]}, {"shape": ["tgt", 8]}],
            "inputs": [0, 1, 2], "outputs": [3], "input_dtypes": ["float32", "float32", "bool"],
            "ops": [{"op": "attention", "q": 0, "k": 1, "v": 1, "key_mask": 2, "out": 3, "layout": "sequence_first",
                     "heads": 2, "scale": 0.5, "causal": False}]}
    return spec, {}


def _ids(rng, batch, length):
    return rng.integers(0, VOCAB, (batch, length))


def _close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# --- running ---------------------------------------------------------------------------------


def test_the_reference_at_a_short_length_is_the_prefix_of_the_long_run(rng):
    spec, arrays = transformer_spec(rng, causal=True)
    ids = _ids(rng, 2, MAX_LEN)
    full = run_reference(spec, arrays, [ids])
    for length in (1, 9):
        short = run_reference(spec, arrays, [ids[:, :length]])
        np.testing.assert_allclose(short[0], full[0][:, :length], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(short[3], full[3][:, :, :length], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runner", ["reference"])
def test_a_constant_writes_the_leading_block_of_its_value(rng, runner):
    """out [2, seq, seq] from a value stored at [2, 6, 6]: out[h, i, j] = value[h, i, j]."""
    value = rng.standard_normal((2, 6, 6)).astype(F32)
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"seq": {"min": 1, "max": 6}},
            "buffers": [{"shape": ["seq"]}, {"shape": [2, "seq", "seq"]}], "inputs": [0], "outputs": [1],
            "ops": [{"op": "constant", "out": 1, "weight": "m", "shape": [2, 6, 6]}]}
    arrays = {"m.value": value.ravel()}
    run = (lambda x: run_reference(spec, arrays, [x])[0]) if runner == "reference" else \
        Executable.from_spec(spec, arrays).run
    for length in (1, 4, 6):
        for batch in (0, 1, 3):
            got = run(np.zeros((batch, length), F32))
            np.testing.assert_array_equal(got, np.broadcast_to(value[:, :length, :length], (batch, 2, length, length)))


# --- input checks at run time ----------------------------------------------------------------


# --- validation --------------------------------------------------------------------------------


def _edit_constant_shape(value):
    def edit(spec, arrays=None):
        spec["ops"][1]["shape"] = value
    return edit


def _shrink_pos(spec, arrays):
    arrays["pos.value"] = arrays["pos.value"][:-1]


BAD = [
    (set_field(["dims"], []), r"spec\.dims must be an object of at most 8 dims"),
    (set_field(["dims"], {f"d{i}": {"min": 1, "max": 2} for i in range(9)}), r"spec\.dims must be an object of at most 8"),
    (set_field(["dims"], {"se q": {"min": 1, "max": 2}}), r"spec\.dims: the name 'se q' is not an identifier"),
    (set_field(["dims", "seq"], {"min": 0, "max": 4}), r"spec\.dims\.seq\.min = 0 is out of range \[1, "),
    (set_field(["dims", "seq"], {"min": 5, "max": 4}), r"spec\.dims\.seq\.max = 4 is out of range \[5, "),
    (set_field(["dims", "seq"], {"min": 1}), r"spec\.dims\.seq has no field 'max'"),
    (set_field(["dims", "seq"], {"min": 1, "max": 4, "step": 2}), r"spec\.dims\.seq has unknown field 'step'"),
    (set_field(["dims", "seq"], {"min": True, "max": 4}), r"spec\.dims\.seq\.min must be an int"),
    (set_field(["buffers", 1, "shape"], ["len", D]), r"spec\.buffers\[1\]\.shape\[0\] names 'len', not a dim"),
    (set_field(["buffers", 1, "shape"], [[0, "seq"], D]), r"spec\.buffers\[1\]\.shape\[0\]\[0\] = 0 is out of range"),
    (set_field(["buffers", 1, "shape"], [["seq", 2], D]), r"spec\.buffers\[1\]\.shape\[0\] must be an int >= 1, a dim "
                                                          r"name or \[k, dim name\]"),
    (set_field(["buffers", 1, "shape"], [2.5, D]), r"spec\.buffers\[1\]\.shape\[0\] must be an int >= 1, a dim name"),
    (set_field(["buffers", 1, "shape"], [["seq"], D]), r"spec\.buffers\[1\]\.shape\[0\] must be an int >= 1"),
    (set_field(["buffers", 12, "shape"], [D, HEADS, D // HEADS]),
     r"spec\.buffers\[12\]\.shape \(16, 2, 8\) must have the element count of buffer 5 \(seq, 16\) .*every value"),
    (set_field(["buffers", 1, "shape"], ["seq", 1 << 24]), r"spec\.buffers\[1\]\.shape .* holds more than 268435456 "
                                                           r"elements per sample at the dims' max values"),
    (set_field(["dims", "seq"], {"min": 1, "max": 1 << 31}), r"holds more than 268435456 elements per sample at the "
                                                             r"dims' max values"),
    (set_field(["dims", "extra"], {"min": 1, "max": 3}), r"spec\.dims\.extra appears in no input's shape"),
    (drop_field(["ops", 1, "shape"]), r"spec\.ops\[1\] writes buffer 2 \(seq, 16\), which has dims: it needs a field "
                                      r"'shape'"),
    (_edit_constant_shape([MAX_LEN - 1, D]), r"spec\.ops\[1\]\.shape \(39, 16\) must be out's shape at the dims' max "
                                             r"values \(40, 16\)"),
    (_edit_constant_shape([MAX_LEN, "seq"]), r"spec\.ops\[1\]\.shape\[1\] must be an int"),
    (_edit_constant_shape([]), r"spec\.ops\[1\]\.shape must be a list of 1 to 8 ints"),
    (_shrink_pos, r"array 'pos\.value' must hold one sample of out \(40, 16\): 640 values, got 639"),
    # the output of the features cat is not [seq, 2 * D] when written [seq, D]
    (set_field(["buffers", 25, "shape"], ["seq", D]), r"spec\.ops\[20\]: output buffer 25 must have shape "
                                                      r"\(1, 32\), got \(1, 16\) \(with dims seq=1\)"),
    (set_field(["buffers", 26, "shape"], [["seq", 2][::-1], D]), None),  # [2, "seq"] is the right shape: valid
]


@pytest.mark.parametrize("edit, match", BAD)
def test_bad_dims_raise_clean_errors_naming_the_field(rng, edit, match):
    spec, arrays = transformer_spec(rng)
    edit(spec, arrays)
    if match is None:
        validate(spec, arrays)
        return
    with pytest.raises(SpecError, match=match):
        validate(spec, arrays)
    with pytest.raises(ValueError):
        Executable.from_spec(spec, arrays)


def test_canonical_form_and_constant_shape_without_dims(rng):
    spec, arrays = transformer_spec(rng)
    spec["buffers"][26]["shape"] = [[1, "seq"], D]  # [1, "seq"] is "seq" ...
    spec["buffers"][27]["shape"] = [[1, "seq"], D]  # ... so the rows cat [seq + seq] does not fit
    with pytest.raises(SpecError, match=r"spec\.ops\[21\]: output buffer 26 must have shape \(2, 16\), got \(1, 16\)"):
        validate(spec, arrays)
    spec, arrays = transformer_spec(rng)
    spec["buffers"][12]["shape"] = [[1, "seq"], HEADS, D // HEADS]
    assert validate(spec, arrays).spec["buffers"][12]["shape"] == ["seq", HEADS, D // HEADS]
    # a constant's "shape" on a static buffer must be that buffer's shape
    static = {"format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [2]}, {"shape": [2, 3]}],
              "inputs": [0], "outputs": [1], "ops": [{"op": "constant", "out": 1, "weight": "c", "shape": [2, 3]}]}
    c = {"c.value": np.arange(6, dtype=F32)}
    exe = Executable.from_spec(static, c)
    np.testing.assert_array_equal(exe.run(np.zeros((2, 2), F32)), np.broadcast_to(c["c.value"].reshape(2, 3), (2, 2, 3)))
    bad = copy.deepcopy(static)
    bad["ops"][0]["shape"] = [3, 2]
    with pytest.raises(SpecError, match=r"spec\.ops\[0\]\.shape \(3, 2\) must be out's shape"):
        validate(bad, c)
