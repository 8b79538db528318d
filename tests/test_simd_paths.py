"""The SIMD paths of the native kernels: how they are named, chosen and forced, and the kernel
families that had no per-path test elsewhere (softmax, layer norm, GEMM tile edges, the direct and
pattern convolutions), each run on every path this CPU can run (the `simd_path` fixture in
conftest.py skips the others with the reason). Sizes straddle the 8- and 16-lane vectors so the
16-lane body's tails are exercised by the avx2_w16 path on any AVX2 machine."""
import numpy as np
import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune import _native
from sparseprune.nn.sparse_conv import SparseConv2d
from spec_helpers import check, make_spec, randn  # tests/spec_helpers.py

LENGTHS = (1, 7, 8, 9, 15, 16, 17, 31, 33, 40)  # around 8- and 16-lane vectors


# --- naming, choice, forcing -------------------------------------------------------------------------


def test_every_path_is_reported_with_why_it_cannot_run():
    paths = _native.simd_paths()
    assert tuple(paths) == _native.SIMD_PATHS
    assert paths["baseline"] is None
    for name, reason in paths.items():
        assert reason is None or (isinstance(reason, str) and reason.startswith(name[:6]))
    info = sp.build_info()
    compiled = info["simd_paths_compiled"].split(",")
    assert compiled[0] == "baseline"
    if _native._C.cpu_has_avx2_fma():
        assert {"avx2+fma", "avx2_w16"} <= set(compiled)
    unavailable = info["simd_paths_unavailable"]
    assert set(unavailable) == {("avx2+fma" if k == "avx2" else k) for k, v in paths.items() if v}


def test_automatic_choice_is_the_widest_runnable_path():
    _native.set_isa("auto")
    paths = _native.simd_paths()
    want = "avx512" if paths["avx512"] is None else "avx2+fma" if paths["avx2"] is None else "baseline"
    assert _native.active_isa() == want
    assert sp.build_info()["simd_path_active"] == want


def test_each_runnable_path_can_be_forced_and_others_are_refused_with_the_reason():
    try:
        for name, reason in _native.simd_paths().items():
            if reason is None:
                _native.set_isa(name)
                assert _native.active_isa() == ("avx2+fma" if name == "avx2" else name)
            else:
                before = _native.active_isa()
                with pytest.raises(ValueError, match=f"isa '{name}' cannot run here"):
                    _native.set_isa(name)
                assert _native.active_isa() == before  # nothing changed
    finally:
        _native.set_isa("auto")
    with pytest.raises(ValueError, match="avx2_w16"):
        _native.set_isa("sse9")


def test_show_config_names_the_paths():
    import io

    out = io.StringIO()
    sp.show_config(file=out)
    text = out.getvalue()
    assert "simd_paths_compiled:" in text and "simd_path_active:" in text and "simd_paths_unavailable:" in text


# --- softmax and layer norm rows ---------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_softmax_rows(rng, simd_path, n):
    spec = make_spec([[5, n], [5, n]], [0], [1], [{"op": "softmax", "in": 0, "out": 1}])
    x = randn(rng, 3, 5, n) * 4
    if n > 1:
        x[0, 1, 0] = -np.inf  # a zero probability
        x[0, 2, n - 1] = 80.0  # one dominant value
    x[1, 3, :] = -30.0  # all equal
    x[2, 4, n // 2] = np.nan  # a NaN makes its row NaN
    check(spec, {}, [x], n_threads=1)
    check(spec, {}, [x], n_threads=2)


@pytest.mark.parametrize("n", LENGTHS)
def test_layernorm_rows(rng, simd_path, n):
    spec = make_spec([[4, n], [4, n]], [0], [1], [{"op": "layernorm", "in": 0, "out": 1, "weight": "ln", "eps": 1e-5}])
    arrays = {"ln.gamma": (rng.random(n) + 0.5).astype(np.float32), "ln.beta": randn(rng, n)}
    x = randn(rng, 3, 4, n) * 3 + 1
    x[1, 2, :] = 7.0  # constant row: variance 0
    x[2, 3, n - 1] = np.nan
    check(spec, arrays, [x], n_threads=2)


# --- GEMM (dense linear) across the 6 x 16 register tile ----------------------------------------------


@pytest.mark.parametrize("rows", (1, 15, 16, 17, 33))
@pytest.mark.parametrize("cols", (1, 16, 19))
def test_dense_linear_tile_edges(rng, simd_path, rows, cols):
    arrays = {"fc.weight": randn(rng, rows, cols), "fc.bias": randn(rng, rows)}
    spec = make_spec([[cols], [rows]], [0], [1], [
        {"op": "linear", "in": 0, "out": 1, "weight": "fc", "format": "dense", "block": [1, 1], "rows": rows,
         "cols": cols}])
    for batch in (1, 5, 6, 7, 13):
        check(spec, arrays, [randn(rng, batch, cols)], n_threads=2)


# --- direct and pattern sparse convolution -----------------------------------------------------------


def _zero_fraction_(conv, fraction, gen):
    with torch.no_grad():
        conv.weight.mul_((torch.rand(conv.weight.shape, generator=gen) >= fraction).float())


@pytest.mark.parametrize("hw", [(5, 8), (4, 4), (8, 8), (7, 7)])  # grids of 40 (8 past 32), 16, 64, 49
@pytest.mark.parametrize("threads", [1, 2])
def test_pointwise_conv_direct_path(simd_path, hw, threads):
    """A 1x1 stride-1 convolution on contiguous images whose grid is whole 8-float vectors writes
    its output in place: a 16-lane path must end a 40-pixel grid with an 8-lane vector."""
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 9, 1)
    _zero_fraction_(conv, 0.5, gen)
    sparse = SparseConv2d.from_dense(conv, num_threads=threads)
    x = torch.randn(2, 6, *hw, generator=gen)
    x[1, 2, 0, 0] = float("inf")  # a non-finite input: dense semantics
    with torch.no_grad():
        got, want = sparse(x), conv(x)
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.allclose(got[finite], want[finite], atol=1e-5)


@pytest.mark.parametrize("hw", [(9, 7), (3, 5), (14, 14)])
def test_pattern_conv(simd_path, hw):
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, stride=1, padding=1)
    sp.prune.patterns(conv, n_patterns=4, pattern_size=4, connectivity=0.5)
    sp.prune.remove(conv)
    sparse = SparseConv2d.from_dense(conv, patterns=True, num_threads=2)
    assert sparse.kernel == "pattern-conv"
    x = torch.randn(2, 8, *hw, generator=gen)
    with torch.no_grad():
        assert torch.allclose(sparse(x), conv(x), atol=1e-5)
