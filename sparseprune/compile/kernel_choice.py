"""Spec arrays for each storage format of a weight, and one-op native plans that time a format
exactly as the executor runs it (compile's kernel choice by measurement)."""
from __future__ import annotations

import json
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from sparseprune import formats
from sparseprune._native import _C
from sparseprune.runtime.spec import SPEC_FORMAT, SPEC_VERSION

# The "threshold" policy for convolutions: the direct sparse kernel from this sparsity, the dense
# im2col GEMM below it. On the reference machine (2 threads, ResNet-18 3x3 layers at batch 1) the
# sparse kernel takes ~1.3x the dense GEMM's time on dense weights and ~0.6x at 70% sparsity;
# they cross near 40-50%.
CONV_SPARSITY_THRESHOLD = 0.5


def _compressed_arrays(name: str, keys: Tuple[str, str], pointers, indices, values, bias) -> Dict[str, np.ndarray]:
    """Spec arrays of a compressed-row weight: int64 row pointers, int32 indices (when they fit),
    float32 values and the optional bias, under `name`.<keys[0]> / `name`.<keys[1]> / ..."""
    arrays = {f"{name}.{keys[0]}": np.ascontiguousarray(pointers, dtype=np.int64),
              f"{name}.{keys[1]}": _small_indices(indices),
              f"{name}.values": np.ascontiguousarray(values, dtype=np.float32)}
    if bias is not None:
        arrays[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    return arrays


def _sparse_arrays(name: str, indptr, indices, values, bias) -> Dict[str, np.ndarray]:
    return _compressed_arrays(name, ("indptr", "indices"), indptr, indices, values, bias)


def _linear_format_arrays(name: str, weight: np.ndarray, bias, fmt: str, block) -> Dict[str, np.ndarray]:
    """The spec arrays of a linear weight stored as `fmt` (dense, csr or bsr)."""
    if fmt == "dense":
        arrays = {f"{name}.weight": np.ascontiguousarray(weight, dtype=np.float32)}
        if bias is not None:
            arrays[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
        return arrays
    packed = formats.csr_arrays(weight) if fmt == "csr" else formats.bsr_arrays(weight, *block)
    return _sparse_arrays(name, *packed, bias)


def _conv_sparse_arrays(name: str, row_ptr, taps, values, bias) -> Dict[str, np.ndarray]:
    return _compressed_arrays(name, ("row_ptr", "taps"), row_ptr, taps, values, bias)


# kernel name -> spec format
_CONV_FORMATS = {"sparse-conv": "sparse", "pattern-conv": "pattern", "depthwise-conv": "depthwise", "dense-conv": "dense"}


def _one_conv_plan(arrays: Dict[str, np.ndarray], name: str, fields: Dict[str, Any], fmt: str,
                   in_shape: Sequence[int]):
    """A native plan of this one convolution, for timing a kernel exactly as the executor runs it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = fields["kernel"], fields["stride"], fields["padding"], fields["dilation"]
    out_shape = [fields["out_channels"], (in_shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                 (in_shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1]
    op = {"op": "conv2d", "in": 0, "out": 1, "weight": name, **fields, "format": fmt}
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "buffers": [{"shape": list(in_shape)}, {"shape": out_shape}],
            "inputs": [0], "outputs": [1], "ops": [op]}
    return _C.Plan(json.dumps(spec), arrays)


def _one_linear_plan(arrays: Dict[str, np.ndarray], name: str, fmt: str, block, rows: int, cols: int, has_bias: bool):
    """A native plan of this one linear layer, for timing a format exactly as the executor runs it."""
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "buffers": [{"shape": [cols]}, {"shape": [rows]}],
            "inputs": [0], "outputs": [1],
            "ops": [{"op": "linear", "in": 0, "out": 1, "weight": name, "format": fmt, "block": list(block),
                     "rows": rows, "cols": cols}]}
    return _C.Plan(json.dumps(spec), arrays)


def _small_indices(indices: np.ndarray) -> np.ndarray:
    """Column indices / taps as int32 when they fit (always, for real layers): the file then
    stores 8 bytes per nonzero instead of 12, 20% of the dense weight at 90% sparsity."""
    indices = np.asarray(indices)
    if indices.size == 0 or int(indices.max()) < 2**31:
        return np.ascontiguousarray(indices, dtype=np.int32)
    return np.ascontiguousarray(indices, dtype=np.int64)
