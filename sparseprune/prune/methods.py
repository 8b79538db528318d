"""Pruning methods: each decides which entries to drop, given importance scores and the current mask.

A method knows nothing about modules. `compute_mask(scores, mask, amount)` returns a new mask
with `amount` as the TOTAL pruned share (not a share of what is left), and it only ever removes
more: entries whose mask is already 0 stay 0 and count towards the target. If the mask already
meets the target, it comes back unchanged. `importance(weight)` is the method's default scoring
(from `sparseprune.prune.importance`); callers may pass other scores of the same shape.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sparseprune.prune.amount import Amount, amount_to_count
from sparseprune.prune.importance import (
    Block,
    block_grid,
    block_l2,
    block_view,
    check_block,
    l1_magnitude,
    random_scores,
)


class PruningMethod(ABC):
    """Base class. Subclasses implement `compute_mask`, and usually `importance`.

    Class attributes:
        unit: what an int amount counts ("entries", "blocks", ...), for messages.
        elementwise: True when scores have the mask's shape (one per entry). Only elementwise
            methods can rank several tensors together (global pruning).
    """

    unit: str = "entries"
    elementwise: bool = True

    def importance(self, weight: Tensor) -> Tensor:
        """Default scores for `weight` (the effective, already-masked values)."""
        return l1_magnitude(weight)

    def check_shape(self, shape: torch.Size, name: str) -> None:
        """Raise ValueError if this method cannot prune a tensor of `shape` (called first)."""

    @abstractmethod
    def compute_mask(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tensor:
        """A new mask (same shape and dtype as `mask`, never 1 where `mask` is 0)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def drop_lowest(scores: Tensor, alive: Tensor, amount: Amount, unit: str = "entries") -> Tensor:
    """Which units stay alive (bool, shape of `alive`) once `amount` of them all are pruned.

    Units already dead count towards the target; the rest are dropped lowest score first, ties
    going to the lowest flat index (a stable sort), so the result is deterministic.
    """
    if scores.shape != alive.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {tuple(alive.shape)}")
    target = amount_to_count(amount, alive.numel(), unit)
    keep = alive.reshape(-1).clone()
    alive_idx = keep.nonzero().squeeze(1)
    n_drop = target - (keep.numel() - alive_idx.numel())
    if n_drop > 0:
        alive_scores = scores.detach().reshape(-1)[alive_idx.to(scores.device)].to(alive.device)
        if torch.isnan(alive_scores).any():
            raise ValueError("scores contain NaN (is the weight finite?)")
        order = torch.sort(alive_scores, stable=True).indices[:n_drop]
        keep[alive_idx[order]] = False
    return keep.reshape(alive.shape)


def _apply_keep(mask: Tensor, keep: Tensor) -> Tensor:
    """`mask` with the entries where `keep` is False set to 0."""
    new = mask.clone(memory_format=torch.contiguous_format)
    new[~keep] = 0
    return new


class MagnitudeUnstructured(PruningMethod):
    """Drop the individual entries with the lowest scores (|w| by default)."""

    def compute_mask(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tensor:
        return _apply_keep(mask, drop_lowest(scores, mask != 0, amount, self.unit))


GeneratorLike = Union[None, int, torch.Generator]


def make_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    """None (torch's global RNG), an int seed (a fresh CPU generator) or a torch.Generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {generator!r}")


class RandomUnstructured(MagnitudeUnstructured):
    """Drop entries uniformly at random among those still alive.

    The rule is MagnitudeUnstructured's (lowest scores go); the default importance is random.
    """

    def __init__(self, generator: GeneratorLike = None):
        self.generator = make_generator(generator)

    def importance(self, weight: Tensor) -> Tensor:
        return random_scores(weight, self.generator)


class BlockMagnitude(PruningMethod):
    """Drop whole (rows x cols) blocks of a 2-D weight, lowest block score (L2 norm) first.

    Scores have one entry per block (shape `block_grid(weight.shape, block)`); an int amount
    counts blocks and a float is a fraction of all blocks, partial edge blocks included. A block
    counts as already pruned when its mask is all zeros; entries zeroed earlier inside a block
    that survives stay zero.
    """

    unit = "blocks"
    elementwise = False

    def __init__(self, block: Sequence[int] = (4, 1)):
        self.block: Block = check_block(block)

    def importance(self, weight: Tensor) -> Tensor:
        return block_l2(weight, self.block)

    def check_shape(self, shape: torch.Size, name: str) -> None:
        if len(shape) != 2:
            raise ValueError(
                f"block pruning needs a 2-D weight (e.g. nn.Linear's); {name!r} has shape "
                f"{tuple(shape)} (use unstructured pruning for conv weights)"
            )

    def compute_mask(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tensor:
        self.check_shape(mask.shape, "mask")
        r, c = self.block
        grid = block_grid(mask.shape, self.block)
        if tuple(scores.shape) != grid:
            raise ValueError(f"block scores have shape {tuple(scores.shape)}, expected {grid}")
        block_alive = block_view(mask != 0, self.block).any(dim=3).any(dim=1)
        block_keep = drop_lowest(scores, block_alive, amount, self.unit)
        keep = block_keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: mask.shape[0], : mask.shape[1]]
        return _apply_keep(mask, keep)

    def __repr__(self) -> str:
        return f"BlockMagnitude(block={self.block})"
