"""Per-module-type handlers for shrink(): what a layer does to channels, and how it is cut.

Handlers live in a registry keyed by module type (the most specific class in the MRO wins), so
a user can teach shrink() a layer with `register_shrink_handler`. Modules with a registered
handler are traced as leaves.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import numpy as np
import torch
from torch import Tensor, fx, nn

from sparseprune.shrink.graph import Flow, ShrinkContext, ShrinkError, apply_const, flatten_flow, nan_const


class ShrinkHandler:
    """How one module type takes part in shrink().

    `analyze(ctx, node, module, path)` looks at one traced call of the module: it reads its input
    with `ctx.flow(arg)` (None: untracked) or `ctx.channels_of(arg, node, cdim, who)`, records the
    module's channel index spaces with `ctx.register(module, path, role, slots, reads=...,
    const=..., fold_nonzero=...)` and returns the output's `Flow` (or None for an untracked
    output). A role with `reads=True` mixes its channels into every output, so a channel there
    can go only if it holds a constant (`const`), which `apply` then folds into the bias.

    `apply(module, keep, fold, bias_sink=None)` cuts the module in place: `keep[role]` is a
    LongTensor of the positions of each registered role to keep; `fold[role]` (reads roles only)
    holds, per position, the constant to fold into the bias (zero where nothing is folded).
    `bias_sink`, when given, is the BatchNorm that alone reads the module's output: a module
    without a bias may fold into its running mean instead of growing a bias.
    """

    def analyze(self, ctx: ShrinkContext, node: fx.Node, module: nn.Module, path: str) -> Optional[Flow]:
        raise NotImplementedError

    def apply(self, module: nn.Module, keep: Dict[str, Tensor], fold: Dict[str, Tensor],
              bias_sink: Optional[nn.Module] = None) -> None:
        raise NotImplementedError


_HANDLERS: Dict[Type[nn.Module], ShrinkHandler] = {}


def register_shrink_handler(module_type: Type[nn.Module], handler: ShrinkHandler) -> None:
    """Teach shrink() a layer type (replacing any handler registered for exactly that type)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, ShrinkHandler):
        raise TypeError(f"handler must be a ShrinkHandler, got {type(handler).__name__}")
    _HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> Optional[ShrinkHandler]:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def registered_types() -> Tuple[Type[nn.Module], ...]:
    return tuple(_HANDLERS)


# ---------------------------------------------------------------------------------------------
# Helpers


def keep_module(ctx: ShrinkContext, node: fx.Node, module: nn.Module, path: str, why: str) -> None:
    """Treat this call like an unknown module: keep every channel flowing in, output untracked."""
    if any(ctx.flow(n) is not None for n in node.all_input_nodes):
        ctx.notes.append(f"kept every channel flowing into '{path}' ({type(module).__name__}): {why}")
    ctx.keep_through(node, f"flows into '{path}' ({type(module).__name__}): {why}")
    return None


def _param(old: Optional[nn.Parameter], value: Tensor, like: nn.Parameter) -> nn.Parameter:
    requires_grad = old.requires_grad if old is not None else like.requires_grad
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=requires_grad)


def _single_input(node: fx.Node, path: str) -> fx.Node:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        raise ShrinkError(f"'{path}' (node '{node.name}') is called with other than one tensor argument")
    return node.args[0]


def weighted_const(weight: Tensor, bias: Optional[Tensor], cin: Tensor, groups: int, zero_padded: bool) -> Tensor:
    """Per output: the constant a conv/linear gives when every input it actually reads (nonzero
    weights) is a known constant that survives its padding; NaN where some output varies."""
    w = weight.detach()
    out_ch, ipg = w.shape[0], w.shape[1]
    wf = w.reshape(out_ch, ipg, -1)
    wsum = wf.sum(-1)
    wnz = (wf != 0).any(-1)
    group = torch.arange(out_ch) // (out_ch // groups)
    c = cin.to(w.dtype).reshape(groups, ipg)[group]  # (out, ipg): the inputs each output reads
    known = torch.isfinite(c)
    if zero_padded:  # the border sees zeros instead of the constant, unless the constant is zero
        known = known & (c == 0)
    ok = (known | ~wnz).all(1)
    val = torch.where(wnz & known, wsum * torch.where(known, c, torch.zeros((), dtype=w.dtype)),
                      torch.zeros((), dtype=w.dtype)).sum(1)
    if bias is not None:
        val = val + bias.detach()
    return torch.where(ok & torch.isfinite(val), val, torch.full((), float("nan"), dtype=w.dtype))


def _fold_into_bias(module: nn.Module, per_input: Tensor, fold: Optional[Tensor],
                    bias_sink: Optional[nn.Module]) -> Optional[Tensor]:
    """The bias after adding `per_input @ fold` (per_input: [out, in] weight sums); a bias-free
    module with a BatchNorm sink shifts the sink's running mean instead (and stays bias-free)."""
    bias = module.bias.detach() if module.bias is not None else None
    if fold is None or not bool((fold != 0).any()):
        return bias
    delta = per_input.double() @ fold.double()
    if bias is None and bias_sink is not None:
        mean = bias_sink.running_mean
        bias_sink.running_mean = (mean.double() - delta.to(mean.device)).to(mean.dtype)
        return None
    base = bias.double() if bias is not None else torch.zeros_like(delta)
    return (base + delta).to(module.weight.dtype)


# ---------------------------------------------------------------------------------------------
# Convolutions and Linear


def zero_padded(conv: nn.Module) -> bool:
    """Whether zero padding cuts the kernel at the borders (other padding modes repeat values)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


class ConvHandler(ShrinkHandler):
    """Conv1d/2d/3d. groups == 1: a consumer of its inputs and a producer of its outputs.
    Depthwise (groups == in_channels, any multiplier): carries its input channels to its
    outputs, sliced with them. 1 < groups < in_channels: kept whole, with the channels it reads."""

    def analyze(self, ctx, node, m, path):
        if getattr(m, "transposed", False):
            return keep_module(ctx, node, m, path, "transposed convolutions are not cut")
        x_node = _single_input(node, path)
        spatial = len(m.kernel_size)
        cdim = len(ctx.shape(x_node)) - spatial - 1
        x = ctx.channels_of(x_node, node, cdim, f"conv '{path}'")
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        padded = zero_padded(m)
        out_const = weighted_const(m.weight, m.bias, x.const, g, padded)
        if g == 1:
            ctx.register(m, path, "in", x.slots, reads=True, const=x.const, fold_nonzero=not padded)
            out = ctx.register(m, path, "out", ctx.new_slots(cout), const=out_const)
        elif g == cin:
            ins = ctx.register(m, path, "in", x.slots)
            k = cout // cin
            if k == 1:
                out_slots = ins
            else:
                out_slots = ctx.new_slots(cout)
                ctx.table.union(out_slots, np.repeat(ins, k))
            out = ctx.register(m, path, "out", out_slots, const=out_const)
        else:
            reason = f"is read or made by grouped conv '{path}' (groups={g}), which is not cut"
            ctx.pin(x.slots, reason)
            ctx.register(m, path, "in", x.slots, reads=True, const=x.const)
            out = ctx.register(m, path, "out", ctx.new_slots(cout, pin=reason), const=out_const)
        return Flow(cdim, out, out_const.to(ctx.dtype(node)))

    def apply(self, m, keep, fold, bias_sink=None):
        w = m.weight.detach()
        kin, kout = keep["in"], keep["out"]
        g = m.groups
        if g == 1:
            bias = _fold_into_bias(m, w.reshape(w.shape[0], w.shape[1], -1).sum(-1), fold.get("in"), bias_sink)
            w = w[:, kin]
            groups = 1
        elif g == m.in_channels:
            k = m.out_channels // m.in_channels
            expected = (kin.repeat_interleave(k) * k + torch.arange(k).repeat(len(kin)))
            if not torch.equal(expected, kout):
                raise ShrinkError("internal: depthwise conv keeps inconsistent channels")
            bias = m.bias.detach() if m.bias is not None else None
            groups = len(kin)
        else:
            if len(kin) != m.in_channels or len(kout) != m.out_channels:
                raise ShrinkError("internal: a grouped conv lost channels")
            return
        w = w[kout]
        old_bias = m.bias
        m.weight = _param(m.weight, w, m.weight)
        if bias is not None:
            m.bias = _param(old_bias, bias[kout], m.weight)
        m.in_channels, m.out_channels, m.groups = len(kin), len(kout), groups


class LinearHandler(ShrinkHandler):
    """nn.Linear: reads features on the last dim, produces fresh ones."""

    def analyze(self, ctx, node, m, path):
        x = ctx.channels_of(_single_input(node, path), node, -1, f"Linear '{path}'")
        out_const = weighted_const(m.weight, m.bias, x.const, 1, False)
        ctx.register(m, path, "in", x.slots, reads=True, const=x.const, fold_nonzero=True)
        out = ctx.register(m, path, "out", ctx.new_slots(m.out_features), const=out_const)
        return Flow(len(ctx.shape(node)) - 1, out, out_const.to(ctx.dtype(node)))

    def apply(self, m, keep, fold, bias_sink=None):
        w = m.weight.detach()
        kin, kout = keep["in"], keep["out"]
        bias = _fold_into_bias(m, w, fold.get("in"), bias_sink)
        old_bias = m.bias
        m.weight = _param(m.weight, w[:, kin][kout], m.weight)
        if bias is not None:
            m.bias = _param(old_bias, bias[kout], m.weight)
        m.in_features, m.out_features = len(kin), len(kout)


# ---------------------------------------------------------------------------------------------
# Channel carriers


class BatchNormHandler(ShrinkHandler):
    """BatchNorm1d/2d/3d: per-channel affine map of channels on dim 1 (constants as in eval mode;
    a zero scale makes a channel its shift whatever comes in)."""

    def analyze(self, ctx, node, m, path):
        x_node = _single_input(node, path)
        f = ctx.flow(x_node)
        if f is None:
            return None
        f = ctx.channels_of(x_node, node, 1, f"BatchNorm '{path}'")
        slots = ctx.register(m, path, "channels", f.slots)
        dtype = ctx.dtype(node)
        n = len(slots)
        w = m.weight.detach().to(dtype) if m.weight is not None else torch.ones(n, dtype=dtype)
        b = m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(n, dtype=dtype)
        if m.running_mean is not None and m.running_var is not None:
            c = f.const.to(dtype)
            val = (c - m.running_mean.to(dtype)) / torch.sqrt(m.running_var.to(dtype) + m.eps) * w + b
        else:
            val = nan_const(n, dtype)
        val = torch.where(w == 0, b, val)
        val = torch.where(torch.isfinite(val), val, torch.full((), float("nan"), dtype=dtype))
        return Flow(1, slots, val)

    def apply(self, m, keep, fold, bias_sink=None):
        k = keep["channels"]
        if m.weight is not None:
            m.weight = _param(m.weight, m.weight.detach()[k], m.weight)
        if m.bias is not None:
            m.bias = _param(m.bias, m.bias.detach()[k], m.bias)
        if m.running_mean is not None:
            m.running_mean = m.running_mean[k].clone()
        if m.running_var is not None:
            m.running_var = m.running_var[k].clone()
        m.num_features = len(k)


class PReLUHandler(ShrinkHandler):
    def analyze(self, ctx, node, m, path):
        x_node = _single_input(node, path)
        f = ctx.flow(x_node)
        if f is None:
            return None
        dtype = ctx.dtype(node)
        w = m.weight.detach().to(dtype)
        if m.num_parameters == 1:
            slots, wc = f.slots, w.expand(len(f.slots))
        else:
            nd = len(ctx.shape(x_node))
            f = ctx.channels_of(x_node, node, 1 if nd > 1 else 0, f"PReLU '{path}'")
            slots, wc = ctx.register(m, path, "channels", f.slots), w
        c = f.const.to(dtype)
        return Flow(f.cdim, slots, torch.where(c >= 0, c, wc * c))

    def apply(self, m, keep, fold, bias_sink=None):
        k = keep["channels"]
        m.weight = _param(m.weight, m.weight.detach()[k], m.weight)
        m.num_parameters = len(k)


class ElementwiseHandler(ShrinkHandler):
    """Activations, Identity, Dropout: channels unchanged, constants mapped by the module
    (dropout as in eval mode)."""

    def __init__(self, identity: bool = False) -> None:
        self.identity = identity

    def analyze(self, ctx, node, m, path):
        f = ctx.flow(_single_input(node, path))
        if f is None:
            return None
        dtype = ctx.dtype(node)
        if self.identity:
            return Flow(f.cdim, f.slots, f.const.to(dtype))
        return Flow(f.cdim, f.slots, apply_const(lambda c: m.forward(c), f.const.to(dtype), dtype=dtype))

    def apply(self, m, keep, fold, bias_sink=None):  # nothing registered, nothing to cut
        return None


class SpatialHandler(ShrinkHandler):
    """Pooling / upsampling over the dims after the channel dim: channels unchanged; a constant
    stays itself unless `preserves(module)` is false (then only zero is sure to survive)."""

    def __init__(self, preserves=lambda m: True) -> None:
        self.preserves = preserves

    def analyze(self, ctx, node, m, path):
        x_node = _single_input(node, path)
        f = ctx.flow(x_node)
        if f is None:
            return None
        if getattr(m, "return_indices", False):
            return keep_module(ctx, node, m, path, "it returns indices")
        if f.cdim != 1:
            raise ShrinkError(f"'{path}' (node '{node.name}') pools a tensor whose channels are on dim {f.cdim}, "
                              "not dim 1")
        dtype = ctx.dtype(node)
        const = f.const.to(dtype)
        if not self.preserves(m):
            const = torch.where(const == 0, const, torch.full((), float("nan"), dtype=dtype))
        return Flow(1, f.slots, const)

    def apply(self, m, keep, fold, bias_sink=None):
        return None


class FlattenHandler(ShrinkHandler):
    def analyze(self, ctx, node, m, path):
        x_node = _single_input(node, path)
        f = ctx.flow(x_node)
        if f is None:
            return None
        return flatten_flow(ctx, node, x_node, f, m.start_dim, m.end_dim)

    def apply(self, m, keep, fold, bias_sink=None):
        return None


def _avg_pool_preserves(m: nn.Module) -> bool:
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
    return all(p == 0 for p in pad) and not m.ceil_mode and getattr(m, "divisor_override", None) is None


def _register_defaults() -> None:
    register_shrink_handler(nn.modules.conv._ConvNd, ConvHandler())
    register_shrink_handler(nn.Linear, LinearHandler())
    register_shrink_handler(nn.modules.batchnorm._BatchNorm, BatchNormHandler())
    register_shrink_handler(nn.PReLU, PReLUHandler())
    for t in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
              nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
              nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Threshold):
        register_shrink_handler(t, ElementwiseHandler())
    for t in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
              nn.FeatureAlphaDropout):
        register_shrink_handler(t, ElementwiseHandler(identity=True))
    for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample):
        register_shrink_handler(t, SpatialHandler())
    for t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
        register_shrink_handler(t, SpatialHandler(_avg_pool_preserves))
    register_shrink_handler(nn.Flatten, FlattenHandler())


_register_defaults()
