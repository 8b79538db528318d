"""What the lowering binds fx nodes to: an activation buffer, the symbolic batch size, a model
constant, or a result the executable does not compute."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Tensor:
    buffer: int


class _Batch:
    """The batch size (x.size(0), x.shape[0]): symbolic, so the executable takes any batch."""

    def __repr__(self) -> str:
        return "<batch>"


_BATCH = _Batch()
_NOT_CONSTANT = object()  # fold_constant's "this node depends on a model input"


@dataclass(frozen=True)
class _Param:
    """A tensor attribute (get_attr): only usable where an op takes a parameter (layer_norm)."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class _NotComputed:
    """A result the executable does not compute (e.g. MultiheadAttention's attention weights):
    fine while unused, an error once an op reads it."""

    what: str
