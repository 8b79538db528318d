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


@pytest.mark.parametrize("causal", [False, True])
def test_one_executable_serves_every_length_like_the_reference(rng, causal):
    spec, arrays = transformer_spec(rng, causal=causal)
    exe = Executable.from_spec(spec, arrays)
    for length in (1, 2, 7, 16, 33, MAX_LEN, 5, 1):  # min, max, and back to lengths seen before
        for batch, threads in ((1, 1), (3, 2), (0, 1)):
            ids = _ids(rng, batch, length)
            got = exe.run(ids, n_threads=threads)
            assert [g.shape for g in got] == [(batch, length, D), (batch, length, 2 * D), (batch, 2 * length, D),
                                              (batch, HEADS, length, D // HEADS)]
            _close(got, run_reference(spec, arrays, [ids]))


def test_a_causal_model_at_a_short_length_is_the_prefix_of_the_long_run(rng):
    """Only length-L work, and the right work: with causal attention and a mask whose leading
    block is what a length-L run reads, row i depends on tokens 0..i only, so a run at length L
    equals the first L rows of a run at the max length (the mixing paths read the full mask and
    are left out)."""
    spec, arrays = transformer_spec(rng, causal=True)
    exe = Executable.from_spec(spec, arrays)
    ids = _ids(rng, 2, MAX_LEN)
    full = exe.run(ids)
    for length in (1, 9, 23):
        short = exe.run(np.ascontiguousarray(ids[:, :length]))
        np.testing.assert_allclose(short[0], full[0][:, :length], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(short[3], full[3][:, :, :length], rtol=1e-5, atol=1e-5)


def test_the_reference_at_a_short_length_is_the_prefix_of_the_long_run(rng):
    spec, arrays = transformer_spec(rng, causal=True)
    ids = _ids(rng, 2, MAX_LEN)
    full = run_reference(spec, arrays, [ids])
    for length in (1, 9):
        short = run_reference(spec, arrays, [ids[:, :length]])
        np.testing.assert_allclose(short[0], full[0][:, :length], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(short[3], full[3][:, :, :length], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runner", ["reference", "native"])
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


def test_two_dims_cross_attention_with_a_key_mask(rng):
    spec, arrays = cross_attention_spec()
    exe = Executable.from_spec(spec, arrays)
    assert exe.dims == {"tgt": (1, 12), "src": (2, 20)}
    assert exe.input_shapes == (("tgt", 8), ("src", 8), ("src",)) and exe.output_shapes == (("tgt", 8),)
    for tgt, src in ((1, 2), (12, 20), (3, 17), (12, 2), (5, 5)):
        x = rng.standard_normal((2, tgt, 8)).astype(F32)
        mem = rng.standard_normal((2, src, 8)).astype(F32)
        mask = rng.random((2, src)) < 0.3
        mask[:, 0] = False
        got = exe.run(x, mem, mask)
        assert got.shape == (2, tgt, 8)
        _close([got], run_reference(spec, arrays, [x, mem, mask]))


@pytest.mark.parametrize("fmt", ["csr", "bsr", "dense"])
def test_every_linear_format_over_dynamic_rows(rng, fmt):
    """linear (gelu) over [seq, 12] rows, then mul, affine and an activation, at several lengths."""
    w = rng.standard_normal((8, 12)).astype(F32)
    w[rng.random(w.shape) < 0.5] = 0
    block = [4, 1] if fmt == "bsr" else [1, 1]
    if fmt == "dense":
        arrays = {"fc.weight": w}
    else:
        a = formats.csr_arrays(w) if fmt == "csr" else formats.bsr_arrays(w, *block)
        arrays = {"fc.indptr": a.indptr, "fc.indices": a.indices, "fc.values": a.values}
    arrays["fc.bias"] = rng.standard_normal(8).astype(F32)
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"n": {"min": 1, "max": 64}},
            "buffers": [{"shape": ["n", 12]}, {"shape": ["n", 8]}, {"shape": ["n", 8]}, {"shape": ["n", 8]},
                        {"shape": ["n", 8]}],
            "inputs": [0], "outputs": [4],
            "ops": [{"op": "linear", "in": 0, "out": 1, "weight": "fc", "format": fmt, "block": block, "rows": 8,
                     "cols": 12, "activation": "gelu"},
                    {"op": "mul", "a": 1, "b": 1, "out": 2},
                    {"op": "affine", "in": 2, "out": 3, "scale": 0.5, "shift": -1.0, "activation": "tanh"},
                    {"op": "activation", "kind": "silu", "in": 3, "out": 4}]}
    exe = Executable.from_spec(spec, arrays)
    for n, batch in ((1, 1), (5, 3), (64, 2), (17, 1), (3, 0)):
        x = rng.standard_normal((batch, n, 12)).astype(F32)
        _close([exe.run(x, n_threads=2)], run_reference(spec, arrays, [x]))


def test_threads_running_different_lengths_share_one_executable(rng):
    """More distinct lengths than the native instance cache holds, from four threads at once:
    every result equals the serial one (instances are made, cached and evicted concurrently)."""
    spec, arrays = transformer_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    cases = [_ids(rng, 1 + k % 2, 1 + (7 * k) % MAX_LEN) for k in range(40)]
    want = [exe.run(ids, n_threads=1) for ids in cases]
    exe2 = Executable.from_spec(spec, arrays)  # a fresh cache

    def worker(t):
        for k in list(range(t, len(cases), 4)) * 2:
            _close(exe2.run(cases[k], n_threads=1 + t % 2), want[k])

    run_in_threads(worker)


def test_save_load_round_trip_keeps_the_dims(rng, tmp_path):
    spec, arrays = transformer_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    path = tmp_path / "dyn.safetensors"
    exe.save(path)
    loaded = load(path)
    assert loaded.dims == exe.dims == {"seq": (1, MAX_LEN)}
    assert loaded.input_shapes == (("seq",),)
    assert loaded.output_shapes == (("seq", D), ("seq", 2 * D), ([2, "seq"], D), (HEADS, "seq", D // HEADS))
    assert loaded.spec["dims"] == {"seq": {"min": 1, "max": MAX_LEN}}
    assert loaded.spec["buffers"][26]["shape"] == [[2, "seq"], D]
    ids = _ids(rng, 2, 11)
    _close(loaded.run(ids), exe.run(ids))
    assert "seq" in repr(loaded) and "2*seq" in repr(loaded)


def test_specs_without_dims_are_unchanged(rng):
    spec, arrays = cross_attention_spec()
    del spec["dims"]
    spec["buffers"] = [{"shape": [3, 8]}, {"shape": [5, 8]}, {"shape": [5]}, {"shape": [3, 8]}]
    exe = Executable.from_spec(spec, arrays)
    assert exe.dims == {} and "dims" not in exe.spec and exe.input_shapes == ((3, 8), (5, 8), (5,))
    args = [rng.standard_normal((2, 3, 8)).astype(F32), rng.standard_normal((2, 5, 8)).astype(F32),
            np.zeros((2, 5), bool)]
    _close([exe.run(*args)], run_reference(spec, arrays, args))
    with pytest.raises(ValueError, match=r"input 1 must have shape \(batch, 5, 8\), got \(2, 6, 8\)"):
        exe.run(args[0], np.zeros((2, 6, 8), F32), args[2])


# --- input checks at run time ----------------------------------------------------------------


def test_inputs_outside_the_range_or_disagreeing_name_the_input_and_dim(rng):
    spec, arrays = transformer_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    with pytest.raises(ValueError, match=r"input 0 \('input_ids'\) has size 41 along axis 1 \(dim 'seq' = 41\), "
                                         r"allowed 1\.\.40"):
        exe.run(_ids(rng, 1, MAX_LEN + 1))
    with pytest.raises(ValueError, match=r"input 0 \('input_ids'\) has size 0 along axis 1 .*allowed 1\.\.40"):
        exe.run(_ids(rng, 1, 0))
    with pytest.raises(ValueError, match=r"input 0 \('input_ids'\) must have shape \(batch, seq\), got \(1, 3, 2\)"):
        exe.run(_ids(rng, 1, 3)[..., None].repeat(2, axis=2))

    spec, arrays = cross_attention_spec()
    exe = Executable.from_spec(spec, arrays)
    x, mem = np.zeros((1, 4, 8), F32), np.zeros((1, 6, 8), F32)
    with pytest.raises(ValueError, match=r"input 2 has size 5 along axis 1 \(dim 'src' = 5\), but input 1 gives "
                                         r"dim 'src' = 6: the inputs must agree"):
        exe.run(x, mem, np.zeros((1, 5), bool))
    with pytest.raises(ValueError, match=r"input 1 has size 1 along axis 1 \(dim 'src' = 1\), allowed 2\.\.20"):
        exe.run(x, mem[:, :1], np.zeros((1, 1), bool))
    with pytest.raises(ValueError, match=r"input 1 must have shape \(batch, src, 8\), got \(1, 6, 7\)"):
        exe.run(x, mem[..., :7], np.zeros((1, 6), bool))


def test_a_k_times_dim_input(rng):
    """An input [2 * seq, 4]: its size must be a multiple of 2, the dim is half of it."""
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"seq": {"min": 2, "max": 9}},
            "buffers": [{"shape": [[2, "seq"], 4]}, {"shape": ["seq", 8], "alias_of": 0}, {"shape": ["seq", 8]}],
            "inputs": [0], "outputs": [2], "ops": [{"op": "softmax", "in": 1, "out": 2}]}
    exe = Executable.from_spec(spec, {})
    assert exe.input_shapes == (([2, "seq"], 4),) and exe.output_shapes == (("seq", 8),)
    x = rng.standard_normal((3, 10, 4)).astype(F32)
    got = exe.run(x)
    assert got.shape == (3, 5, 8)
    _close([got], run_reference(spec, {}, [x]))
    with pytest.raises(ValueError, match=r"input 0 has size 7 along axis 1, not a multiple of 2 .*allowed 2\*2\.\.2\*9"):
        exe.run(np.zeros((1, 7, 4), F32))
    with pytest.raises(ValueError, match=r"dim 'seq' = 10\), allowed 2\*2\.\.2\*9"):
        exe.run(np.zeros((1, 20, 4), F32))


def test_the_native_plan_rechecks_the_dims_against_the_inputs(rng):
    spec, arrays = transformer_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    plan = exe._plan
    assert plan.dims == [("seq", 1, MAX_LEN)] and plan.input_shapes == [["seq"]]
    assert plan.output_shapes[2] == [[2, "seq"], D]
    ids = _ids(rng, 2, 6).astype(F32)
    np.testing.assert_allclose(plan.run([ids], 1, [6])[0], exe.run(ids.astype(np.int64))[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"input 0 must have shape \(batch, 7\) at these dim values"):
        plan.run([ids], 1, [7])
    with pytest.raises(ValueError, match=r"dim 'seq' = 41 is outside its range 1\.\.40"):
        plan.run([np.zeros((1, 41), F32)], 1, [41])
    with pytest.raises(ValueError, match=r"dim 'seq' = 0 is outside its range"):
        plan.run([np.zeros((1, 0), F32)], 1, [0])
    with pytest.raises(ValueError, match=r"expected 1 dim values, got 0"):
        plan.run([ids], 1)


def test_a_rule_relating_two_dims_is_checked_for_every_assignment():
    """add(a [tgt, 4], b [src, 4]) holds at the min values (1, 1) and the max (9, 9): the Python
    validator refuses it at its generic point, and the native plan (which checks min and max when
    it is built) checks every assignment before any kernel runs: tgt == src, or src == 1 (b
    broadcasts over a's rows, numpy rules), else refused."""
    spec = {"format": "sparseprune.executable", "version": 1,
            "dims": {"tgt": {"min": 1, "max": 9}, "src": {"min": 1, "max": 9}},
            "buffers": [{"shape": ["tgt", 4]}, {"shape": ["src", 4]}, {"shape": ["tgt", 4]}],
            "inputs": [0, 1], "outputs": [2], "ops": [{"op": "add", "a": 0, "b": 1, "out": 2}]}
    with pytest.raises(SpecError, match=r"spec\.ops\[0\].*do not broadcast.*\(with dims tgt=5, src=6\)"):
        validate(spec, {})
    plan = _C.Plan(json.dumps(spec), {})
    x = np.ones((1, 3, 4), F32)
    np.testing.assert_array_equal(plan.run([x, x], 1, [3, 3])[0], 2 * x)
    np.testing.assert_array_equal(plan.run([x, np.full((1, 1, 4), 2, F32)], 1, [3, 1])[0], 3 * x)
    with pytest.raises(ValueError, match=r"ops\[0\]: operands \(3, 4\) and \(4, 4\) do not broadcast .*"
                                         r"\(with dims tgt=3, src=4\)"):
        plan.run([x, np.ones((1, 4, 4), F32)], 1, [3, 4])
    with pytest.raises(ValueError, match=r"ops\[0\]: output must have the broadcast shape \(3, 4\), got \(1, 4\) "
                                         r"\(with dims tgt=1, src=3\)"):
        plan.run([x[:, :1], x], 1, [1, 3])


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


@pytest.mark.parametrize("edit, match", [
    (set_field(["buffers", 1, "shape"], ["len", D]), r"buffers\[1\]\.shape names 'len', not a dim of spec\.dims"),
    (set_field(["buffers", 12, "shape"], [D, HEADS, D // HEADS]), r"alias of buffer 5 must have the same element count"),
    (set_field(["dims", "seq"], {"min": 3, "max": 2}), r"spec\.dims\.seq: needs 1 <= min <= max"),
    (set_field(["dims", "seq"], {"min": 1, "max": 1 << 26}), r"buffer 1 \(seq, 16\) is too large"),
    (_edit_constant_shape([MAX_LEN - 1, D]), r"ops\[1\]: constant must hold 624 values"),
    (drop_field(["ops", 1, "shape"]), r"ops\[1\]: a constant writing a buffer with dims needs its value's shape"),
])
def test_the_native_plan_refuses_bad_dims_on_its_own(rng, edit, match):
    spec, arrays = transformer_spec(rng)
    edit(spec, arrays)
    with pytest.raises(ValueError, match=match):
        _C.Plan(json.dumps(spec), arrays)


def test_a_rule_that_fails_only_at_the_min_values():
    """Slicing 3 rows off [seq, 4] needs seq >= 3: refused for min 1 (Python and native), run
    for min 3."""
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"seq": {"min": 1, "max": 8}},
            "buffers": [{"shape": ["seq", 4]}, {"shape": [3, 4]}], "inputs": [0], "outputs": [1],
            "ops": [{"op": "slice", "in": 0, "out": 1, "axis": 0, "start": 0, "step": 1}]}
    with pytest.raises(SpecError, match=r"spec\.ops\[0\]: start 0, step 1 and 3 outputs leave the input's 1 entries "
                                        r"along axis 0 \(with dims seq=1\)"):
        validate(spec, {})
    with pytest.raises(ValueError, match=r"ops\[0\]: slice start 0, step 1, length 3 leaves the input's 1 entries "
                                         r"\(with dims seq=1\)"):
        _C.Plan(json.dumps(spec), {})
    spec["dims"]["seq"]["min"] = 3
    exe = Executable.from_spec(spec, {})
    x = np.arange(2 * 6 * 4, dtype=F32).reshape(2, 6, 4)
    np.testing.assert_array_equal(exe.run(x), x[:, :3])


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


def test_cli_runs_a_dynamic_executable(rng, tmp_path, capsys):
    """`sparseprune run`: random inputs at the dims' max values, --input arrays at their own
    length, a length outside the range a clean error."""
    import sparseprune.cli as cli

    spec, arrays = transformer_spec(rng)
    path = tmp_path / "dyn.safetensors"
    Executable.from_spec(spec, arrays).save(path)
    assert cli.main(["run", str(path), "--batch", "2"]) == 0
    assert f"inputs (2, {MAX_LEN}) random" in capsys.readouterr().out
    ids, out = tmp_path / "ids.npy", tmp_path / "y.npy"
    np.save(ids, _ids(rng, 1, 7))
    assert cli.main(["run", str(path), "--input", str(ids), "--output", str(out), "--output", str(tmp_path / "b.npy"),
                     "--output", str(tmp_path / "c.npy"), "--output", str(tmp_path / "d.npy")]) == 0
    assert np.load(out).shape == (1, 7, D)
    np.save(ids, _ids(rng, 1, MAX_LEN + 3))
    capsys.readouterr()
    assert cli.main(["run", str(path), "--input", str(ids)]) == 2
    assert "dim 'seq' = 43), allowed 1..40" in capsys.readouterr().err


# --- mutated specs: clean errors, never a crash ------------------------------------------------

_POISON_PLAN = _C.Plan(json.dumps({
    "format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [1 << 12]}, {"shape": [1 << 12]}],
    "inputs": [0], "outputs": [1], "ops": [{"op": "affine", "in": 0, "out": 1, "scale": 1.0, "shift": 0.0}]}), {})
_POISON = np.full((64, 1 << 12), np.nan, dtype=F32)  # 1 MiB of the calling thread's arena


def _entry(rng):
    """A random shape entry, valid or not."""
    choices = [int(rng.integers(1, 60)), "seq", [int(rng.integers(1, 4)), "seq"], "t", [2, "t"], [0, "seq"], -3,
               2.5, None, ["seq", 2], [2, 3], True, 2 ** 40, "nope"]
    return choices[int(rng.integers(len(choices)))]


def _mutate(rng, spec, arrays):
    """One random edit of the dims, a buffer shape entry, an alias or a constant's shape."""
    kind = int(rng.integers(6))
    if kind == 0:
        spec["dims"]["seq"] = {"min": int(rng.integers(-1, 6)), "max": int(rng.choice([0, 3, 17, MAX_LEN, 1 << 22]))}
    elif kind == 1:
        spec["dims"]["t"] = {"min": int(rng.integers(1, 4)), "max": int(rng.integers(4, 30))}
        b = int(rng.integers(len(spec["buffers"])))
        shape = spec["buffers"][b]["shape"]
        shape[int(rng.integers(len(shape)))] = "t"
    elif kind in (2, 3):
        b = int(rng.integers(len(spec["buffers"])))
        shape = spec["buffers"][b]["shape"]
        shape[int(rng.integers(len(shape)))] = _entry(rng)
    elif kind == 4:
        b = int(rng.integers(1, len(spec["buffers"])))
        spec["buffers"][b]["alias_of"] = int(rng.integers(b))
    else:
        op = spec["ops"][int(rng.choice([i for i, o in enumerate(spec["ops"]) if o["op"] == "constant"]))]
        op["shape"] = [_entry(rng) if rng.random() < 0.3 else d for d in op["shape"]]
    return kind


def _concrete(shape, env):
    return [d if isinstance(d, int) else env[d] if isinstance(d, str) else d[0] * env[d[1]] for d in shape]


def _transformer_inputs(rng, shapes):
    ids = rng.integers(0, VOCAB, (2, *shapes[0]))
    return [ids.astype(F32)], [ids]


def _broadcast_inputs(rng, shapes):
    x = rng.standard_normal((2, *shapes[0])).astype(F32)
    keep = rng.random((2, *shapes[1])) < 0.7
    return [x, keep.astype(F32)], [x, keep]


@pytest.mark.parametrize("which, seed", [("transformer", s) for s in range(150)] +
                         [("broadcast", s) for s in range(100)])
def test_a_mutated_dynamic_spec_is_refused_cleanly_or_runs_safely(which, seed):
    """After one random edit: validate() and the native plan (given the spec directly) raise
    ValueError / TypeError only. A plan the native side builds runs at min, max and a random
    assignment of its dims (on a NaN-poisoned arena) or refuses the assignment with ValueError;
    when validate() accepts the spec too, the results equal the reference's. Over the transformer
    and over the broadcasting ops (masks, expand, reduce, pad)."""
    rng = np.random.default_rng(seed)
    make_spec, make_inputs = {"transformer": (transformer_spec, _transformer_inputs),
                              "broadcast": (broadcast_ops_spec, _broadcast_inputs)}[which]
    spec, arrays = make_spec(rng)
    _mutate(rng, spec, arrays)
    try:
        validate(copy.deepcopy(spec), arrays)
        valid = True
    except (ValueError, TypeError):
        valid = False
    try:
        plan = _C.Plan(json.dumps(spec), arrays)
    except (ValueError, TypeError):
        assert not valid, "the native plan refuses a spec validate() accepts"
        return
    names = [name for name, _, _ in plan.dims]
    ranges = [(lo, hi) for _, lo, hi in plan.dims]
    for pick in ("min", "max", "random"):
        values = [lo if pick == "min" else hi if pick == "max" else int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
        env = dict(zip(names, values))
        if sum(np.prod(_concrete(b["shape"], env)) for b in spec["buffers"]) > 1 << 20:
            continue  # a mutated max of 2**22: valid, but GiBs to run
        inputs, ref_inputs = make_inputs(rng, [_concrete(s, env) for s in plan.input_shapes])
        _POISON_PLAN.run([_POISON], 1)
        try:
            got = plan.run(inputs, 1, values)
        except ValueError as exc:  # a rule that fails at this assignment, or ids of a mutated table
            assert not valid or "embedding" in str(exc), exc
            continue
        if valid:
            _close(got, run_reference(spec, arrays, ref_inputs))


def broadcast_ops_spec(rng, max_len=12):
    """The broadcasting ops over a dynamic seq: sequence_first attention with a bool mask input
    [1, 1, seq] and with an additive mask constant [1, seq, seq] (stored at max_len), heads_first
    attention with that mask, scores [2, seq, seq] + the constant (numpy broadcast), expand of the
    bool mask to [2, seq, seq], mul, reduce over the last axis and over the heads, sub by the
    row sums [2, seq, 1], pad of the row sums."""
    arrays = {"m.value": (rng.standard_normal((1, max_len, max_len)) * 2).astype(F32).ravel()}
    shapes = [["seq", 8], [1, 1, "seq"], ["seq", 8], [1, "seq", "seq"], ["seq", 8], [2, "seq", 4],  # 0-5
              [2, "seq", 4], [2, "seq", "seq"], [2, "seq", "seq"], [2, "seq", "seq"], [2, "seq", "seq"],  # 6-10
              [2, "seq", 1], [1, "seq", "seq"], [3, "seq", 4], [2, "seq", "seq"]]  # 11-14
    buffers = [{"shape": s} for s in shapes]
    buffers[5]["alias_of"] = 0  # x read as 2 groups of [seq, 4]
    att = {"heads": 2, "scale": 0.5}
    ops = [
        {"op": "attention", "q": 0, "k": 0, "v": 0, "out": 2, "layout": "sequence_first", "causal": False,
         "mask": 1, "mask_kind": "bool", **att},
        {"op": "constant", "out": 3, "weight": "m", "shape": [1, max_len, max_len]},
        {"op": "attention", "q": 0, "k": 0, "v": 0, "out": 4, "layout": "sequence_first", "causal": True,
         "mask": 3, "mask_kind": "additive", **att},
        {"op": "attention", "q": 5, "k": 5, "v": 5, "out": 6, "layout": "heads_first", "causal": False,
         "mask": 3, "mask_kind": "additive", **att},
        {"op": "matmul", "a": 5, "b": 5, "out": 7, "transpose_b": True, "scale": 0.5},
        {"op": "expand", "in": 1, "out": 8},
        {"op": "add", "a": 7, "b": 3, "out": 9},
        {"op": "mul", "a": 9, "b": 8, "out": 10},
        {"op": "reduce", "in": 10, "out": 11, "kind": "sum", "axes": [2]},
        {"op": "reduce", "in": 9, "out": 12, "kind": "mean", "axes": [0]},
        {"op": "pad", "in": 11, "out": 13, "pads": [[1, 0], [0, 0], [1, 2]], "value": -1.5},
        {"op": "sub", "a": 9, "b": 11, "out": 14, "activation": "relu"},
    ]
    spec = {"format": "sparseprune.executable", "version": 1, "dims": {"seq": {"min": 1, "max": max_len}},
            "buffers": buffers, "inputs": [0, 1], "input_dtypes": ["float32", "bool"],
            "outputs": [2, 4, 6, 9, 12, 13, 14], "ops": ops}
    return spec, arrays


def test_broadcasting_ops_and_attention_masks_over_a_dynamic_seq(rng):
    spec, arrays = broadcast_ops_spec(rng)
    value = arrays["m.value"].reshape(1, 12, 12)
    exe = Executable.from_spec(spec, arrays)
    for length in (1, 2, 5, 12, 7, 1):
        for batch, threads in ((1, 1), (3, 2), (0, 1)):
            x = rng.standard_normal((batch, length, 8)).astype(F32)
            keep = rng.random((batch, 1, 1, length)) < 0.7  # some rows keep no key: zeros, both sides
            got = exe.run(x, keep, n_threads=threads)
            want = run_reference(spec, arrays, [x, keep])
            assert [g.shape[1:] for g in got] == [(length, 8), (length, 8), (2, length, 4), (2, length, length),
                                                  (1, length, length), (3, length, 4), (2, length, length)]
            _close(got, want)
            # the add reads the constant's leading [1, L, L] block, broadcast over the 2 groups
            xh = x.astype(np.float64).reshape(batch, 2, length, 4)
            scores = 0.5 * xh @ np.swapaxes(xh, -1, -2) + value[:, :length, :length]
            np.testing.assert_allclose(got[3], scores, rtol=1e-4, atol=1e-4)
