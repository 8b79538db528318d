"""Layer-aware structured pruning one-liners: filters, input channels, units, kernels, patterns.

Each checks that the layer fits the method (ValueError naming the argument otherwise), computes
every mask before installing any (so an error leaves the model as it was), installs them through
the same reparametrisation as `prune_parameter`, and returns what it pruned. Pruning an output
channel (a conv filter or a Linear unit) also masks what the channel would still compute: its
bias entry and, when a BatchNorm is given, that BatchNorm's scale and shift for the channel, so
the feature map after it is exactly zero.
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from sparseprune.prune.amount import Amount, check_amount
from sparseprune.prune.api import LayerTypes, _check_new_mask, _scores, check_layer_types
from sparseprune.prune.importance import NORMS
from sparseprune.prune.methods import _apply_keep
from sparseprune.prune.kernel_patterns import PatternPruning
from sparseprune.prune.reparam import _check_module, effective_weight, has_parameter, install_mask, parameter_state
from sparseprune.prune.structured import (
    ChannelPruning,
    FilterPruning,
    KernelPruning,
    StructuredPruning,
    UnitPruning,
    check_normalize,
    global_keep,
)

StructuredImportance = Union[str, Tensor, Callable[[Tensor], Tensor]]
Install = Tuple[nn.Module, str, Tensor]

PATTERNS_ATTR = "sparseprune_patterns"


def _check_layer(module: object, kind: Type[nn.Module], arg: str, what: str, hint: str = "") -> nn.Module:
    _check_module(module, arg)
    if not isinstance(module, kind):
        raise ValueError(f"{what} needs an nn.{kind.__name__}; {arg} is a {type(module).__name__}{hint}")
    return module  # type: ignore[return-value]


def _method_and_importance(
    importance: object, cls: Type[StructuredPruning], allow_bn: bool = False
) -> Tuple[StructuredPruning, Optional[Union[Tensor, Callable[[Tensor], Tensor]]], bool]:
    """(method, scores or scorer to pass on, whether importance is "bn") from `importance`."""
    names = NORMS + (("bn",) if allow_bn else ())
    if isinstance(importance, str):
        if importance not in names:
            raise ValueError(f"importance must be one of {names}, a score tensor or a callable, got {importance!r}")
        if importance == "bn":
            return cls(), None, True
        return cls(importance), None, False
    if isinstance(importance, Tensor) or callable(importance):
        return cls(), importance, False  # type: ignore[return-value]
    raise TypeError(
        f"importance must be one of {names}, a score tensor or a callable, got {type(importance).__name__}"
    )


def _check_bn(bn: object, conv: nn.Conv2d, arg: str = "bn") -> nn.BatchNorm2d:
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"{arg} must be the nn.BatchNorm2d that follows the conv, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"{arg} has {bn.num_features} features but the conv has {conv.out_channels} output channels")
    if not (has_parameter(bn, "weight") and has_parameter(bn, "bias")):
        raise ValueError(f"{arg} has affine=False: it has no scale (gamma) to rank or shift to mask")
    return bn


def batchnorm_scale(bn: nn.BatchNorm2d) -> Tensor:
    """|gamma| of each channel of a BatchNorm (its effective, masked scale), in at least float32.

    The network-slimming importance: a channel the BatchNorm scales by ~0 contributes ~nothing.
    """
    orig, mask = parameter_state(bn, "weight")
    gamma = effective_weight(orig, mask)
    return gamma.abs().to(torch.promote_types(gamma.dtype, torch.float32))


def _output_masks(module: nn.Module, keep: Tensor, bn: Optional[nn.Module]) -> List[Install]:
    """The masks that go with dropping output channels ~keep: bias, and the BatchNorm's affine."""
    owners = [(module, "bias")] if has_parameter(module, "bias") else []
    if bn is not None:
        owners += [(bn, "weight"), (bn, "bias")]
    installs = []
    for owner, name in owners:
        _, mask = parameter_state(owner, name)
        installs.append((owner, name, _apply_keep(mask, keep.to(mask.device))))
    return installs


def _install_all(installs: List[Install], description: str) -> None:
    for module, name, mask in installs:
        install_mask(module, name, mask, description)


def _prune_slices(
    module: nn.Module,
    method: StructuredPruning,
    amount: Amount,
    importance: Optional[Union[Tensor, Callable[[Tensor], Tensor]]],
    scores: Optional[Tensor] = None,
    outputs: bool = False,
    bn: Optional[nn.Module] = None,
) -> nn.Module:
    """Shared body: check, score, mask the weight (and bias/BatchNorm when `outputs`), install."""
    check_amount(amount)
    orig, mask = parameter_state(module, "weight")
    method.check_shape(orig.shape, "weight")
    if scores is None:
        scores = _scores(method, importance, effective_weight(orig, mask))
    new = _check_new_mask(method.compute_mask(scores, mask, amount), mask, method)
    installs: List[Install] = [(module, "weight", new)]
    if outputs:
        installs += _output_masks(module, method.alive(new), bn)
    _install_all(installs, f"{method!r}, amount={amount!r}")
    return module


# ---------------------------------------------------------------------------------------------
# Per layer


def filters(
    conv: nn.Conv2d, amount: Amount, importance: StructuredImportance = "l1", bn: Optional[nn.BatchNorm2d] = None
) -> nn.Conv2d:
    """Zero whole output channels of a conv: weight[o] and bias[o]; returns `conv`.

    `amount` counts filters (int) or is a fraction of them. `importance`: "l1" or "l2" (norm of
    each filter of the effective weight), "bn" (|gamma| of `bn`, the BatchNorm2d after the
    conv: network slimming), a tensor of scores [out_channels] or a callable weight -> scores.
    When `bn` is given (whatever the importance), its gamma and beta are masked on the same
    channels too, so the channel is zero after the BatchNorm as well. amount=1.0 zeroes every
    filter (use `global_filters` for a floor of one per layer).
    """
    conv = _check_layer(conv, nn.Conv2d, "conv", "filters()", " (use units() for nn.Linear)")
    method, scorer, use_bn = _method_and_importance(importance, FilterPruning, allow_bn=True)
    if use_bn and bn is None:
        raise ValueError("importance='bn' needs bn=, the BatchNorm2d that follows the conv")
    if bn is not None:
        bn = _check_bn(bn, conv)
    scores = batchnorm_scale(bn) if use_bn else None
    return _prune_slices(conv, method, amount, scorer, scores, outputs=True, bn=bn)  # type: ignore[return-value]


def channels(conv: nn.Conv2d, amount: Amount, importance: StructuredImportance = "l1") -> nn.Conv2d:
    """Zero whole input channels weight[:, i] of a conv (groups=1), by their L1/L2 norm; returns `conv`.

    The bias is untouched. The producer of channel i may then drop it (`sparseprune.shrink`).
    """
    conv = _check_layer(conv, nn.Conv2d, "conv", "channels()")
    if conv.groups != 1:
        raise ValueError(f"channels() needs a conv with groups=1; conv has groups={conv.groups}")
    method, scorer, _ = _method_and_importance(importance, ChannelPruning)
    return _prune_slices(conv, method, amount, scorer)  # type: ignore[return-value]


def units(linear: nn.Linear, amount: Amount, importance: StructuredImportance = "l2") -> nn.Linear:
    """Zero whole output units of a Linear: weight rows and bias entries, by row L2 (or L1) norm.

    `amount` counts rows (int) or is a fraction of them. Returns `linear`.
    """
    linear = _check_layer(linear, nn.Linear, "linear", "units()", " (use filters() for nn.Conv2d)")
    method, scorer, _ = _method_and_importance(importance, UnitPruning)
    return _prune_slices(linear, method, amount, scorer, outputs=True)  # type: ignore[return-value]


def kernels(conv: nn.Conv2d, amount: Amount, importance: StructuredImportance = "l2") -> nn.Conv2d:
    """Zero whole k x k kernels weight[o, i] of a conv by their L2 (or L1) norm; returns `conv`.

    `amount` counts kernels (int; out_channels * in_channels / groups of them) or is a fraction.
    """
    conv = _check_layer(conv, nn.Conv2d, "conv", "kernels()")
    method, scorer, _ = _method_and_importance(importance, KernelPruning)
    return _prune_slices(conv, method, amount, scorer)  # type: ignore[return-value]


def _check_connectivity(connectivity: object) -> None:
    try:
        check_amount(connectivity)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("amount", "connectivity")) from None
    if not isinstance(connectivity, numbers.Integral) and float(connectivity) >= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"connectivity must be in [0, 1) when it is a float, got {connectivity}")


def patterns(conv: nn.Conv2d, n_patterns: int = 4, pattern_size: int = 4, connectivity: Amount = 0.0) -> nn.Conv2d:
    """Pattern-prune a conv: each kernel keeps `pattern_size` positions, from `n_patterns` patterns.

    See `PatternPruning` for how the patterns are chosen. `connectivity` (a fraction in [0, 1),
    or an int count of kernels below their number) also empties that share of whole kernels,
    lowest remaining norm first. The patterns and each kernel's pattern are attached as
    `conv.sparseprune_patterns` (a `PatternAssignment`, a record of this call: later pruning can
    zero more, and `pattern_assignment_from_weight` reads the current state). Returns `conv`.
    """
    conv = _check_layer(conv, nn.Conv2d, "conv", "patterns()")
    kh, kw = conv.kernel_size
    if kh * kw < 2:
        raise ValueError(f"patterns() needs kernels of at least 2 positions; conv has kernel_size {conv.kernel_size}")
    method = PatternPruning(n_patterns, pattern_size)
    _check_connectivity(connectivity)
    orig, mask = parameter_state(conv, "weight")
    method.check_shape(orig.shape, "weight")
    n_kernels = int(orig.shape[0] * orig.shape[1])
    if isinstance(connectivity, numbers.Integral) and connectivity >= n_kernels:
        raise ValueError(f"connectivity={connectivity} would empty all {n_kernels} kernels; it must be fewer")
    new, record = method.prune(method.importance(effective_weight(orig, mask)), mask, connectivity)
    install_mask(conv, "weight", new, f"{method!r}, connectivity={connectivity!r}")
    setattr(conv, PATTERNS_ATTR, record)
    return conv


# ---------------------------------------------------------------------------------------------
# Global


def conv_bn_pairs(model: nn.Module) -> Dict[nn.Conv2d, nn.BatchNorm2d]:
    """{conv: the BatchNorm2d right after it} by module registration order.

    A BatchNorm2d pairs with a conv when it is the next leaf module after the conv and has as
    many features as the conv has output channels (the Conv-BN(-ReLU) blocks of torchvision's
    ResNets, MobileNets...). Registration order is not data flow: models whose BatchNorms are
    registered elsewhere need an explicit mapping.
    """
    model = _check_module(model, "model")
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    pairs: Dict[nn.Conv2d, nn.BatchNorm2d] = {}
    for a, b in zip(leaves, leaves[1:]):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.num_features == a.out_channels:
            pairs[a] = b
    return pairs


def _layers_of(model: object, layer_types: object) -> List[nn.Conv2d]:
    model = _check_module(model, "model")
    types = check_layer_types(layer_types)
    if not all(issubclass(t, nn.Conv2d) for t in types):
        raise ValueError(f"layer_types must be nn.Conv2d or subclasses of it, got {layer_types!r}")
    convs = [m for m in model.modules() if isinstance(m, types) and has_parameter(m, "weight")]
    if not convs:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"no module of layer_types ({kinds}) in the model")
    return convs


def _global_slices(
    convs: List[nn.Conv2d],
    method: StructuredPruning,
    amount: Amount,
    scorer: Optional[Union[Tensor, Callable[[Tensor], Tensor]]],
    scores: Optional[List[Tensor]],
    normalize: Optional[str],
    bns: Optional[Mapping[nn.Conv2d, nn.BatchNorm2d]],
) -> None:
    states = [parameter_state(c, "weight") for c in convs]
    for orig, _ in states:
        method.check_shape(orig.shape, "weight")
    if scores is None:
        if isinstance(scorer, Tensor):
            raise TypeError("importance must be 'l1', 'l2', 'bn' or a callable for global pruning, not a tensor")
        scores = [_scores(method, scorer, effective_weight(o, m)) for o, m in states]
    keeps = global_keep([method.alive(m) for _, m in states], scores, amount, method.unit, normalize, min_keep=1)
    installs: List[Install] = []
    for conv, (_, mask), keep in zip(convs, states, keeps):
        installs.append((conv, "weight", _apply_keep(mask, method.expand(keep.to(mask.device), mask.shape))))
        if bns is not None:
            installs += _output_masks(conv, keep, bns.get(conv))
    _install_all(installs, f"global {method!r}, amount={amount!r} over {len(convs)} layers")


def global_filters(
    model: nn.Module,
    amount: Amount,
    importance: StructuredImportance = "l1",
    layer_types: LayerTypes = (nn.Conv2d,),
    normalize: Optional[str] = "mean",
    bn: Optional[Mapping[nn.Conv2d, nn.BatchNorm2d]] = None,
) -> nn.Module:
    """Filter pruning with one ranking over every conv of `layer_types` in `model`; returns it.

    `amount` is a share (or count) of all their filters together. Each layer's scores ("l1",
    "l2", "bn" or a callable weight -> [out] scores) are divided by the mean score of that
    layer's surviving filters (normalize="mean"; None ranks raw scores, as network slimming does
    with gamma), so one threshold means "well below this layer's typical filter" everywhere.
    Every layer keeps at least its best filter: the target is capped, so amount=1.0 leaves one
    filter per layer. Biases of pruned filters are masked. `bn` maps convs to the BatchNorm2d
    after them (default with importance="bn": `conv_bn_pairs(model)`, every conv needing one);
    mapped BatchNorms are masked with their conv's filters.
    """
    convs = _layers_of(model, layer_types)
    method, scorer, use_bn = _method_and_importance(importance, FilterPruning, allow_bn=True)
    normalize = check_normalize(normalize)
    if bn is None and use_bn:
        bn = conv_bn_pairs(model)
        missing = [name for name, m in model.named_modules() if m in convs and m not in bn]  # by identity
        if missing:
            raise ValueError(
                f"importance='bn' found no BatchNorm2d right after conv(s) {missing}; pass bn={{conv: bn}}"
            )
    bns: Dict[nn.Conv2d, nn.BatchNorm2d] = {}
    if bn is not None:
        if not isinstance(bn, Mapping):
            raise TypeError(f"bn must be a mapping {{conv: BatchNorm2d}} for global pruning, got {type(bn).__name__}")
        for conv, norm in bn.items():
            if conv in convs:
                bns[conv] = _check_bn(norm, conv, "bn")
        if use_bn:
            missing = [name for name, m in model.named_modules() if m in convs and m not in bns]
            if missing:
                raise ValueError(f"importance='bn' needs a BatchNorm2d in bn for conv(s) {missing}")
    check_amount(amount)
    scores = [batchnorm_scale(bns[c]) for c in convs] if use_bn else None
    _global_slices(convs, method, amount, scorer, scores, normalize, bns)
    return model


def global_kernels(
    model: nn.Module,
    amount: Amount,
    importance: StructuredImportance = "l2",
    layer_types: LayerTypes = (nn.Conv2d,),
    normalize: Optional[str] = "mean",
) -> nn.Module:
    """Kernel pruning with one ranking over every conv of `layer_types` in `model`; returns it.

    `amount` is a share (or count) of all their k x k kernels. Scores ("l2", "l1" or a callable
    weight -> [out, in] scores) are normalised per layer as in `global_filters`, and every layer
    keeps at least its best kernel.
    """
    convs = _layers_of(model, layer_types)
    method, scorer, _ = _method_and_importance(importance, KernelPruning)
    normalize = check_normalize(normalize)
    check_amount(amount)
    _global_slices(convs, method, amount, scorer, None, normalize, None)
    return model

