"""Randomized pruning: an ensemble of K copies of a model, each with its own random mask.

Random unstructured pruning throws away a different part of the network in every draw; averaging
K such sparse networks recovers some of what one draw loses (and gives K independent sparse
models to convert). `single_random_mask` is the one-draw baseline to compare against.
"""
from __future__ import annotations

import numbers
from typing import Tuple, Type

import torch
from torch import Tensor, nn

from sparseprune.model_copy import deepcopy_model
from sparseprune.prune.amount import Amount, amount_to_count, check_amount
from sparseprune.prune.api import LayerTypes, check_layer_types, random_unstructured
from sparseprune.prune.reparam import _check_module, has_parameter, parameter_state, remove


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _targets(model: nn.Module, types: Tuple[Type[nn.Module], ...]) -> list:
    layers = [m for m in model.modules() if isinstance(m, types) and has_parameter(m, "weight")]
    if not layers:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"model has no layer of layer_types ({kinds}) with a weight to prune")
    return layers


def _random_masked_copy(
    model: nn.Module, amount: Amount, seed: int, types: Tuple[Type[nn.Module], ...], permanent: bool
) -> nn.Module:
    """A deep copy whose every `types` layer has its weight pruned at random to `amount`.

    One generator seeded with `seed` draws the layers' masks in registration order, so layers of
    the same shape get different masks and the same seed gives the same masks.
    """
    member = deepcopy_model(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in _targets(member, types):
        random_unstructured(layer, amount, "weight", generator=generator)
    return remove(member) if permanent else member


def _check_args(model: object, amount: object, seed: object, layer_types: object, permanent: object):
    model = _check_module(model, "model")
    types = check_layer_types(layer_types)
    check_amount(amount)
    seed = _check_seed(seed)
    if not isinstance(permanent, bool):
        raise TypeError(f"permanent must be a bool, got {type(permanent).__name__}")
    for layer in _targets(model, types):  # an int amount above a layer's size fails before copying
        amount_to_count(amount, parameter_state(layer, "weight")[0].numel(), "entries")  # type: ignore[arg-type]
    return model, types, seed


def single_random_mask(
    model: nn.Module,
    amount: Amount,
    seed: int = 0,
    *,
    layer_types: LayerTypes = (nn.Linear, nn.Conv2d),
    permanent: bool = False,
) -> nn.Module:
    """A deep copy of `model` with the weight of every `layer_types` layer pruned at random.

    Each layer loses `amount` of its weights (a fraction, or an int count per layer), drawn from
    one generator seeded by `seed`: the same as member 0 of `RandomMaskEnsemble(model, k,
    amount, seed=seed)`. `model` is not modified. Masks stay torch reparametrisations (kept
    while fine-tuning) unless `permanent` (then made permanent with `remove`).
    """
    model, types, seed = _check_args(model, amount, seed, layer_types, permanent)
    return _random_masked_copy(model, amount, seed, types, permanent)


class RandomMaskEnsemble(nn.Module):
    """K deep copies of a model, each pruned with its own random unstructured mask; forward
    averages the K outputs.

    Member i (`self.members[i]`, an nn.ModuleList entry) is `single_random_mask(model, amount,
    seed + i)`: every weight of its `layer_types` layers is pruned at random to `amount` (a
    fraction, or an int count per layer), from a generator seeded with seed + i, so members'
    masks are independent and reproducible. `model` itself is not modified.

    forward(*inputs) returns the mean of the members' outputs (which must be tensors of one
    shape). For a classifier that is the average of the logits, not of the probabilities: the
    argmax can differ from a vote or from averaged softmax outputs, and the result is still a
    valid input to cross-entropy, so the ensemble trains like one model. `member_outputs`
    gives the stacked outputs [K, ...] to combine otherwise.

    Masks: kept as torch.nn.utils.prune reparametrisations (weight = weight_orig *
    weight_mask) by default, so fine-tuning the ensemble (e.g. `sparseprune.train.train`)
    keeps every member's zeros; `make_permanent()` (or `permanent=True`) turns them into plain
    weights with zeros. `sparseprune.convert(ensemble)` converts each member like any model,
    reading the effective weights either way.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        amount: Amount,
        *,
        seed: int = 0,
        layer_types: LayerTypes = (nn.Linear, nn.Conv2d),
        permanent: bool = False,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an int >= 1 (the number of members), got {k!r}")
        model, types, seed = _check_args(model, amount, seed, layer_types, permanent)
        super().__init__()
        self.k = int(k)
        self.amount = amount
        self.seed = seed
        self.members = nn.ModuleList(
            _random_masked_copy(model, amount, seed + i, types, permanent) for i in range(self.k)
        )

    def member_outputs(self, *inputs: Tensor, **kwargs) -> Tensor:
        """The members' outputs stacked along a new first dim: [K, *output shape]."""
        return torch.stack([member(*inputs, **kwargs) for member in self.members])

    def forward(self, *inputs: Tensor, **kwargs) -> Tensor:
        total = None
        for member in self.members:
            out = member(*inputs, **kwargs)
            total = out if total is None else total + out
        return total / len(self.members)

    def make_permanent(self) -> "RandomMaskEnsemble":
        """Make every member's mask permanent (plain weights holding zeros); returns self."""
        for member in self.members:
            remove(member)
        return self

    def extra_repr(self) -> str:
        return f"k={self.k}, amount={self.amount!r}, seed={self.seed}"
