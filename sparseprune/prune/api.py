"""Functional pruning: score, compute masks with a method, install them. Each returns what it pruned.

Everything that can fail (arguments, parameter lookup, scoring, mask computation) runs before
the first mask is installed, so on an error the model is left as it was.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from sparseprune.prune.amount import Amount, amount_to_count, check_amount
from sparseprune.prune.methods import (
    BlockMagnitude,
    GeneratorLike,
    MagnitudeUnstructured,
    PruningMethod,
    RandomUnstructured,
)
from sparseprune.prune.reparam import effective_weight, has_parameter, install_mask, parameter_state

Importance = Union[None, Tensor, Callable[[Tensor], Tensor]]
LayerTypes = Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]


def _check_method(method: object) -> PruningMethod:
    if not isinstance(method, PruningMethod):
        raise TypeError(f"method must be a PruningMethod, got {type(method).__name__}")
    return method


def _scores(method: PruningMethod, importance: Importance, weight: Tensor) -> Tensor:
    if importance is None:
        return method.importance(weight)
    if isinstance(importance, Tensor):
        return importance.detach()
    if callable(importance):
        return importance(weight).detach()
    raise TypeError(f"importance must be None, a Tensor or a callable, got {type(importance).__name__}")


def _check_new_mask(new: object, mask: Tensor, method: PruningMethod) -> Tensor:
    if not isinstance(new, Tensor) or new.shape != mask.shape:
        shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(f"{method!r}.compute_mask returned {shape}, expected shape {tuple(mask.shape)}")
    return new


def prune_parameter(
    module: nn.Module,
    method: PruningMethod,
    amount: Amount,
    name: str = "weight",
    importance: Importance = None,
) -> nn.Module:
    """Prune parameter `name` of `module` with `method` to a total of `amount`; returns `module`.

    `importance` overrides the method's default scores: a tensor of scores, or a callable taking
    the effective (masked) weight. The new mask is combined with the current one (torch's or
    sparseprune's), so entries pruned before stay pruned.
    """
    method = _check_method(method)
    check_amount(amount)
    orig, mask = parameter_state(module, name)
    method.check_shape(orig.shape, name)
    scores = _scores(method, importance, effective_weight(orig, mask))
    new = _check_new_mask(method.compute_mask(scores, mask, amount), mask, method)
    install_mask(module, name, new, f"{method!r}, amount={amount!r}")
    return module


def check_min_kept(min_kept: object) -> float:
    """`min_kept` as a float in [0, 1), else TypeError/ValueError naming it."""
    if isinstance(min_kept, bool) or not isinstance(min_kept, numbers.Real):
        raise TypeError(f"min_kept must be a float in [0, 1) (a share of each layer), got {type(min_kept).__name__}")
    if not 0.0 <= float(min_kept) < 1.0:  # also rejects nan
        raise ValueError(f"min_kept must be in [0, 1) (a share of each layer's entries to keep), got {min_kept!r}")
    return float(min_kept)


def global_masks(
    scores: Sequence[Tensor],
    masks: Sequence[Tensor],
    amount: Amount,
    method: PruningMethod,
    min_kept: float = 0.0,
    labels: Optional[Sequence[str]] = None,
) -> List[Tensor]:
    """New masks from one ranking of all `scores` together (one tensor per mask, same shapes).

    `amount` is a share (or count) of all the entries together. Every tensor keeps at least
    ceil(min_kept * its size) entries (its highest scores among those alive): without a floor a
    global ranking can empty a layer whose scores are on a smaller scale (layer collapse), which
    cuts the network. A UserWarning names every tensor the ranking empties. ValueError when the
    floors alone keep more than `amount` leaves.
    """
    min_kept = check_min_kept(min_kept)
    labels = list(labels) if labels is not None else [f"tensor {i}" for i in range(len(masks))]
    device = masks[0].device
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores] + [torch.float32])
    pieces = []
    protected_count = 0
    for s, m in zip(scores, masks):
        s = s.detach().reshape(-1).to(device=device, dtype=dtype)
        alive = m.reshape(-1).to(device) != 0
        floor = min(math.ceil(min_kept * m.numel()), int(alive.sum()))
        if floor > 0:  # the layer's best `floor` live entries outrank everything
            s = s.clone()
            live_idx = alive.nonzero().squeeze(1)
            best = torch.topk(s[live_idx], floor).indices
            s[live_idx[best]] = math.inf
            protected_count += floor
        pieces.append(s)
    flat_scores = torch.cat(pieces)
    flat_mask = torch.cat([m.reshape(-1).to(device) != 0 for m in masks])
    total = flat_mask.numel()
    left = total - amount_to_count(amount, total, method.unit)
    if protected_count > left:
        raise ValueError(f"min_kept={min_kept} keeps at least {protected_count} entries, but amount={amount!r} "
                         f"leaves {left} of {total}: lower min_kept or amount")
    flat_new = method.compute_mask(flat_scores, flat_mask, amount)
    _check_new_mask(flat_new, flat_mask, method)
    new_masks = []
    emptied = []
    for piece, mask, label in zip(torch.split(flat_new, [m.numel() for m in masks]), masks, labels):
        new = piece.reshape(mask.shape).to(device=mask.device, dtype=mask.dtype)
        if bool((mask != 0).any()) and not bool((new != 0).any()):
            emptied.append(label)
        new_masks.append(new)
    if emptied:
        warnings.warn(f"global pruning to amount={amount!r} removes every entry of {', '.join(emptied)} (layer "
                      "collapse: the network no longer connects its input to its output); pass min_kept (a share "
                      "of each layer to keep, e.g. 0.02) or prune per layer", UserWarning, stacklevel=3)
    return new_masks


def prune_global(
    targets: Iterable[Tuple[nn.Module, str]],
    method: PruningMethod,
    amount: Amount,
    importance: Optional[Callable[[Tensor], Tensor]] = None,
    min_kept: float = 0.0,
    labels: Optional[Sequence[str]] = None,
) -> List[Tuple[nn.Module, str]]:
    """Prune several parameters together: `amount` is a share (or count) of all their entries,
    and one ranking (so one score threshold) runs across them. `method` must be elementwise.
    Each parameter keeps at least `min_kept` of its entries (see `global_masks`, which also warns
    when a parameter would be emptied). Returns the (module, name) pairs pruned.
    """
    method = _check_method(method)
    if not method.elementwise:
        raise ValueError(f"{method!r} scores blocks, not entries: it cannot rank tensors together")
    check_amount(amount)
    min_kept = check_min_kept(min_kept)
    pairs = _check_pairs(targets)
    states = [parameter_state(module, name) for module, name in pairs]
    scores, masks = [], []
    for (module, name), (orig, mask) in zip(pairs, states):
        method.check_shape(orig.shape, name)
        s = _scores(method, importance, effective_weight(orig, mask))
        if s.shape != mask.shape:
            raise ValueError(f"scores for {type(module).__name__}.{name} have shape {tuple(s.shape)}, "
                             f"expected {tuple(mask.shape)}")
        scores.append(s)
        masks.append(mask)
    if labels is None:
        labels = [f"{type(module).__name__}.{name} (#{i})" for i, (module, name) in enumerate(pairs)]
    new_masks = global_masks(scores, masks, amount, method, min_kept, labels)
    description = f"global {method!r}, amount={amount!r} over {len(pairs)} tensors"
    for (module, name), new in zip(pairs, new_masks):
        install_mask(module, name, new, description)
    return pairs


def _check_pairs(targets: object) -> List[Tuple[nn.Module, str]]:
    try:
        pairs = [tuple(t) for t in targets]  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(
            "model_or_params must be an nn.Module or an iterable of (module, name) pairs, "
            f"got {type(targets).__name__}"
        ) from None
    if not pairs:
        raise ValueError("model_or_params holds no (module, name) pairs to prune")
    seen = set()
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], nn.Module) or not isinstance(pair[1], str):
            raise TypeError(f"model_or_params must hold (nn.Module, str) pairs, got {pair!r}")
        key = (id(pair[0]), pair[1])
        if key in seen:
            raise ValueError(f"model_or_params lists {type(pair[0]).__name__}.{pair[1]} twice")
        seen.add(key)
    return pairs  # type: ignore[return-value]


def check_layer_types(layer_types: object) -> Tuple[Type[nn.Module], ...]:
    """A tuple of nn.Module subclasses from one class or a sequence of them."""
    types = (layer_types,) if isinstance(layer_types, type) else layer_types
    if not isinstance(types, Sequence) or isinstance(types, str) or not types or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in types
    ):
        raise TypeError(f"layer_types must be an nn.Module subclass or a tuple of them, got {layer_types!r}")
    return tuple(types)


# ---------------------------------------------------------------------------------------------
# One-liners


def magnitude(module: nn.Module, amount: Amount, name: str = "weight") -> nn.Module:
    """Unstructured L1-magnitude pruning of one parameter: the smallest |w| go first."""
    return prune_parameter(module, MagnitudeUnstructured(), amount, name)


def random_unstructured(
    module: nn.Module, amount: Amount, name: str = "weight", generator: GeneratorLike = None
) -> nn.Module:
    """Prune entries uniformly at random; `generator` is None (torch's RNG), a seed or a Generator."""
    return prune_parameter(module, RandomUnstructured(generator), amount, name)


def block_magnitude(
    module: nn.Module, amount: Amount, block: Sequence[int] = (4, 1), name: str = "weight"
) -> nn.Module:
    """Prune whole blocks of a 2-D weight, smallest L2 norm first; an int amount counts blocks.

    `block` is (rows, cols) of the weight [out, in]: (4, 1) is 4 consecutive output rows of one
    input column, (1, 4) 4 consecutive inputs of one row. The block-sparse kernels run the shapes
    in `sparseprune.formats.BLOCK_SHAPES`.
    """
    return prune_parameter(module, BlockMagnitude(block), amount, name)


def global_magnitude(
    model_or_params: Union[nn.Module, Iterable[Tuple[nn.Module, str]]],
    amount: Amount,
    layer_types: LayerTypes = (nn.Linear,),
    name: str = "weight",
    *,
    min_kept: float = 0.0,
) -> Union[nn.Module, List[Tuple[nn.Module, str]]]:
    """L1-magnitude pruning with one threshold across layers (larger-weight layers keep more).

    Given a model, prunes parameter `name` of every module of `layer_types` in it and returns the
    model; given (module, name) pairs, prunes those and returns them as a list. `amount` is
    a share (or count) of all the entries together. Each layer keeps at least `min_kept` (in
    [0, 1)) of its entries; a UserWarning names any layer the threshold empties (a fresh
    768-3072-768 MLP at 0.9 loses its whole second layer, whose initial weights are half as large).
    """
    if isinstance(model_or_params, nn.Module):
        types = check_layer_types(layer_types)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        named = [(n or type(m).__name__, m) for n, m in model_or_params.named_modules()
                 if isinstance(m, types) and has_parameter(m, name)]
        if not named:
            kinds = ", ".join(t.__name__ for t in types)
            raise ValueError(f"no module of layer_types ({kinds}) with a parameter {name!r} in the model")
        prune_global([(m, name) for _, m in named], MagnitudeUnstructured(), amount, min_kept=min_kept,
                     labels=[f"{n}.{name}" for n, _ in named])
        return model_or_params
    return prune_global(model_or_params, MagnitudeUnstructured(), amount, min_kept=min_kept)  # type: ignore[arg-type]
