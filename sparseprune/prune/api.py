"""Functional pruning: score, compute masks with a method, install them. Each returns what it pruned.

Everything that can fail (arguments, parameter lookup, scoring, mask computation) runs before
the first mask is installed, so on an error the model is left as it was.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from sparseprune.prune.amount import Amount, check_amount
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


def prune_global(
    targets: Iterable[Tuple[nn.Module, str]],
    method: PruningMethod,
    amount: Amount,
    importance: Optional[Callable[[Tensor], Tensor]] = None,
) -> List[Tuple[nn.Module, str]]:
    """Prune several parameters together: `amount` is a share (or count) of all their entries,
    and one ranking (so one score threshold) runs across them. `method` must be elementwise.
    Returns the (module, name) pairs pruned.
    """
    method = _check_method(method)
    if not method.elementwise:
        raise ValueError(f"{method!r} scores blocks, not entries: it cannot rank tensors together")
    check_amount(amount)
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
    device = masks[0].device
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores])
    flat_scores = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in scores])
    flat_mask = torch.cat([m.reshape(-1).to(device) != 0 for m in masks])
    flat_new = method.compute_mask(flat_scores, flat_mask, amount)
    _check_new_mask(flat_new, flat_mask, method)
    new_masks = []
    for piece, mask in zip(torch.split(flat_new, [m.numel() for m in masks]), masks):
        new_masks.append(piece.reshape(mask.shape).to(device=mask.device, dtype=mask.dtype))
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
) -> Union[nn.Module, List[Tuple[nn.Module, str]]]:
    """L1-magnitude pruning with one threshold across layers (larger-weight layers keep more).

    Given a model, prunes parameter `name` of every module of `layer_types` in it and returns the
    model; given (module, name) pairs, prunes those and returns them as a list. `amount` is
    a share (or count) of all the entries together.
    """
    if isinstance(model_or_params, nn.Module):
        types = check_layer_types(layer_types)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        targets = [(m, name) for m in model_or_params.modules() if isinstance(m, types) and has_parameter(m, name)]
        if not targets:
            kinds = ", ".join(t.__name__ for t in types)
            raise ValueError(f"no module of layer_types ({kinds}) with a parameter {name!r} in the model")
        prune_global(targets, MagnitudeUnstructured(), amount)
        return model_or_params
    return prune_global(model_or_params, MagnitudeUnstructured(), amount)  # type: ignore[arg-type]
