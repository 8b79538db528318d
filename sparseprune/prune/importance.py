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
