"""Structured pruning methods: drop whole filters, input channels, rows or kernels.

Each method prunes slices of a weight along some of its dims (`dims`): dims=(0,) are the output
filters of a conv weight [out, in, kh, kw] or the output rows (units) of a Linear weight
[out, in], (1,) the input channels of a conv, (0, 1) its k x k kernels weight[o, i]. Scores have
one entry per slice (shape `[weight.shape[d] for d in dims]`, by default the slice's L1 or L2
norm from `sparseprune.prune.importance.slice_norm`); an int amount counts slices, a float is a
fraction of all of them. A slice counts as already pruned when its mask is all zeros; entries
zeroed earlier inside a surviving slice stay zero.

The methods only mask the weight they are given. The layer-aware one-liners in
`sparseprune.prune.layers` (`filters`, `units`, ...) also mask what goes with an output channel:
the bias entry and the following BatchNorm's scale and shift.

`global_keep` ranks slices of several layers together, after normalising each layer's scores,
and never empties a layer (see there).
"""
from __future__ import annotations

import functools
import numbers
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from sparseprune.prune.amount import Amount, amount_to_count, check_amount
from sparseprune.prune.api import Importance, _check_pairs, _scores
from sparseprune.prune.importance import check_norm, slice_norm
from sparseprune.prune.methods import PruningMethod, _apply_keep, drop_lowest
from sparseprune.prune.reparam import effective_weight, install_mask, parameter_state


class StructuredPruning(PruningMethod):
    """Drop whole slices of a weight along `dims`, lowest score (L1 or L2 norm) first.

    Subclasses set `dims`, the weight rank they accept (`ndim`), `unit` (what an int amount
    counts) and `layer` (the layer type, for messages). `norm` ("l1" or "l2") picks the default
    importance.
    """

    elementwise = False
    unit = "slices"
    dims: Tuple[int, ...] = (0,)
    ndim: int = 2
    layer: str = "a layer"
    default_norm: str = "l1"

    def __init__(self, norm: Optional[str] = None) -> None:
        self.norm = check_norm(self.default_norm if norm is None else norm)

    def importance(self, weight: Tensor) -> Tensor:
        return slice_norm(weight, self.dims, self.norm)

    def check_shape(self, shape: torch.Size, name: str) -> None:
        if len(shape) != self.ndim:
            raise ValueError(
                f"{type(self).__name__} prunes {self.unit} of {self.layer} ({self.ndim}-D weight); "
                f"{name!r} has shape {tuple(shape)}"
            )

    def score_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """The shape of the scores (one per slice) for a weight of `shape`."""
        return tuple(int(shape[d]) for d in self.dims)

    def alive(self, mask: Tensor) -> Tensor:
        """Bool, one per slice: whether any entry of the slice is still unmasked."""
        self.check_shape(mask.shape, "mask")
        nz = mask != 0
        for d in reversed(range(mask.dim())):
            if d not in self.dims:
                nz = nz.any(dim=d)
        return nz

    def expand(self, keep: Tensor, shape: Sequence[int]) -> Tensor:
        """A per-slice bool `keep` broadcast to the weight's `shape`."""
        view = [int(shape[d]) if d in self.dims else 1 for d in range(len(shape))]
        return keep.reshape(view).expand(*shape)

    def compute_mask(self, scores: Tensor, mask: Tensor, amount: Amount) -> Tensor:
        alive = self.alive(mask)
        if tuple(scores.shape) != tuple(alive.shape):
            raise ValueError(
                f"scores for {self.unit} have shape {tuple(scores.shape)}, expected {tuple(alive.shape)}"
            )
        keep = drop_lowest(scores, alive, amount, self.unit)
        return _apply_keep(mask, self.expand(keep, mask.shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r})"


class FilterPruning(StructuredPruning):
    """Drop whole output filters weight[o] of a conv weight [out, in / groups, kh, kw].

    The output channel o then computes only its bias (`sparseprune.prune.filters` masks that too).
    """

    unit = "filters"
    dims = (0,)
    ndim = 4
    layer = "nn.Conv2d"
    default_norm = "l1"


class ChannelPruning(StructuredPruning):
    """Drop whole input channels weight[:, i] of a conv weight [out, in, kh, kw] (groups=1)."""

    unit = "channels"
    dims = (1,)
    ndim = 4
    layer = "nn.Conv2d"
    default_norm = "l1"


class UnitPruning(StructuredPruning):
    """Drop whole output rows weight[o] (neurons) of a Linear weight [out, in]."""

    unit = "units"
    dims = (0,)
    ndim = 2
    layer = "nn.Linear"
    default_norm = "l2"


class KernelPruning(StructuredPruning):
    """Drop whole k x k kernels weight[o, i] of a conv weight [out, in / groups, kh, kw]."""

    unit = "kernels"
    dims = (0, 1)
    ndim = 4
    layer = "nn.Conv2d"
    default_norm = "l2"


# ---------------------------------------------------------------------------------------------
# Ranking slices of several layers together

NORMALIZE = ("mean", None)


def check_normalize(normalize: object) -> Optional[str]:
    if normalize is not None and not isinstance(normalize, str):
        raise TypeError(f"normalize must be 'mean' or None, got {type(normalize).__name__}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'mean' or None, got {normalize!r}")
    return normalize


def check_min_keep(min_keep: object) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Integral):
        raise TypeError(f"min_keep must be an int >= 0, got {type(min_keep).__name__} {min_keep!r}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep}")
    return int(min_keep)


def normalize_scores(scores: Tensor, alive: Tensor, normalize: Optional[str]) -> Tensor:
    """One layer's slice scores, made comparable with other layers'.

    "mean": divided by the mean score of the layer's surviving slices, so a layer's typical
    slice scores 1 whatever the scale of its weights (layers with many inputs or large weights
    do not keep everything, layers with small weights do not lose everything). A layer whose
    surviving slices all score 0 (or with none surviving) is left as is. None: raw scores.
    """
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    if normalize is None:
        return scores
    live = scores[alive.to(scores.device)]
    mean = live.mean() if live.numel() else scores.new_zeros(())
    if not torch.isfinite(mean) or mean == 0:
        return scores
    return scores / mean


def global_keep(
    alive: Sequence[Tensor],
    scores: Sequence[Tensor],
    amount: Amount,
    unit: str = "slices",
    normalize: Optional[str] = "mean",
    min_keep: int = 1,
) -> List[Tensor]:
    """Which slices of several layers survive one ranking over all of them.

    `alive[j]` (bool) and `scores[j]` are layer j's slices. Scores are normalised per layer
    (`normalize_scores`), then the lowest go first across all layers until `amount` of all the
    slices together are pruned (pruned ones count). Each layer keeps its `min_keep` best
    surviving slices whatever the amount: the target is capped, so amount=1.0 leaves exactly
    `min_keep` slices in each layer that had that many (a layer emptied earlier stays empty).
    Returns a bool keep tensor per layer.
    """
    check_amount(amount)
    normalize = check_normalize(normalize)
    min_keep = check_min_keep(min_keep)
    if len(alive) != len(scores) or not alive:
        raise ValueError("global_keep needs one score tensor per layer, and at least one layer")
    device = alive[0].device
    flat_alive, flat_scores, flat_protected = [], [], []
    for j, (a, s) in enumerate(zip(alive, scores)):
        if tuple(s.shape) != tuple(a.shape):
            raise ValueError(f"scores of layer {j} have shape {tuple(s.shape)}, expected {tuple(a.shape)}")
        s = normalize_scores(s, a, normalize).reshape(-1).to(device)
        if torch.isnan(s).any():
            raise ValueError(f"scores of layer {j} contain NaN (is the weight finite?)")
        a = a.reshape(-1).to(device)
        protected = torch.zeros_like(a)
        idx = a.nonzero().squeeze(1)
        if min_keep and idx.numel():
            best = torch.sort(s[idx], descending=True, stable=True).indices[:min_keep]
            protected[idx[best]] = True
        flat_alive.append(a)
        flat_scores.append(s)
        flat_protected.append(protected)
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in flat_scores])
    all_scores = torch.cat([s.to(dtype) for s in flat_scores])
    all_alive = torch.cat(flat_alive)
    protected = torch.cat(flat_protected)
    total = all_alive.numel()
    target = amount_to_count(amount, total, unit)
    # The protected slices are handed to drop_lowest as if dead (so never dropped); raising
    # the target by their number keeps the count of the others right.
    n_protected = int(protected.sum())
    keep = drop_lowest(all_scores, all_alive & ~protected, min(target + n_protected, total), unit)
    keep |= protected
    return [k.reshape(a.shape).to(a.device) for k, a in zip(torch.split(keep, [a.numel() for a in alive]), alive)]


def prune_global_structured(
    targets: Iterable[Tuple[nn.Module, str]],
    method: StructuredPruning,
    amount: Amount,
    importance: Union[Importance, Sequence[Tensor]] = None,
    normalize: Optional[str] = "mean",
    min_keep: int = 1,
) -> List[Tuple[nn.Module, str]]:
    """Prune slices of several parameters with one ranking (see `global_keep`); returns the pairs.

    `amount` is a share (or count) of all their slices together. `importance` is None (the
    method's scores), a callable taking each effective weight, or a sequence of score tensors,
    one per pair. Only the listed parameters are masked (the layer one-liners also mask biases).
    """
    if not isinstance(method, StructuredPruning):
        raise TypeError(f"method must be a StructuredPruning method, got {type(method).__name__}")
    check_amount(amount)
    pairs = _check_pairs(targets)
    states = [parameter_state(module, name) for module, name in pairs]
    for (_, name), (orig, _) in zip(pairs, states):
        method.check_shape(orig.shape, name)
    if isinstance(importance, (list, tuple)):
        if len(importance) != len(pairs):
            raise ValueError(f"importance holds {len(importance)} score tensors for {len(pairs)} parameters")
        scores = [s.detach() for s in importance]
    else:
        scores = [_scores(method, importance, effective_weight(o, m)) for o, m in states]
    keeps = global_keep([method.alive(m) for _, m in states], scores, amount, method.unit, normalize, min_keep)
    description = f"global {method!r}, amount={amount!r} over {len(pairs)} tensors"
    new_masks = [_apply_keep(m, method.expand(k, m.shape)) for (_, m), k in zip(states, keeps)]
    for (module, name), new in zip(pairs, new_masks):
        install_mask(module, name, new, description)
    return pairs
