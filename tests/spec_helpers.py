"""Builders and checks shared by the spec tests (test_spec_ops.py, test_spec_ops_broadcast.py):
the native plan against the numpy reference, NaN and inf where the reference has them."""
import numpy as np
import torch

from sparseprune.runtime import Executable, run_reference

F32 = np.float32


def make_spec(buffers, inputs, outputs, ops, **top):
    """A spec dict; a buffer is a shape list or a full buffer object."""
    spec = {"format": "sparseprune.executable", "version": 1,
            "buffers": [b if isinstance(b, dict) else {"shape": list(b)} for b in buffers],
            "inputs": inputs, "outputs": outputs, "ops": ops}
    spec.update(top)
    return spec


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(F32)


def assert_close(got, ref, rtol=1e-5):
    """Within rtol, atol relative to the reference's largest finite magnitude; NaN and inf where
    the reference has them."""
    got = np.asarray(got)
    with np.errstate(over="ignore"):
        ref = np.asarray(ref).astype(F32)  # beyond float32's range is inf, as the plan computes
    assert got.dtype == F32
    assert got.shape == ref.shape
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)].astype(F32))
    scale = max(float(np.abs(ref[finite]).max()) if finite.any() else 0.0, 1.0)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=rtol, atol=rtol * scale)


def run_native(spec, arrays, inputs, n_threads=None):
    got = Executable.from_spec(spec, arrays, n_threads=n_threads).run(*inputs)
    return list(got) if isinstance(got, tuple) else [got]


def check(spec, arrays, inputs, n_threads=None):
    """Native == numpy reference for every output; returns the native outputs."""
    got = run_native(spec, arrays, inputs, n_threads)
    ref = run_reference(spec, arrays, inputs)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert_close(g, r)
    return got


def torch64(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float64))
