"""Importance scores: how much each entry (or block) of a weight matters. Low scores are pruned first.

A score function takes the effective weight (the original values times the current mask, so
entries pruned earlier count as zero) and returns a tensor: one score per entry for unstructured
methods, one per block for block methods. Scores never carry gradients.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

Block = Tuple[int, int]


def l1_magnitude(weight: Tensor) -> Tensor:
    """|w| for every entry."""
    return weight.detach().abs()


def random_scores(weight: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform [0, 1) scores of the weight's shape: pruning the lowest is pruning at random.

    Drawn from `generator` (on its own device, then moved to the weight's) or torch's global RNG.
    """
    if generator is None:
        return torch.rand(weight.shape, device=weight.device)
    return torch.rand(weight.shape, generator=generator, device=generator.device).to(weight.device)


def check_block(block: object) -> Block:
    """The block shape as (rows, cols) of positive ints, or TypeError/ValueError naming `block`."""
    if not isinstance(block, Sequence) or isinstance(block, str) or len(block) != 2:
        raise TypeError(f"block must be a (rows, cols) pair of ints, got {block!r}")
    if not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in block):
        raise TypeError(f"block must be a (rows, cols) pair of ints, got {block!r}")
    rows, cols = int(block[0]), int(block[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"block sizes must be >= 1, got {block!r}")
    return rows, cols


def block_grid(shape: Sequence[int], block: Block) -> Tuple[int, int]:
    """Number of (block rows, block cols) covering a 2-D shape; edge blocks may be partial."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def block_view(t: Tensor, block: Block) -> Tensor:
    """A 2-D tensor zero-padded to whole blocks, viewed as [block_row, r, block_col, c]."""
    rows, cols = t.shape
    nbr, nbc = block_grid(t.shape, block)
    padded = torch.nn.functional.pad(t, (0, nbc * block[1] - cols, 0, nbr * block[0] - rows))
    return padded.reshape(nbr, block[0], nbc, block[1])


def block_l2(weight: Tensor, block: Block) -> Tensor:
    """The L2 norm of every block of a 2-D weight, shape [ceil(rows / r), ceil(cols / c)].

    `block` is (r, c): r consecutive rows (output features of a Linear) by c consecutive columns
    (input features). When the shape is not a multiple of the block, the last blocks are partial
    and their norm is over the entries they have (so they tend to rank low). Computed in at
    least float32.
    """
    block = check_block(block)
    w = weight.detach()
    if w.dim() != 2:
        raise ValueError(f"block_l2 needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.is_floating_point():
        w = w.to(torch.promote_types(w.dtype, torch.float32))
    else:
        w = w.to(torch.float32)
    return block_view(w, block).square().sum(dim=(1, 3)).sqrt()


# ---------------------------------------------------------------------------------------------
# Structured scores: one per filter, channel, row or kernel.

NORMS = ("l1", "l2")


def check_norm(norm: object, arg: str = "norm") -> str:
    """`norm` if it is "l1" or "l2", else TypeError/ValueError naming `arg`."""
    if not isinstance(norm, str):
        raise TypeError(f"{arg} must be one of {NORMS}, got {type(norm).__name__} {norm!r}")
    if norm not in NORMS:
        raise ValueError(f"{arg} must be one of {NORMS}, got {norm!r}")
    return norm


def _at_least_float32(w: Tensor) -> Tensor:
    if w.is_floating_point():
        return w.to(torch.promote_types(w.dtype, torch.float32))
    return w.to(torch.float32)


def slice_norm(weight: Tensor, dims: Sequence[int], norm: str = "l2") -> Tensor:
    """The L1 or L2 norm of every slice of `weight` along `dims`, reducing all the other dims.

    Shape `[weight.shape[d] for d in sorted(dims)]`: dims=(0,) scores the filters of a conv
    weight [out, in, kh, kw] (or the rows of a Linear weight), (1,) its input channels, (0, 1)
    its k x k kernels. Computed in at least float32.
    """
    norm = check_norm(norm)
    w = _at_least_float32(weight.detach())
    keep = sorted({int(d) % w.dim() for d in dims})
    reduce = tuple(d for d in range(w.dim()) if d not in keep)
    w = w.abs() if norm == "l1" else w.square()
    if reduce:
        w = w.sum(dim=reduce)
    return w if norm == "l1" else w.sqrt()


def filter_norm(weight: Tensor, norm: str = "l1") -> Tensor:
    """L1/L2 norm of each output filter weight[o] (each row of a Linear weight), shape [out]."""
    return slice_norm(weight, (0,), norm)


def kernel_norm(weight: Tensor, norm: str = "l2") -> Tensor:
    """L1/L2 norm of each k x k kernel weight[o, i] of a conv weight, shape [out, in / groups]."""
    return slice_norm(weight, (0, 1), norm)


def squared_magnitude(weight: Tensor) -> Tensor:
    """w ** 2 for every entry (in at least float32): the energy a pattern keeps adds up."""
    return _at_least_float32(weight.detach()).square()
