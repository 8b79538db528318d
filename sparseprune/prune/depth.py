"""Pruning along the depth of a network: neurons layer by layer, and whole layers or blocks.

Two methods:

* `layerwise_neuron_prune` slides a three-layer sub-network over an MLP (an nn.Sequential of
  Linear layers and elementwise activations), from the input to the output. At hidden layer l
  the sub-network is Linear_l -> activation -> Linear_{l+1}; the hidden neurons of layer l that
  matter least to that sub-network's output (the pre-activations of Linear_{l+1}) are zeroed
  with `units()` masks, the sub-network (or the model) is optionally retrained, and the window
  moves on to layer l+1, whose statistics are measured on the already pruned model.
* `remove_layers` deletes whole layers or residual blocks (replaced by nn.Identity), the ones
  whose removal raises the loss on some data the least, greedily, re-ranking after each removal.

Both measure on data the caller passes; nothing here trains unless asked to.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseprune.model_copy import deepcopy_model
from sparseprune.prune.amount import Amount, amount_to_count, check_amount
from sparseprune.prune.layers import units
from sparseprune.prune.reparam import _check_module, effective_weight, parameter_state
from sparseprune.prune.structured import UnitPruning

LossFn = Callable[[Tensor, Tensor], Tensor]
CRITERIA = ("reconstruction", "loss")

# Modules that act on each feature separately (so a hidden neuron stays one feature through
# them) and may sit between two Linear layers of an MLP the layer-wise method accepts.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Dropout, nn.AlphaDropout, nn.Identity,
)
# Also allowed before the first Linear (the inputs are never pruned) and after the last one.
MLP_INPUT = ELEMENTWISE + (nn.Flatten,)
MLP_OUTPUT = ELEMENTWISE + (nn.Softmax, nn.LogSoftmax)


# ---------------------------------------------------------------------------------------------
# Shared checks


def _split_data(data: object, need_labels: bool, arg: str = "data") -> Tuple[Tensor, Optional[Tensor]]:
    """(x, y or None) from a tensor x or a tuple (x,) / (x, y)."""
    if isinstance(data, Tensor):
        x, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) in (1, 2) and all(isinstance(t, Tensor) for t in data):
        x, y = data[0], (data[1] if len(data) == 2 else None)
    else:
        raise TypeError(f"{arg} must be a tensor x or a tuple (x, y) of tensors, got {type(data).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{arg} must hold at least one sample, got x of shape {tuple(x.shape)}")
    if y is not None and (y.dim() < 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"{arg}: y has shape {tuple(y.shape)}, expected {x.shape[0]} samples like x")
    if need_labels and y is None:
        raise ValueError(f"{arg} must be a tuple (x, y): the loss needs the targets y")
    return x, y


def _check_loss_fn(loss_fn: object) -> LossFn:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, y) -> scalar loss, got {type(loss_fn).__name__}")
    return loss_fn  # type: ignore[return-value]


def _eval_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> float:
    """loss_fn(model(x), y) in eval mode without gradient; the modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            loss = loss_fn(model(x), y)
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
    return float(loss)


# ---------------------------------------------------------------------------------------------
# Layer-wise neuron pruning over a sliding three-layer sub-network


@dataclass
class LayerwiseStep:
    """What `layerwise_neuron_prune` did at one hidden layer (steps run input to output).

    `start`/`stop`: the sub-network is `model[start:stop + 1]` (Linear_l, its activations,
    Linear_{l+1}; slicing an nn.Sequential shares the modules, so training the slice trains
    the model). `name`/`next_name`: the child names of Linear_l and Linear_{l+1}. `scores`:
    each neuron's importance (dead neurons included) as measured before this step. `pruned`:
    the neurons zeroed by this step; `n_pruned`: the layer's total of zeroed neurons after it.
    `loss_before`/`loss_after`: the model's loss on the data before this step and after it
    (after retraining, if any); None without targets.
    """

    layer: int
    name: str
    next_name: str
    start: int
    stop: int
    n_units: int
    scores: Tensor
    pruned: Tuple[int, ...]
    n_pruned: int
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None


def _mlp_layers(model: object) -> List[int]:
    """Indices of the Linear children of an MLP nn.Sequential; ValueError naming what is not."""
    model = _check_module(model, "model")
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"layerwise_neuron_prune needs an nn.Sequential MLP (Linear layers and elementwise "
            f"activations); model is a {type(model).__name__}"
        )
    children = list(model.named_children())
    linear = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
    if len(linear) < 2:
        raise ValueError(f"model must hold at least two nn.Linear layers (one hidden layer); it has {len(linear)}")
    for i, (name, m) in enumerate(children):
        if i in linear:
            continue
        allowed = MLP_INPUT if i < linear[0] else MLP_OUTPUT if i > linear[-1] else ELEMENTWISE
        if not isinstance(m, allowed):
            where = "before the first" if i < linear[0] else "after the last" if i > linear[-1] else "between"
            raise ValueError(
                f"model layer {name!r} ({type(m).__name__}, {where} Linear layers) is not an elementwise "
                f"activation: layerwise_neuron_prune only prunes MLPs of Linear layers and activations"
            )
    for a, b in zip(linear, linear[1:]):
        la, lb = children[a][1], children[b][1]
        if la.out_features != lb.in_features:
            raise ValueError(
                f"model layer {children[a][0]!r} has {la.out_features} outputs but layer {children[b][0]!r} "
                f"takes {lb.in_features} inputs"
            )
    return linear


def _amounts(amount: object, n_hidden: int, widths: Sequence[int]) -> List[Amount]:
    if isinstance(amount, (list, tuple)):
        if len(amount) != n_hidden:
            raise ValueError(f"amount holds {len(amount)} values, expected one per hidden layer ({n_hidden})")
        amounts = list(amount)
    else:
        amounts = [amount] * n_hidden  # type: ignore[list-item]
    for a, width in zip(amounts, widths):
        check_amount(a)
        amount_to_count(a, width, "units")  # an int above the width fails here, before any pruning
    return amounts  # type: ignore[return-value]


def _next_layer_input(model: nn.Sequential, index: int, x: Tensor) -> Tensor:
    """The input of child `index` (a Linear), [..., features], when the model runs on x in eval mode."""
    seen: List[Tensor] = []
    handle = model[index].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model[: index + 1](x)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    return seen[0]


def _pruned_value(model: nn.Sequential, start: int, stop: int, width: int, like: Tensor) -> Tensor:
    """What each neuron of Linear_start carries into Linear_stop once zeroed: act(0), per neuron."""
    between = model[start + 1: stop]
    modes = [(m, m.training) for m in between.modules()]
    between.eval()
    try:
        with torch.no_grad():
            return between(like.new_zeros(1, width))[0]
    finally:
        for m, mode in modes:
            m.training = mode


def _neuron_scores(
    model: nn.Sequential, start: int, stop: int, x: Tensor, y: Optional[Tensor], criterion: str, loss_fn: LossFn
) -> Tensor:
    """One score per hidden neuron of Linear_start: how much Linear_stop's output changes
    ("reconstruction") or the model's loss rises ("loss") when the neuron is zeroed."""
    a = _next_layer_input(model, stop, x)  # [..., H] the neurons' values as Linear_stop sees them
    c = _pruned_value(model, start, stop, a.shape[-1], a)
    if criterion == "reconstruction":
        # Zeroing neuron j changes Linear_stop's pre-activations by (c_j - a_j) * W[:, j]: the
        # mean squared error over the samples is mean((a_j - c_j)^2) * ||W[:, j]||^2.
        orig, mask = parameter_state(model[stop], "weight")
        w = effective_weight(orig, mask).to(a.dtype)
        flat = a.reshape(-1, a.shape[-1])
        return ((flat - c) ** 2).mean(dim=0) * (w ** 2).sum(dim=0)
    tail = model[stop:]
    modes = [(m, m.training) for m in tail.modules()]
    tail.eval()
    scores = torch.empty(a.shape[-1], dtype=torch.float64)
    try:
        with torch.no_grad():
            base = float(loss_fn(tail(a), y))
            for j in range(a.shape[-1]):
                changed = a.clone()
                changed[..., j] = c[j]
                scores[j] = float(loss_fn(tail(changed), y)) - base
    finally:
        for m, mode in modes:
            m.training = mode
    return scores


def layerwise_neuron_prune(
    model: nn.Sequential,
    amount: Union[Amount, Sequence[Amount]],
    data: Union[Tensor, Tuple[Tensor, ...]],
    *,
    train_fn: Optional[Callable[[nn.Sequential, LayerwiseStep], object]] = None,
    loss_fn: LossFn = F.cross_entropy,
    criterion: str = "reconstruction",
) -> nn.Sequential:
    """Prune the hidden neurons of an MLP one layer at a time, input to output; returns `model`.

    `model` is an nn.Sequential of nn.Linear layers with elementwise activations (and Dropout)
    between them (Flatten may come first, Softmax last). For each hidden layer l, in order, the
    three-layer sub-network Linear_l -> activation -> Linear_{l+1} is considered alone: the
    neurons of layer l are scored on `data` (a tensor x, or (x, y)) by how much removing each
    would change the sub-network's output, and `amount` of them are zeroed with `units()`
    masks on Linear_l (weight rows and bias; the matching columns of Linear_{l+1} then only see
    a constant, so `sparseprune.shrink.shrink` deletes them). An int amount is a count per
    layer, a float a fraction of the layer's neurons; neurons zeroed earlier count towards it.
    A sequence gives one amount per hidden layer.

    criterion "reconstruction" (default): neuron j scores mean over samples of
    (a_j - c_j)^2 * ||W_{l+1}[:, j]||^2, the squared error it leaves in Linear_{l+1}'s
    pre-activations when replaced by its pruned value c_j = act(0) (0 for ReLU-like
    activations), with a_j its value after the activation. criterion "loss": the rise of
    `loss_fn(model(x), y)` when neuron j alone is replaced by c_j (needs y; one pass of the
    rest of the network per neuron).

    `train_fn(model, step)` is called after each layer is pruned, before the window slides on
    (masks stay in force during training: they are torch's reparametrisation); retrain the
    sub-network with `model[step.start:step.stop + 1]` or the whole model. Statistics of layer
    l+1 are measured on the model as pruned (and retrained) up to layer l. A list of
    `LayerwiseStep`, one per hidden layer in order, is attached as
    `model.sparseprune_layerwise_report`. Everything is checked before the first mask goes in:
    an error leaves the model as it was.
    """
    linear = _mlp_layers(model)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    loss_fn = _check_loss_fn(loss_fn)
    x, y = _split_data(data, need_labels=criterion == "loss")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn must be None or a callable (model, step), got {type(train_fn).__name__}")
    names = [name for name, _ in model.named_children()]
    amounts = _amounts(amount, len(linear) - 1, [model[i].out_features for i in linear[:-1]])
    try:
        loss = None if y is None else _eval_loss(model, x, y, loss_fn)
    except Exception as e:
        raise ValueError(f"running model on data failed: {type(e).__name__}: {e}") from e

    report: List[LayerwiseStep] = []
    for layer, (start, stop, amt) in enumerate(zip(linear, linear[1:], amounts)):
        scores = _neuron_scores(model, start, stop, x, y, criterion, loss_fn)
        _, mask_before = parameter_state(model[start], "weight")
        alive_before = UnitPruning().alive(mask_before)
        units(model[start], amt, importance=scores.to(mask_before.device))
        _, mask_after = parameter_state(model[start], "weight")
        alive_after = UnitPruning().alive(mask_after)
        step = LayerwiseStep(
            layer=layer, name=names[start], next_name=names[stop], start=start, stop=stop,
            n_units=int(alive_after.numel()), scores=scores.detach().cpu(),
            pruned=tuple(int(j) for j in (alive_before & ~alive_after).nonzero().flatten()),
            n_pruned=int((~alive_after).sum()), loss_before=loss,
        )
        if train_fn is not None:
            train_fn(model, step)
        loss = None if y is None else _eval_loss(model, x, y, loss_fn)
        step.loss_after = loss
        report.append(step)
    model.sparseprune_layerwise_report = report
    return model


# ---------------------------------------------------------------------------------------------
# Removing whole layers and residual blocks

Candidate = Tuple[str, ...]  # qualified names of modules replaced together by nn.Identity
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class LayerRemovalReport:
    """What `remove_layers` measured and removed.

    `base_loss`: the loss of the input model on the data. `rounds[r]`: {candidate: loss
    increase} measured in round r, relative to the model as it was after r removals (a
    candidate is a name like "layer1.0", or siblings of one nn.Sequential removed together,
    "2+3"). `removed`: the candidates removed, in order; `losses[r]` the loss after removal r.
    """

    base_loss: float
    rounds: List[Dict[str, float]] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)

    @property
    def increases(self) -> Dict[str, float]:
        """Each candidate's loss increase when removed alone from the input model."""
        return dict(self.rounds[0]) if self.rounds else {}

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else self.base_loss


def _key(candidate: Candidate) -> str:
    return "+".join(candidate)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _shapes(model: nn.Module, x: Tensor) -> Dict[str, List[Tuple[Optional[tuple], Optional[tuple]]]]:
    """{qualified name: [(input shape, output shape) per call]} from one eval-mode forward pass;
    a shape is None when the input or output is not a single tensor."""
    calls: Dict[str, List[Tuple[Optional[tuple], Optional[tuple]]]] = {}
    handles = []

    def hook(name: str):
        def record(_module, args, output):
            inp = tuple(args[0].shape) if len(args) == 1 and isinstance(args[0], Tensor) else None
            out = tuple(output.shape) if isinstance(output, Tensor) else None
            calls.setdefault(name, []).append((inp, out))
        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return calls


def _preserves_shape(candidate: Candidate, calls: Dict[str, list]) -> bool:
    first, last = calls.get(candidate[0]), calls.get(candidate[-1])
    if not first or not last:
        return False
    if len(candidate) == 1:
        return all(i is not None and i == o for i, o in first)
    if len(first) != 1 or len(last) != 1:
        return False
    return first[0][0] is not None and first[0][0] == last[0][1]


def _discover(model: nn.Module, calls: Dict[str, list]) -> List[Candidate]:
    """Shape-preserving layers and blocks, in registration order (see remove_layers)."""
    found: List[Candidate] = []
    modules = dict(model.named_modules())
    for parent_name, parent in modules.items():
        prefix = parent_name + "." if parent_name else ""
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for i, (name, child) in enumerate(children):
                if not _is_primary(child):
                    continue
                group = [prefix + name]
                for other_name, other in children[i + 1:]:
                    if not isinstance(other, NORMS + ELEMENTWISE) or isinstance(other, nn.Identity):
                        break
                    group.append(prefix + other_name)
                found.append(tuple(group))
        else:
            for name, child in parent.named_children():
                if (not isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
                        and any(True for _ in child.children()) and _has_params(child)):
                    found.append((prefix + name,))
    return [c for c in found if _preserves_shape(c, calls)]


def _is_primary(module: nn.Module) -> bool:
    """A module that starts a layer: it holds parameters and is not a normalisation or PReLU."""
    return _has_params(module) and not isinstance(module, NORMS + (nn.PReLU,))


def _parent_of(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _swap(model: nn.Module, candidate: Candidate, replacements: Optional[List[nn.Module]] = None) -> List[nn.Module]:
    """Put `replacements` (default: nn.Identity each) in place of the candidate's modules;
    returns the modules taken out."""
    taken = []
    for k, name in enumerate(candidate):
        parent, child = _parent_of(model, name)
        taken.append(parent._modules[child])
        parent._modules[child] = nn.Identity() if replacements is None else replacements[k]
    return taken


def _check_candidates(candidates: object, model: nn.Module, calls: Dict[str, list]) -> List[Candidate]:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be None or a sequence of module names, got {type(candidates).__name__}")
    modules = dict(model.named_modules())
    result: List[Candidate] = []
    for c in candidates:
        group = tuple(c.split("+")) if isinstance(c, str) else tuple(c) if isinstance(c, (tuple, list)) else None
        if not group or not all(isinstance(n, str) and n for n in group):
            raise TypeError(f"candidates must hold module names or tuples of them, got {c!r}")
        for name in group:
            if name not in modules:
                raise ValueError(f"candidates names {name!r}, which is no submodule of the model")
        if not _preserves_shape(group, calls):
            raise ValueError(
                f"candidates entry {_key(group)!r} does not map its input to an output of the same shape "
                f"(or does not run on data), so it cannot be replaced by nn.Identity"
            )
        if group not in result:
            result.append(group)
    if not result:
        raise ValueError("candidates is empty")
    return result


def remove_layers(
    model: nn.Module,
    n: int,
    data: Tuple[Tensor, Tensor],
    *,
    loss_fn: LossFn = F.cross_entropy,
    candidates: Optional[Sequence[Union[str, Sequence[str]]]] = None,
) -> Tuple[nn.Module, LayerRemovalReport]:
    """Remove the `n` layers or blocks whose removal raises the loss least; returns (copy, report).

    Candidates are modules that map their input to an output of the same shape (found by one
    forward pass on data's x with shape hooks), so that nn.Identity can stand in for them:
      * in every nn.Sequential, a layer: a child holding parameters (Linear, Conv, a block...)
        with the normalisations, elementwise activations and dropouts right after it, e.g.
        "2+3" for Linear(h, h), ReLU of an MLP (pooling or flatten ends the group);
        a torchvision-style ResNet stage gives its residual blocks ("layer1.0", "layer1.1"),
        those with a downsampling shortcut change the shape and are left out;
      * elsewhere, a submodule with children and parameters that is no Sequential (a block
        held as an attribute).
    Being shape-preserving is all that is checked: a non-residual block qualifies too, and the
    loss decides. `candidates` overrides the search: module names, or tuples of names (or
    "a+b") removed together.

    Each round replaces each remaining candidate alone by nn.Identity, measures
    `loss_fn(model(x), y)` on `data` = (x, y) in eval mode, removes the candidate with the
    smallest increase (ties: first in registration order) and starts again on the smaller
    model. n=0 only measures. The input model is never modified (the work is on a deep copy,
    whose modules keep the input's train/eval modes); removed modules become nn.Identity, so
    the other modules keep their names. ValueError naming `n` when there are fewer than n
    candidates.
    """
    model = _check_module(model, "model")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the number of layers to remove), got {n!r}")
    loss_fn = _check_loss_fn(loss_fn)
    x, y = _split_data(data, need_labels=True)
    work = deepcopy_model(model)
    try:
        calls = _shapes(work, x)
        base = _eval_loss(work, x, y, loss_fn)
    except Exception as e:
        raise ValueError(f"running model on data failed: {type(e).__name__}: {e}") from e
    explicit = None if candidates is None else _check_candidates(candidates, work, calls)
    pool = explicit if explicit is not None else _discover(work, calls)
    if n > len(pool):
        raise ValueError(
            f"n={n} is more than the {len(pool)} removable layers/blocks found "
            f"({', '.join(_key(c) for c in pool) or 'none'})"
        )

    report = LayerRemovalReport(base_loss=base)
    current = base
    removed: List[Candidate] = []
    for r in range(max(n, 1)):
        if explicit is not None:
            # a candidate is gone once one of its modules was replaced (overlapping candidates)
            pool = [c for c in explicit if c not in removed
                    and not any(isinstance(work.get_submodule(m), nn.Identity) for m in c)]
        else:
            pool = _discover(work, _shapes(work, x)) if r else pool
        if not pool:
            raise ValueError(f"n={n}: after removing {', '.join(map(_key, removed))} no candidate is left")
        increases: Dict[str, float] = {}
        for c in pool:
            taken = _swap(work, c)
            try:
                increases[_key(c)] = _eval_loss(work, x, y, loss_fn) - current
            finally:
                _swap(work, c, taken)
        report.rounds.append(increases)
        if r >= n:
            break
        best = min(pool, key=lambda c: increases[_key(c)])  # min keeps the first of equal ones
        _swap(work, best)
        removed.append(best)
        current = _eval_loss(work, x, y, loss_fn)
        report.removed.append(_key(best))
        report.losses.append(current)
    return work, report
