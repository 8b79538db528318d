"""The one place that imports the compiled extension, and the conversions every caller needs.

Everything else in sparseprune goes through here, so a missing or broken build fails with one
clear message instead of an ImportError deep inside a model's forward.
"""
from __future__ import annotations

import numpy as np

try:
    from sparseprune import _C  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "sparseprune's native extension (sparseprune._C) is missing or failed to load; "
        "reinstall with `pip install .` from a checkout with a C++17 compiler"
    ) from exc

PackedLinear = _C.PackedLinear
build_info = _C.build_info
set_isa = _C.set_isa
active_isa = _C.active_isa
cpu_has_avx512 = _C.cpu_has_avx512

# The SIMD paths set_isa() can force. Automatic choice: avx512 > avx2 > baseline; avx2_w16 (the
# 16-lane kernel body compiled for AVX2) is a test path, only ever forced.
SIMD_PATHS = ("baseline", "avx2", "avx2_w16", "avx512")


def simd_paths():
    """{path: None when it can run on this CPU and build, else the reason it cannot}, for every
    name in SIMD_PATHS."""
    return {("avx2" if name == "avx2+fma" else name): why for name, why in _C.simd_paths()}
openmp_enabled = _C.openmp_enabled
max_threads = _C.max_threads


def aligned(a: np.ndarray) -> np.ndarray:
    """`a`, or an aligned copy of it when its address or strides are not multiples of its element
    size (np.frombuffer at an odd offset, torch.frombuffer, a view into a byte buffer). The
    bindings refuse misaligned arrays (the kernels' typed loads from them are undefined
    behaviour); every Python entry point passes its arrays through here first."""
    return a if a.flags.aligned else a.copy()
