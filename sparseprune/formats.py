"""Dense weight matrices to the sparse formats the native kernels run (CSR and block-sparse).

Pure numpy: these run once per layer at conversion time, and also without torch at load time.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from sparseprune._native import PackedLinear, aligned

# Block shapes (rows x cols) with compiled kernels; keep in sync with csrc/kernels/bsr_shapes.h.
BLOCK_SHAPES: Tuple[Tuple[int, int], ...] = ((1, 4), (4, 1), (8, 1))


class SparseArrays(NamedTuple):
    indptr: np.ndarray  # int64 [n_row_groups + 1]
    indices: np.ndarray  # int64 [n_stored_groups]
    values: np.ndarray  # float32 [n_stored_groups * block_rows * block_cols]


def _as_matrix(weight: np.ndarray) -> np.ndarray:
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a numpy array, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {weight.shape}")
    if weight.dtype != np.float32:
        raise TypeError(f"weight must be float32, got {weight.dtype}")
    return weight


def csr_arrays(weight: np.ndarray) -> SparseArrays:
    """CSR of the nonzeros of a 2-D float32 matrix (explicit zeros are dropped)."""
    w = _as_matrix(weight)
    nonzero = w != 0
    indptr = np.zeros(w.shape[0] + 1, dtype=np.int64)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    rows, cols = np.nonzero(nonzero)
    return SparseArrays(indptr, cols.astype(np.int64), np.ascontiguousarray(w[rows, cols]))


def _blocked(w: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    """The matrix zero-padded to whole blocks, as [block_row, block_col, c, r]."""
    n_rows, n_cols = w.shape
    pr = -n_rows % block_rows
    pc = -n_cols % block_cols
    padded = np.pad(w, ((0, pr), (0, pc))) if (pr or pc) else w
    nbr, nbc = padded.shape[0] // block_rows, padded.shape[1] // block_cols
    # [nbr, R, nbc, C] -> [nbr, nbc, C, R]: column-major inside a block, as the kernel reads it.
    return padded.reshape(nbr, block_rows, nbc, block_cols).transpose(0, 2, 3, 1)


def bsr_arrays(weight: np.ndarray, block_rows: int, block_cols: int) -> SparseArrays:
    """Block-sparse rows: every block holding at least one nonzero is stored whole."""
    w = _as_matrix(weight)
    if (block_rows, block_cols) not in BLOCK_SHAPES:
        raise ValueError(f"block shape {(block_rows, block_cols)} is not one of {BLOCK_SHAPES}")
    blocks = _blocked(w, block_rows, block_cols)
    keep = (blocks != 0).any(axis=(2, 3))
    indptr = np.zeros(blocks.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    brow, bcol = np.nonzero(keep)
    values = np.ascontiguousarray(blocks[brow, bcol].reshape(-1))
    return SparseArrays(indptr, bcol.astype(np.int64), values)


def block_fill(weight: np.ndarray, block_rows: int, block_cols: int) -> float:
    """Nonzeros / values stored by the block format: 1.0 means the blocks hold no padding zeros."""
    w = _as_matrix(weight)
    nnz = int(np.count_nonzero(w))
    if nnz == 0:
        return 1.0
    blocks = _blocked(w, block_rows, block_cols)
    n_blocks = int((blocks != 0).any(axis=(2, 3)).sum())
    return nnz / (n_blocks * block_rows * block_cols)


def pack(
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    fmt: str = "csr",
    block: Tuple[int, int] = (1, 1),
) -> PackedLinear:
    """A native PackedLinear for `weight` [out, in] (and `bias` [out] or None)."""
    w = _as_matrix(weight)
    if bias is not None:
        bias = aligned(np.ascontiguousarray(bias, dtype=np.float32))
    if fmt == "csr":
        arrays, block = csr_arrays(w), (1, 1)
    elif fmt == "bsr":
        arrays = bsr_arrays(w, *block)
    else:
        raise ValueError(f"fmt must be 'csr' or 'bsr', got {fmt!r}")
    return PackedLinear(fmt, block[0], block[1], w.shape[0], w.shape[1], *arrays, bias)


def unpack(packed: PackedLinear) -> np.ndarray:
    """The dense float32 weight a PackedLinear holds (for checks and for going back)."""
    n_rows, n_cols = packed.shape
    r, c = packed.block_shape
    nbr, nbc = -(-n_rows // r), -(-n_cols // c)
    indptr, indices, values = packed.indptr, packed.indices, packed.values
    dense = np.zeros((nbr, nbc, c, r), dtype=np.float32)
    block_row = np.repeat(np.arange(nbr), np.diff(indptr))
    dense[block_row, indices] = values.reshape(-1, c, r)
    return dense.transpose(0, 3, 1, 2).reshape(nbr * r, nbc * c)[:n_rows, :n_cols].copy()


class ConvArrays(NamedTuple):
    row_ptr: np.ndarray  # int64 [out_channels + 1]
    taps: np.ndarray  # int64 [nnz]: (i * kh + dy) * kw + dx, i within the group
    values: np.ndarray  # float32 [nnz]


def conv_arrays(weight: np.ndarray) -> ConvArrays:
    """Per-output-channel sparse rows of a conv weight [out, in/groups, kh, kw] (zeros dropped)."""
    if not isinstance(weight, np.ndarray) or weight.ndim != 4:
        raise ValueError(f"weight must be a 4-D numpy array, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != np.float32:
        raise TypeError(f"weight must be float32, got {weight.dtype}")
    rows = _as_matrix(np.ascontiguousarray(weight.reshape(weight.shape[0], -1)))
    arrays = csr_arrays(rows)
    return ConvArrays(arrays.indptr, arrays.indices, arrays.values)
