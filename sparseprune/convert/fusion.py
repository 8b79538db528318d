"""Before conversion: fold BatchNorm into the convolution before it, and mark layers whose output
goes straight into a ReLU so their kernel applies it (one pass over the output instead of two).

The data flow comes from torch.fx; the model keeps its own module tree (only the folded
BatchNorm and fused ReLU modules become nn.Identity). A part that fx cannot trace is searched
child by child; layers there are simply not fused.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import fx, nn

from sparseprune.convert.subclass import overridden_method
from sparseprune.prune import is_pruned, remove

FUSE_RELU_ATTR = "_sparseprune_fuse_relu"


def fuses_relu(module: nn.Module) -> bool:
    return bool(getattr(module, FUSE_RELU_ATTR, False))


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_path, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) in eval mode: scale each filter, shift the bias. Zeros stay zeros."""
    if is_pruned(conv):
        remove(conv)  # fold into the effective (masked) weight
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _foldable_bn(bn: nn.Module, channels: int) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.num_features == channels
    )


def _plain_layer(module: nn.Module) -> bool:
    """A Conv2d/Linear (or a subclass keeping its computation): what convert() swaps and fuses."""
    for base in (nn.Conv2d, nn.Linear):
        if isinstance(module, base):
            return overridden_method(type(module), base) is None
    return False


class _Tracer(fx.Tracer):
    """fx's tracer, keeping subclasses of Conv2d/Linear defined outside torch.nn (e.g.
    transformers' EfficientNetDepthwiseConv2d) as calls, so a BatchNorm after them folds too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _plain_layer(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    """The model's fx graph, without tracing's side effects on the model.

    Tracing runs the forward (pre-)hooks of every module it traces through, and
    torch.nn.utils.prune's hook stores `weight_orig * weight_mask` as the module's `weight`:
    that would leave an fx.Proxy there (e.g. in a GPT-2 MLP's Conv1D). Any attribute or buffer
    that holds a Proxy afterwards gets its old value back (or is removed if it is new)."""
    tables = [table for m in model.modules() for table in (vars(m), m._buffers)]
    before = [dict(table) for table in tables]
    try:
        return _Tracer().trace(model)
    finally:
        for table, old in zip(tables, before):
            for key, value in list(table.items()):
                if isinstance(value, fx.Proxy):
                    if key in old:
                        table[key] = old[key]
                    else:
                        del table[key]


def prepare_fusions(model: nn.Module) -> None:
    """In place (on the copy convert() works on): fold BatchNorms, mark ReLUs for fusion."""
    try:
        graph = _trace(model)
    except Exception:  # untraceable control flow, custom leaves...: look inside the children
        for child in model.children():
            prepare_fusions(child)
        return
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def called_once_module(node: Optional[fx.Node], kind) -> Optional[nn.Module]:
        if node is None or node.op != "call_module" or calls[node.target] != 1:
            return None
        module = model.get_submodule(node.target)
        return module if isinstance(module, kind) else None

    for node in list(graph.nodes):
        layer = called_once_module(node, (nn.Conv2d, nn.Linear))
        if layer is None or not _plain_layer(layer):
            continue  # a subclass with its own computation is not converted, so not fused either
        tail = node
        if isinstance(layer, nn.Conv2d):
            bn_node = _only_user(tail)
            bn = called_once_module(bn_node, nn.BatchNorm2d)
            if bn is not None and _foldable_bn(bn, layer.out_channels):
                fold_batchnorm(layer, bn)
                _set_submodule(model, bn_node.target, nn.Identity())
                tail = bn_node
        relu_node = _only_user(tail)
        if called_once_module(relu_node, nn.ReLU) is not None:
            setattr(layer, FUSE_RELU_ATTR, True)
            _set_submodule(model, relu_node.target, nn.Identity())


def with_relu(layer: nn.Module) -> nn.Module:
    """A layer that was marked for ReLU fusion but stays dense gets its ReLU back."""
    if fuses_relu(layer):
        delattr(layer, FUSE_RELU_ATTR)
        return nn.Sequential(layer, nn.ReLU())
    return layer


def capture_input_shapes(model: nn.Module, example_inputs) -> dict:
    """id(layer) -> input shape, for every Linear/Conv2d that runs on `example_inputs`."""
    shapes: dict = {}
    hooks = []
    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(module), tuple(args[0].shape))
        # returning None keeps the arguments as they are

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes
