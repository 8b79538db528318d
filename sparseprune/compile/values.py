"""What the ATen lowering binds graph nodes to: an activation buffer, a model constant, a result
the executable does not compute, lazy views of activation buffers (a permutation or a broadcast not
yet copied), sizes, and index ramps.

A transpose, a permute or an expand is not copied when it is made: the consumer decides. Attention
reads q/k/v as [seq, heads * dim] directly, an elementwise op broadcasts by itself, and only an
op that needs the logical layout in memory gets a "permute"/"expand" op (AtenLowering.buf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class _Tensor:
    buffer: int


@dataclass(frozen=True)
class _Param:
    """A model constant (a parameter, a buffer, or a value computed from them only)."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class _NotComputed:
    """A result the executable does not compute (e.g. batch norm statistics): fine while unused,
    an error once an op reads it."""

    what: str


Dim = object  # an int, a dim name (str) or [k, name]: see runtime.spec


@dataclass(frozen=True)
class _View:
    """buffer (per-sample shape base) permuted by perm over per-sample axes, then broadcast to shape."""

    buffer: int
    perm: Optional[Tuple[int, ...]] = None   # None = identity
    shape: Optional[Tuple[Dim, ...]] = None  # logical per-sample shape after broadcast; None = no broadcast


@dataclass(frozen=True)
class _Size:
    """A size read off a tensor (aten.sym_size): the batch, a dynamic dim or an int."""

    value: object  # "batch", a dim name, or an int


@dataclass(frozen=True)
class _Ramp:
    """torch.arange(batch) (unsqueezed): the batch index, as advanced indexing uses it to broadcast a
    mask over the batch. axis: where its entries run in its (batch-less) shape."""

    rank: int
    axis: int


@dataclass(frozen=True)
class _Merged:
    """An activation whose batch and leading per-sample dims were flattened into rows
    (x.view(-1, x.size(-1)), as transformers' Conv1D does before addmm): only a matmul with a
    weight and the view back to (batch, ...) may read it."""

    buffer: int
