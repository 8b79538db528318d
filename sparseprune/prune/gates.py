"""Learned channel gates: a trainable scale per output channel, pushed to zero by an L1 penalty.

    add_channel_gates(model)            wrap layers in GatedLayer (output * gate, gates start at 1)
    train_with_gate_penalty(model, x, y, l1=..., epochs=..., lr=...)
                                        cross-entropy + l1 * gate_l1_penalty(model), Adam
    remove_gates(model, threshold=1e-2) zero channels whose |gate| is small, fold the other gates
                                        into the layers' weights, unwrap the layers
    sparseprune.shrink.shrink(model, (x,))   delete the zeroed channels for good

The gate multiplies a layer's output channel, so the L1 penalty on the gates is a sparsity
penalty on whole channels (the network-slimming idea without needing a BatchNorm). A gated
layer followed by a BatchNorm is a poor fit: the BatchNorm undoes the gate's scale (in training
mode), so the penalty shrinks the gates at no cost; prune such layers by their BatchNorm's scale
(`sparseprune.prune.filters(conv, amount, "bn", bn)`) instead.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from sparseprune.prune.api import LayerTypes, check_layer_types
from sparseprune.prune.reparam import (_check_module, has_parameter, install_mask, parameter_state,
                                       require_wrapper_layers, wrapper_layers)

GATEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class GatedLayer(nn.Module):
    """`layer`'s output times a learnable gate per output channel (Linear: per unit).

    Conv outputs [N, C, ...] are scaled along dim 1, Linear outputs [..., out] along the last
    dim. The gates (`self.gate`, one per channel) start at `init`.
    """

    def __init__(self, layer: nn.Module, init: float = 1.0) -> None:
        if not isinstance(layer, GATEABLE):
            names = ", ".join(t.__name__ for t in GATEABLE)
            raise ValueError(f"layer must be one of {names} to be gated, got {type(layer).__name__}")
        super().__init__()
        self.layer = layer
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        weight = parameter_state(layer, "weight")[0]
        self.gate = nn.Parameter(torch.full((width,), float(init), dtype=weight.dtype, device=weight.device))

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        if self.channel_dim == -1:
            return out * self.gate
        return out * self.gate.reshape((1, -1) + (1,) * (out.dim() - 2))

    def extra_repr(self) -> str:
        return f"gates={self.gate.numel()}"


def gated_layers(model: nn.Module) -> List[Tuple[str, GatedLayer]]:
    """(qualified name, GatedLayer) for every gated layer of the model."""
    return wrapper_layers(model, GatedLayer)


def _require_gates(model: nn.Module) -> List[Tuple[str, GatedLayer]]:
    return require_wrapper_layers(model, GatedLayer, "add_channel_gates")


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def add_channel_gates(
    model: nn.Module,
    layer_types: LayerTypes = (nn.Conv2d, nn.Linear),
    *,
    exclude: Union[str, Sequence[str]] = "last",
    init: float = 1.0,
) -> nn.Module:
    """Wrap every `layer_types` layer of `model` in a `GatedLayer`; returns the model.

    The layers are replaced in place (the gated model computes what it did, gates start at
    `init` = 1). `exclude` lists qualified module names to leave alone; "last" (default)
    leaves out the last such layer in registration order (unless it is the only one), which
    in an nn.Sequential is the output layer (gating a classifier's logits would let the
    penalty delete classes); () gates everything. Layers already gated are skipped. When `model` itself is a layer of
    `layer_types`, the GatedLayer wrapping it is returned. Supported layer types: nn.Linear
    and nn.Conv1d/2d/3d (and subclasses); others raise ValueError naming `layer_types`.
    """
    model = _check_module(model, "model")
    types = check_layer_types(layer_types)
    bad = [t.__name__ for t in types if not issubclass(t, GATEABLE)]
    if bad:
        raise ValueError(f"layer_types holds {', '.join(bad)}; only nn.Linear and nn.Conv1d/2d/3d can be gated")
    if isinstance(init, bool) or not isinstance(init, numbers.Real) or not math.isfinite(init):
        raise ValueError(f"init must be a finite number, got {init!r}")
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, types) and has_parameter(m, "weight")]
    inside_gate = {id(m) for _, g in gated_layers(model) for m in g.modules()}
    selected = [(name, m) for name, m in candidates if id(m) not in inside_gate]
    if exclude == "last":
        # the last such layer of the model, gated or not, so a second call gates nothing new
        skip = {candidates[-1][0]} if len(candidates) > 1 else set()
    elif isinstance(exclude, str) or not isinstance(exclude, Sequence):
        raise TypeError(f"exclude must be 'last' or a sequence of module names, got {exclude!r}")
    else:
        known = {name for name, _ in model.named_modules()}
        unknown = [e for e in exclude if e not in known]
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are no submodules of the model")
        skip = set(exclude)
    for name, layer in selected:
        if name in skip:
            continue
        if name == "":
            return GatedLayer(layer, init)
        _set_child(model, name, GatedLayer(layer, init))
    return model


def gate_l1_penalty(model: nn.Module) -> Tensor:
    """The sum of |gate| over every gate of the model (a differentiable scalar to add to the loss)."""
    gates = _require_gates(_check_module(model, "model"))
    return torch.stack([g.gate.abs().sum() for _, g in gates]).sum()


def _check_number(value: object, arg: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
        value <= 0 if positive else value < 0
    ):
        raise ValueError(f"{arg} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def train_with_gate_penalty(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    l1: float,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    progress: bool = True,
    desc: str = "gates",
) -> List[float]:
    """Train `model` in place on loss_fn(model(x), y) + l1 * gate_l1_penalty(model) with Adam.

    Mini-batches are drawn by a shuffle seeded by `seed`; the learning rate is annealed from
    `lr` to 0 over the run (cosine), so the gates the penalty holds at zero settle there.
    `weight_decay` (L2) applies to the weights, not to the gates (they have the L1 penalty);
    some decay stops the layers from growing to make up for shrinking gates. A tqdm bar over
    the epochs shows the loss unless `progress` is False. Pruning masks stay in force (torch's
    reparametrisation). Returns the mean total loss of each epoch; the model's train/eval mode
    is restored.
    """
    model = _check_module(model, "model")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 1 or x.shape[0] == 0 or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must hold the same number (> 0) of samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    l1 = _check_number(l1, "l1", positive=False)
    lr = _check_number(lr, "lr", positive=True)
    weight_decay = _check_number(weight_decay, "weight_decay", positive=False)
    for value, arg, low in ((epochs, "epochs", 0), (batch_size, "batch_size", 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gates = [g.gate for _, g in _require_gates(model)]
    gate_ids = {id(p) for p in gates}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": gates, "weight_decay": 0.0}]
    if weights:
        groups.append({"params": weights, "weight_decay": weight_decay})
    opt = torch.optim.Adam(groups, lr=lr)

    n = x.shape[0]
    total_steps = max(1, epochs * math.ceil(n / batch_size))
    generator = torch.Generator().manual_seed(int(seed))
    losses: List[float] = []
    step = 0
    was_training = model.training
    model.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=not progress)
    try:
        for _ in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx]) + l1 * gate_l1_penalty(model)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training diverged (loss {loss.item()}); lower lr")
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
                step += 1
            losses.append(total / n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return losses


def _keep(gate: Tensor, threshold: Optional[float], keep_fraction: Optional[float]) -> Tensor:
    """Bool per channel: which survive. The strongest gate of a layer always survives."""
    magnitude = gate.detach().abs()
    if keep_fraction is not None:
        n_keep = max(1, int(round(keep_fraction * magnitude.numel())))
        order = torch.sort(magnitude, descending=True, stable=True).indices
        keep = torch.zeros_like(magnitude, dtype=torch.bool)
        keep[order[:n_keep]] = True
        return keep
    keep = magnitude >= threshold
    keep[int(torch.argmax(magnitude))] = True
    return keep


def remove_gates(
    model: nn.Module,
    threshold: Optional[float] = None,
    *,
    keep_fraction: Optional[float] = None,
) -> nn.Module:
    """Turn a gated model back into plain layers, dropping the channels whose gates are small.

    Per gated layer: channels with |gate| < `threshold` (default 1e-2), or all but the
    `keep_fraction` largest |gate| of the layer, are zeroed with masks on the weight's output
    rows (filters) and the bias (the reparametrisation of `sparseprune.prune.units`/`filters`,
    so fine-tuning keeps them zero); the strongest channel of a layer is always kept. The
    surviving gates are folded into the layer (weight row o and bias o scaled by gate o, on
    the original values under any mask), and the GatedLayer is replaced by its layer.
    `sparseprune.shrink.shrink(result, (x,))` then deletes the zeroed channels.

    With threshold=0 nothing is zeroed and the result computes exactly what the gated model
    did; otherwise it differs by what the dropped channels (each scaled by a gate below the
    threshold) contributed. Works in place and returns the model (the plain layer when `model`
    is itself a GatedLayer). Everything is checked before anything changes.
    """
    model = _check_module(model, "model")
    if threshold is not None and keep_fraction is not None:
        raise ValueError("give threshold or keep_fraction, not both")
    if keep_fraction is not None:
        if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) or not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be a float in (0, 1], got {keep_fraction!r}")
        keep_fraction = float(keep_fraction)
    else:
        threshold = _check_number(1e-2 if threshold is None else threshold, "threshold", positive=False)
    gated = _require_gates(model)
    plans = [(name, g, _keep(g.gate, threshold, keep_fraction)) for name, g in gated]
    with torch.no_grad():
        for name, g, keep in plans:
            layer, gate = g.layer, g.gate.detach()
            for param in ("weight", "bias"):
                if not has_parameter(layer, param):
                    continue
                orig, mask = parameter_state(layer, param)
                shape = (-1,) + (1,) * (orig.dim() - 1)
                orig.mul_(gate.to(orig.dtype).reshape(shape))
                if not bool(keep.all()):
                    drop = keep.to(mask.dtype).reshape(shape).expand_as(mask)
                    install_mask(layer, param, drop, f"remove_gates, {int((~keep).sum())} channels")
            if name == "":
                return layer
            _set_child(model, name, layer)
    return model
