"""Small builders shared by the spec tests (test_spec_ops.py, test_spec_ops_broadcast.py)."""
import numpy as np

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
