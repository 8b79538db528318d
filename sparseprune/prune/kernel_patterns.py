"""Intra-kernel pattern pruning (PatDNN-style) and connectivity pruning for conv weights.

Every k x k kernel weight[o, i] keeps only the positions of one of a few patterns (sets of
`pattern_size` positions of the kernel grid) shared by the whole layer, so a kernel can run
each pattern as a fixed, dense little stencil. Optionally a share of whole kernels goes too
(connectivity pruning).

How the patterns are chosen (`PatternPruning`): every surviving kernel nominates the set of its
`pattern_size` highest-scoring positions (squared weights by default), the `n_patterns` sets
nominated most often become the layer's patterns, and each kernel gets the pattern that keeps
the most of its score (its squared L2 norm). Then the kernels whose kept part has the lowest
norm are dropped until `connectivity` of all kernels are empty.

`PatternAssignment` records the patterns and which kernel uses which; it is what a pattern
kernel needs, and `pattern_assignment_from_weight` recovers one from any weight's zeros.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from sparseprune.prune.amount import Amount
from sparseprune.prune.importance import squared_magnitude
from sparseprune.prune.methods import PruningMethod, _apply_keep, drop_lowest


@dataclass(frozen=True, eq=False)
class PatternAssignment:
    """The kernel patterns of a conv weight [out, in / groups, kh, kw] and who uses which.

    patterns: bool [P, kh * kw]; row p is pattern p over the kernel positions in row-major
        order (position r * kw + c is weight[o, i, r, c]).
    assignment: int64 [out, in / groups]; the pattern index of kernel weight[o, i], or -1 for
        a kernel with no nonzero left (a dropped connection). A kernel's nonzero positions are
        a subset of its pattern (equal unless some kept weights are exactly 0).
    kernel_size: (kh, kw).
    """

    patterns: Tensor
    assignment: Tensor
    kernel_size: Tuple[int, int]

    def __post_init__(self) -> None:
        kh, kw = self.kernel_size
        if self.patterns.dtype != torch.bool or self.patterns.dim() != 2 or self.patterns.shape[1] != kh * kw:
            raise ValueError(f"patterns must be a bool tensor [P, {kh * kw}], got {self.patterns.dtype} "
                             f"{tuple(self.patterns.shape)}")
        if self.assignment.dtype != torch.int64 or self.assignment.dim() != 2:
            raise ValueError(f"assignment must be an int64 tensor [out, in], got {self.assignment.dtype} "
                             f"{tuple(self.assignment.shape)}")
        a = self.assignment
        if a.numel() and not (-1 <= int(a.min()) and int(a.max()) < self.n_patterns):
            raise ValueError(f"assignment indices must be in [-1, {self.n_patterns})")

    @property
    def n_patterns(self) -> int:
        return int(self.patterns.shape[0])

    def counts(self) -> Tensor:
        """How many kernels use each pattern, int64 [P]."""
        used = self.assignment[self.assignment >= 0]
        return torch.bincount(used, minlength=self.n_patterns)

    def mask(self) -> Tensor:
        """The bool mask [out, in / groups, kh, kw] this assignment keeps."""
        out, cin = self.assignment.shape
        kh, kw = self.kernel_size
        table = torch.cat([self.patterns, self.patterns.new_zeros(1, kh * kw)])  # index -1: empty
        return table[self.assignment].reshape(out, cin, kh, kw)

    def __repr__(self) -> str:
        return (f"PatternAssignment(n_patterns={self.n_patterns}, kernel_size={self.kernel_size}, "
                f"kernels={tuple(self.assignment.shape)}, empty={int((self.assignment < 0).sum())})")


def _check_positive_int(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{arg} must be an int >= 1, got {value}")
    return int(value)


def _most_frequent_rows(rows: Tensor, k: int) -> Tensor:
    """The (at most) k most frequent distinct rows of a bool matrix, most frequent first.

    Ties go to the row that sorts first (torch.unique's order), so the choice is deterministic.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros((0, rows.shape[1]))
    uniq, counts = torch.unique(rows.to(torch.uint8), dim=0, return_counts=True)
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    return uniq[order].bool()


class PatternPruning(PruningMethod):
    """Keep `pattern_size` positions of every kernel, from the layer's best `n_patterns` patterns.

    Scores are per entry (squared weights by default; they should be >= 0). `amount` is the
    connectivity: the share (or count) of whole kernels that end up empty, the lowest kept norm
    going first after the patterns are applied; kernels empty before count towards it.
    Positions masked before stay masked and score nothing. `prune` also returns the
    `PatternAssignment`; `compute_mask` only the mask.
    """

    unit = "kernels"
    elementwise = False

    def __init__(self, n_patterns: int = 4, pattern_size: int = 4) -> None:
        self.n_patterns = _check_positive_int(n_patterns, "n_patterns")
        self.pattern_size = _check_positive_int(pattern_size, "pattern_size")

    def importance(self, weight: Tensor) -> Tensor:
        return squared_magnitude(weight)

    def check_shape(self, shape: torch.Size, name: str) -> None:
        if len(shape) != 4:
            raise ValueError(f"pattern pruning needs a 4-D conv weight; {name!r} has shape {tuple(shape)}")
        positions = int(shape[2]) * int(shape[3])
        if positions < 2:
            raise ValueError(f"pattern pruning needs kernels of at least 2 positions; {name!r} has "
                             f"kernel size {tuple(shape[2:])}")
        if self.pattern_size > positions:
            raise ValueError(f"pattern_size={self.pattern_size} is more than the {positions} positions "
                             f"of a {tuple(shape[2:])} kernel")

    def prune(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tuple[Tensor, PatternAssignment]:
        """(new mask, PatternAssignment) for a conv weight's `mask` and per-entry `scores`."""
        self.check_shape(mask.shape, "mask")
        if tuple(scores.shape) != tuple(mask.shape):
            raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {tuple(mask.shape)}")
        out, cin, kh, kw = (int(d) for d in mask.shape)
        kk = kh * kw
        alive = (mask != 0).reshape(out * cin, kk)
        s = scores.detach().to(device=alive.device)
        s = s.to(torch.promote_types(s.dtype, torch.float32)).reshape(out * cin, kk)
        if torch.isnan(s).any():
            raise ValueError("scores contain NaN (is the weight finite?)")
        s = torch.where(alive, s, torch.zeros_like(s))
        kernel_alive = alive.any(dim=1)

        # Each surviving kernel nominates its top positions; the most nominated sets win.
        top = torch.sort(s[kernel_alive], dim=1, descending=True, stable=True).indices[:, : self.pattern_size]
        nominated = torch.zeros(top.shape[0], kk, dtype=torch.bool, device=s.device)
        nominated.scatter_(1, top, True)
        patterns = _most_frequent_rows(nominated, self.n_patterns)

        # Each kernel takes the pattern that keeps the most of its score (first one on ties).
        if patterns.shape[0]:
            choice = (s @ patterns.to(s.dtype).T).argmax(dim=1)
            keep = patterns[choice] & alive
        else:
            choice = torch.full((out * cin,), -1, dtype=torch.int64, device=s.device)
            keep = torch.zeros_like(alive)

        # Connectivity: drop whole kernels, lowest kept norm first.
        kept_score = (s * keep).sum(dim=1)
        keep &= drop_lowest(kept_score, keep.any(dim=1), amount, self.unit).unsqueeze(1)

        assignment = torch.where(keep.any(dim=1), choice, torch.full_like(choice, -1)).reshape(out, cin)
        record = PatternAssignment(patterns.cpu(), assignment.cpu(), (kh, kw))
        return _apply_keep(mask, keep.reshape(mask.shape).to(mask.device)), record

    def compute_mask(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tensor:
        return self.prune(scores, mask, amount)[0]

    def __repr__(self) -> str:
        return f"PatternPruning(n_patterns={self.n_patterns}, pattern_size={self.pattern_size})"


def pattern_assignment_from_weight(
    weight: Union[Tensor, np.ndarray],
    max_patterns: Optional[int] = None,
    merge_subsets: bool = True,
) -> PatternAssignment:
    """The kernel patterns a conv weight [out, in / groups, kh, kw] actually uses, from its zeros.

    The patterns are the distinct sets of nonzero positions among the non-empty kernels, most
    used first (ties in torch.unique's order); empty kernels get -1. With `merge_subsets` (the
    default), a set that is a strict subset of another used set is not a pattern of its own: its
    kernels take the most used of its maximal supersets (running a kernel with a few extra zero
    taps is exact), so stray zeros inside pattern-pruned kernels do not multiply the patterns.
    Raises ValueError naming `max_patterns` if more patterns than that remain.
    """
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or numpy array, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D conv weight [out, in, kh, kw], got shape {tuple(weight.shape)}")
    if max_patterns is not None:
        max_patterns = _check_positive_int(max_patterns, "max_patterns")
    out, cin, kh, kw = (int(d) for d in weight.shape)
    nz = (weight.detach() != 0).reshape(out * cin, kh * kw).cpu()
    nonempty = nz.any(dim=1)
    assignment = torch.full((out * cin,), -1, dtype=torch.int64)
    if not bool(nonempty.any()):
        return PatternAssignment(nz.new_zeros((0, kh * kw)), assignment.reshape(out, cin), (kh, kw))
    uniq, inverse, counts = torch.unique(nz[nonempty].to(torch.uint8), dim=0, return_inverse=True, return_counts=True)
    uniq = uniq.bool()
    target = torch.arange(uniq.shape[0])  # which distinct set each distinct set is run as
    if merge_subsets and uniq.shape[0] > 1:
        u = uniq.to(torch.float32)
        sizes = u.sum(dim=1)
        n = uniq.shape[0]
        chunks = [range(start, min(start + 1024, n)) for start in range(0, n, 1024)]

        def strict_supersets(rows: range) -> Tensor:  # [len(rows), n]: set b strictly contains set a
            sub = u[rows.start : rows.stop]
            size = sizes[rows.start : rows.stop, None]
            return ((sub @ u.T) == size) & (sizes[None, :] > size)

        maximal = torch.cat([~strict_supersets(rows).any(dim=1) for rows in chunks])
        for rows in chunks:
            sup = strict_supersets(rows) & maximal[None, :]
            best = torch.where(sup, counts[None, :], torch.full_like(counts, -1)[None, :]).argmax(dim=1)
            has = sup.any(dim=1)
            target[rows.start : rows.stop] = torch.where(has, best, target[rows.start : rows.stop])
    used, remap = torch.unique(target, return_inverse=True)
    merged_counts = torch.bincount(remap, weights=counts.to(torch.float64), minlength=used.numel())
    order = torch.sort(merged_counts, descending=True, stable=True).indices
    patterns = uniq[used[order]]
    if max_patterns is not None and patterns.shape[0] > max_patterns:
        raise ValueError(f"the weight uses {patterns.shape[0]} kernel patterns, more than max_patterns={max_patterns}")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    assignment[nonempty] = rank[remap[inverse]]
    return PatternAssignment(patterns, assignment.reshape(out, cin), (kh, kw))

